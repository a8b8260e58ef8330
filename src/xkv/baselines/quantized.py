"""Quantized KV-cache peer: transformers' ``QuantizedCache`` with the optimum-quanto backend, measured in bytes.

The method is KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
arXiv 2402.02750): keys and values are quantized to 2 or 4 bits in groups with a scale and a zero point each, and the
most recent tokens stay in full precision. transformers implements it as ``QuantizedCache``; this module only builds
it with checked settings and counts what it holds.

How the cache behaves (transformers 5.2, ``QuantizedLayer``):

* The first ``update`` (the prefill) quantizes all its tokens at once and returns the exact states, so the prefill
  itself attends to unquantized keys and values.
* Later tokens (a question appended after the context, then decoded tokens) go to a full-precision tail. When the
  tail reaches ``residual_length`` tokens, the dequantized prefix, the tail and the new token are quantized again as
  one block and the tail is emptied, so the quantization error of the prefix adds up at every flush.

Which axis means what (optimum-quanto 0.2.7 groups the flattened ``(batch, kv_heads, seq_len, head_dim)`` tensor):

* ``axis=0``: groups of ``q_group_size`` consecutive elements along ``head_dim`` (then tokens), i.e. per token.
  Every length works when ``kv_heads * head_dim`` is a multiple of ``q_group_size`` (SmolLM2: 3 * 64, group 64).
* ``axis=-1``: for each channel, groups of ``q_group_size`` consecutive tokens, i.e. per channel as KIVI does for
  keys (KIVI itself is ``axis_key=-1, axis_value=0``). quanto then needs ``batch * kv_heads * seq_len`` to be a
  multiple of ``q_group_size`` at every quantization: the prefill length must be a multiple of
  :func:`quantization_token_multiple`, and a question appended in one step must be shorter than
  ``residual_length``.

Bytes are measured from the tensors quanto keeps (:func:`quantized_cache_bytes`), never from the bit width alone:
packed codes, one scale and one zero point per group, and the full-precision tail.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, QuantizedCache

from xkv.memory import MemoryReport, dense_kv_bytes, tensor_bytes

#: Bit widths optimum-quanto's ``qint2``/``qint4`` offer for KV-caches.
QUANTO_NBITS = (2, 4)
#: Axes quanto accepts for grouped weight quantization.
QUANTO_AXES = (0, -1)

_PIP_HINT = "pip install optimum-quanto"


def _kv_shape(model: nn.Module) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of a decoder config."""
    config = model.config.get_text_config(decoder=True)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(num_kv_heads), int(head_dim)


def quantization_token_multiple(
    model: nn.Module, *, axis_key: int = 0, axis_value: int = 0, q_group_size: int = 64
) -> int:
    """Smallest token count that every quantized block's length must be a multiple of (batch 1).

    quanto splits each flattened ``(batch, kv_heads, seq_len, head_dim)`` tensor into groups of ``q_group_size``
    elements; it raises if they do not divide evenly. With ``axis=0`` the count per token is ``kv_heads * head_dim``
    elements, with ``axis=-1`` it is ``kv_heads`` (one group runs along tokens, per channel).

    Args:
        model: the causal LM the cache is for.
        axis_key: quantization axis of keys, 0 or -1.
        axis_value: quantization axis of values, 0 or -1.
        q_group_size: elements per quantization group.

    Returns:
        ``m >= 1``: prefill lengths that are multiples of ``m`` always quantize (1: any length does).
    """
    num_kv_heads, head_dim = _kv_shape(model)
    multiple = 1
    for axis in (axis_key, axis_value):
        per_token = num_kv_heads * head_dim if axis == 0 else num_kv_heads
        multiple = math.lcm(multiple, q_group_size // math.gcd(q_group_size, per_token))
    return multiple


def quantized_cache(
    model: nn.Module,
    nbits: int,
    *,
    axis_key: int = 0,
    axis_value: int = 0,
    q_group_size: int = 64,
    residual_length: int = 128,
) -> QuantizedCache:
    """Build a quanto ``QuantizedCache`` for ``model``, with every setting checked before any token is seen.

    Args:
        model: the causal LM the cache is for (its decoder config gives layers, KV heads and head_dim).
        nbits: bits per quantized element, 2 or 4.
        axis_key: 0 (per-token groups) or -1 (per-channel groups along tokens, KIVI's choice for keys).
        axis_value: 0 (per-token groups, KIVI's choice for values) or -1.
        q_group_size: elements sharing one scale and one zero point; transformers' default 64.
        residual_length: tokens kept in full precision before they are quantized with the prefix; transformers'
            default 128 (KIVI's window of recent tokens).

    Returns:
        An empty ``QuantizedCache`` (one ``QuantoQuantizedLayer`` per decoder layer); prefill it with
        :func:`xkv.generation.prefill` or pass it as ``past_key_values``.

    Raises:
        ValueError: for ``nbits`` not in {2, 4}, an axis not in {0, -1}, ``q_group_size < 1``,
            ``residual_length < 1``, or a ``residual_length`` that is not a multiple of
            :func:`quantization_token_multiple` (the first flush of the tail would fail mid-decode).
        ImportError: if optimum-quanto is not installed; the message gives the pip command.
    """
    if nbits not in QUANTO_NBITS:
        raise ValueError(f"`nbits` for the quanto backend must be one of {list(QUANTO_NBITS)} but got {nbits}")
    for name, axis in (("axis_key", axis_key), ("axis_value", axis_value)):
        if axis not in QUANTO_AXES:
            raise ValueError(f"`{name}` for the quanto backend must be one of {list(QUANTO_AXES)} but got {axis}")
    if q_group_size < 1:
        raise ValueError(f"`q_group_size` must be >= 1 but got {q_group_size}")
    if residual_length < 1:
        raise ValueError(f"`residual_length` must be >= 1 but got {residual_length}")
    multiple = quantization_token_multiple(model, axis_key=axis_key, axis_value=axis_value, q_group_size=q_group_size)
    if residual_length % multiple:
        raise ValueError(
            f"`residual_length` must be a multiple of {multiple} (tokens per whole quantization group with "
            f"axis_key={axis_key}, axis_value={axis_value}, q_group_size={q_group_size}) but got {residual_length}"
        )
    try:
        import optimum.quanto  # noqa: F401  (transformers imports it lazily; check here, before any token)
    except ImportError as err:
        raise ImportError(f"the quantized-cache baseline needs optimum-quanto: {_PIP_HINT}") from err
    return QuantizedCache(
        backend="quanto",
        config=model.config,
        nbits=nbits,
        axis_key=axis_key,
        axis_value=axis_value,
        q_group_size=q_group_size,
        residual_length=residual_length,
    )


def _leaf_tensors(tensor: torch.Tensor | None) -> list[torch.Tensor]:
    """The plain tensors behind a (possibly nested) tensor subclass.

    A quanto ``WeightQBitsTensor`` is a wrapper subclass whose own storage holds no data (its ``nbytes`` claims the
    dense size, its data pointer cannot be read); what it holds are its inner tensors, listed by
    ``__tensor_flatten__``: ``_data`` (a ``PackedTensor`` whose ``_data`` is uint8, ``8 // nbits`` codes per
    byte), ``_scale`` and ``_shift`` (one per group, in the dtype of the quantized states).
    """
    if tensor is None:
        return []
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return [tensor]
    inner_names, _ = tensor.__tensor_flatten__()
    return [leaf for name in inner_names for leaf in _leaf_tensors(getattr(tensor, name))]


def _quantized_tensors(cache: QuantizedCache) -> list[torch.Tensor]:
    return [
        leaf
        for layer in cache.layers
        for name in ("_quantized_keys", "_quantized_values")
        for leaf in _leaf_tensors(getattr(layer, name, None))
    ]


def _tail_tensors(cache: QuantizedCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]


def quantized_cache_bytes(cache: QuantizedCache) -> int:
    """Bytes a quanto ``QuantizedCache`` holds, summed from its tensors' storages (each counted once).

    Counted per layer, for keys and values: the packed codes (``numel * nbits / 8`` bytes), the scales and the zero
    points (``numel / q_group_size`` each, in the states' dtype), and the full-precision tail of at most
    ``residual_length`` tokens. The quantized wrappers' own storage is a dense-sized placeholder and is not
    counted.

    Args:
        cache: a ``QuantizedCache`` built with the quanto backend, empty or filled.

    Returns:
        Bytes held; 0 before the prefill.
    """
    return tensor_bytes([*_quantized_tensors(cache), *_tail_tensors(cache)])


def quantized_memory_report(cache: QuantizedCache) -> MemoryReport:
    """What a quanto ``QuantizedCache`` holds against a dense cache of the same dtype for the same tokens.

    The dense reference uses the dtype, batch, KV heads and head_dim of the states the cache was given (read off
    the quantized tensors, whose dtype is that of the model) and every token seen (``get_seq_length``), quantized
    or in the tail.

    Args:
        cache: a ``QuantizedCache`` built with the quanto backend.

    Returns:
        ``held_bytes`` (all of it), ``tail_bytes`` (the full-precision tails) and ``dense_bytes``; no groups (no
        layer is factored). All zero before the prefill.
    """
    first = getattr(cache.layers[0], "_quantized_keys", None) if cache.layers else None
    if first is None:
        return MemoryReport()
    batch, num_kv_heads, _, head_dim = first.shape  # (batch, kv_heads, quantized tokens, head_dim)
    dense = dense_kv_bytes(batch, cache.get_seq_length(), len(cache.layers), num_kv_heads * head_dim, first.dtype)
    return MemoryReport(
        tail_bytes=tensor_bytes(_tail_tensors(cache)),
        held_bytes=quantized_cache_bytes(cache),
        dense_bytes=dense,
    )


@torch.no_grad()
def quantized_from_dense(
    model: nn.Module, keys_values: list[tuple[torch.Tensor, torch.Tensor]], nbits: int, **options: Any
) -> QuantizedCache:
    """Quantize a finished dense prefill: the cache an in-forward prefill through :func:`quantized_cache` leaves.

    ``QuantizedCache`` quantizes a layer's states at its first update and returns them exact to the prefill
    attention, so quantizing after the forward pass stores the same tensors (tested). When the prefill length is not
    a multiple of :func:`quantization_token_multiple` (per-channel ``axis=-1`` on SmolLM2: 64 tokens), the prefill is
    taken in two chunks, the longest multiple first and the rest (fewer than ``residual_length`` tokens) into the
    full-precision tail: what the cache holds after a chunked prefill split there.

    Args:
        model: the model that produced the prefill.
        keys_values: per layer ``(keys, values)``, each ``(batch, kv_heads, tokens, head_dim)``.
        nbits: 2 or 4.
        **options: the other :func:`quantized_cache` settings.
    """
    cache = quantized_cache(model, nbits, **options)
    multiple = quantization_token_multiple(
        model,
        **{name: options[name] for name in ("axis_key", "axis_value", "q_group_size") if name in options},
    )
    tokens = keys_values[0][0].shape[-2]
    head = tokens - tokens % multiple
    if head == 0:
        raise ValueError(f"a prefill of {tokens} tokens is shorter than one quantization block of {multiple} tokens")
    for layer_idx, (keys, values) in enumerate(keys_values):
        cache.update(keys[..., :head, :], values[..., :head, :], layer_idx)
        if head < tokens:
            cache.update(keys[..., head:, :], values[..., head:, :], layer_idx)
    return cache


def tail_tokens(cache: QuantizedCache) -> int:
    """Tokens in the full-precision tail of ``cache`` (the same in every layer)."""
    keys = cache.layers[0].keys
    return int(keys.shape[-2]) if keys is not None and keys.dim() == 4 else 0


@torch.no_grad()
def dequantized_copy(cache: QuantizedCache) -> DynamicCache:
    """A ``DynamicCache`` holding what ``cache`` hands attention right now: dequantized prefix plus exact tail.

    Decoding through the copy equals decoding through ``cache`` until its tail reaches ``residual_length`` (then
    ``cache`` quantizes everything again); the evaluation keeps question plus answer below that (tested). For
    evaluation speed only: it holds a full-size cache, so bytes come from :func:`quantized_memory_report`.
    """
    dense = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        keys = layer._dequantize(layer._quantized_keys)
        values = layer._dequantize(layer._quantized_values)
        if layer.keys is not None and layer.keys.dim() == 4:
            keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
        dense.update(keys, values, layer_idx)
    return dense
