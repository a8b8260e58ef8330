"""Token-pruning peers from the kvpress package (NVIDIA, https://github.com/NVIDIA/kvpress), used through kvpress.

A kvpress "press" is a context manager that hooks every attention layer; during the prefill each hook scores the
context tokens and writes shorter keys and values back into the cache, so the pruned tokens are really freed (no
masking). kvpress's ``compression_ratio`` is the fraction of tokens **removed**; xkv speaks of
``compression_factor`` = dense / held, so a factor of 4 is ``compression_ratio = 0.75`` (:func:`removed_fraction`).

After pruning, the cache is shorter than the context, but the kept keys carry RoPE of their original positions.
New tokens must therefore be fed at positions that continue from the original context length, while their
``cache_position`` (where they land in the cache, which also builds the causal mask) follows the pruned length.
:func:`press_forward` does both; kvpress's own pipeline passes the same ``position_ids``.

Importing kvpress patches transformers' global attention functions (``kvpress.attention_patch``), so it is
imported inside the functions here, on first use, never when xkv is imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache

from xkv.config import UnreachableRatioError
from xkv.generation import decode_n_tokens
from xkv.memory import MemoryReport, dense_kv_bytes, tensor_bytes

if TYPE_CHECKING:  # for annotations only: importing kvpress patches transformers
    from kvpress import BasePress

#: Our names for the kvpress pruning presses, to their class names in kvpress 0.5.5. All six run on CPU and
#: free memory (presses that only mask, such as AdaKV or DuoAttention, are left out: they save nothing).
PRESSES: dict[str, str] = {
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "streaming_llm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "keydiff": "KeyDiffPress",
}

#: Press fields that bound the context from below: kvpress asserts ``tokens > window_size`` (SnapKV) and
#: ``tokens > n_sink`` (StreamingLLM, ExpectedAttention); we raise a ValueError instead (``python -O`` strips
#: asserts).
_MIN_TOKEN_FIELDS = ("window_size", "n_sink")


def _kvpress() -> Any:
    """Import kvpress on first use (it patches transformers' attention functions when imported)."""
    try:
        return importlib.import_module("kvpress")
    except ImportError as err:
        raise ImportError("the kvpress baselines need the kvpress package: pip install kvpress") from err


def removed_fraction(compression_factor: float) -> float:
    """The kvpress ``compression_ratio`` (fraction of tokens removed) for a compression factor (dense / held).

    Args:
        compression_factor: dense bytes over held bytes, > 1.

    Returns:
        ``1 - 1 / compression_factor``, e.g. 0.75 for 4.0.

    Raises:
        ValueError: if ``compression_factor <= 1``.
    """
    if not compression_factor > 1.0:
        raise ValueError(f"`compression_factor` must be > 1 (dense / held) but got {compression_factor}")
    return 1.0 - 1.0 / compression_factor


def make_press(name: str, compression_factor: float) -> BasePress:
    """Build a kvpress pruning press that keeps ``1 / compression_factor`` of the context tokens.

    Every layer and KV head keeps ``max(1, int(tokens * (1 - compression_ratio)))`` tokens (kvpress's
    ``compute_n_kept``), so the held context bytes are that fraction of the dense ones, up to rounding.

    Args:
        name: a key of :data:`PRESSES`.
        compression_factor: dense / held for the context, > 1 (4.0 keeps 25%).

    Returns:
        The kvpress press (a ``kvpress.ScorerPress`` subclass) with its other settings at kvpress's defaults.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the known ones) or ``compression_factor <= 1``.
        ImportError: if kvpress is not installed; the message gives the pip command.
    """
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known presses: {sorted(PRESSES)}")
    ratio = removed_fraction(compression_factor)
    press_cls = getattr(_kvpress(), PRESSES[name])
    return press_cls(compression_ratio=ratio)


def _check_min_tokens(press: BasePress | None, tokens: int) -> None:
    """Raise an ``UnreachableRatioError`` (a ValueError) naming the field where kvpress would only assert."""
    for field_name in _MIN_TOKEN_FIELDS:
        bound = getattr(press, field_name, None)
        if isinstance(bound, int) and tokens <= bound:
            raise UnreachableRatioError(
                f"`context_ids` must have more than the press's `{field_name}` = {bound} tokens but has {tokens}"
            )


@dataclass
class PressedContext:
    """A context prefilled through a press: the pruned cache and where positions continue.

    Attributes:
        cache: the ``DynamicCache`` after pruning; per layer keys/values ``(batch, kv_heads, kept, head_dim)``,
            post-RoPE at their original positions. Tokens fed later are appended to it.
        context_length: tokens in the original context (the position of the first token fed after it).
        pressed_length: tokens per layer the cache held right after pruning (``kept``).
    """

    cache: DynamicCache
    context_length: int
    pressed_length: int

    @property
    def position_offset(self) -> int:
        """Tokens removed by the press: a token's position is its index in the cache plus this offset."""
        return self.context_length - self.pressed_length


@torch.no_grad()
def press_prefill(model: nn.Module, press: BasePress | None, context_ids: torch.Tensor) -> PressedContext:
    """Prefill ``context_ids`` into a new ``DynamicCache`` with ``press`` pruning it, the way kvpress's pipeline does.

    Runs ``with press(model): model.model(input_ids=context_ids, past_key_values=cache, use_cache=True)``: the base
    model only (no LM head: the logits of the context are not needed), in one forward pass from position 0, which
    is what kvpress's hooks take for a prefill. kvpress's context manager also sets ``self_attn.rotary_emb`` on every
    attention layer and leaves it there; it is removed again here, so the model comes back unchanged.

    Args:
        model: a causal LM kvpress supports (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3).
        press: a press from :func:`make_press` (or any kvpress prefill press); ``None`` keeps the full cache.
        context_ids: ``(batch, tokens)`` token ids of the context.

    Returns:
        The pruned cache, the original context length and the pruned length.

    Raises:
        ValueError: if ``context_ids`` is not 2-D, or has no more tokens than the press's ``window_size`` or
            ``n_sink``.
        ImportError: if kvpress is not installed.
    """
    if context_ids.dim() != 2 or context_ids.shape[1] == 0:
        raise ValueError(f"`context_ids` must have shape (batch, tokens) but got {tuple(context_ids.shape)}")
    tokens = context_ids.shape[1]
    _check_min_tokens(press, tokens)
    cache = DynamicCache(config=model.config)
    if press is None:
        model.model(input_ids=context_ids, past_key_values=cache, use_cache=True)
    else:
        attention = [layer.self_attn for layer in model.model.layers]
        had_rotary = [hasattr(module, "rotary_emb") for module in attention]
        try:
            with press(model):
                model.model(input_ids=context_ids, past_key_values=cache, use_cache=True)
        finally:
            for module, had in zip(attention, had_rotary, strict=True):
                if not had and hasattr(module, "rotary_emb"):
                    del module.rotary_emb
    return PressedContext(cache=cache, context_length=tokens, pressed_length=cache.get_seq_length())


@dataclass
class PrefillCapture:
    """What every attention layer saw during one dense prefill, so presses can be applied without another one.

    kvpress's hook runs after a layer's attention and only rewrites that layer's cache; the hidden states that flow
    to the next layer come from the exact prefill attention either way. So applying ``press.compress`` afterwards,
    to each layer's captured inputs and dense keys/values, gives exactly the cache the in-forward press leaves
    (tested against :func:`press_prefill`).

    Attributes:
        cache: the dense ``DynamicCache`` of the context.
        layer_kwargs: per layer, the keyword arguments the attention module was called with (``hidden_states``
            ``(batch, tokens, hidden)``, ``position_embeddings``, ``cache_position``, ...), without the cache.
        last_logits: ``(batch, vocab)`` logits after the context.
    """

    cache: DynamicCache
    layer_kwargs: list[dict[str, Any]]
    last_logits: torch.Tensor


@torch.no_grad()
def capture_prefill(model: nn.Module, context_ids: torch.Tensor) -> PrefillCapture:
    """Prefill ``context_ids`` into a dense cache while recording each attention layer's inputs.

    The forward hooks are removed before returning, also on error.

    Args:
        model: a causal LM kvpress supports.
        context_ids: ``(batch, tokens)``.
    """
    cache = DynamicCache(config=model.config)
    layer_kwargs: list[dict[str, Any]] = [{} for _ in model.model.layers]

    def recorder(layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            layer_kwargs[layer_idx] = {k: v for k, v in kwargs.items() if k != "past_key_values"}

        return hook

    hooks = [
        layer.self_attn.register_forward_hook(recorder(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        out = model(input_ids=context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return PrefillCapture(cache=cache, layer_kwargs=layer_kwargs, last_logits=out.logits[:, -1, :])


@torch.no_grad()
def replay_press(model: nn.Module, press: BasePress, capture: PrefillCapture) -> PressedContext:
    """Apply ``press`` to a captured prefill: the cache an in-forward :func:`press_prefill` would leave.

    Args:
        model: the model that made ``capture``.
        press: a press from :func:`make_press`.
        capture: from :func:`capture_prefill`; it is not modified.

    Returns:
        The pruned cache (new tensors; the capture's dense cache is untouched) and its lengths.

    Raises:
        ValueError: if the context has no more tokens than the press's ``window_size`` or ``n_sink``.
    """
    tokens = capture.cache.get_seq_length()
    _check_min_tokens(press, tokens)
    press.post_init_from_model(model)
    attention = [layer.self_attn for layer in model.model.layers]
    had_rotary = [hasattr(module, "rotary_emb") for module in attention]
    pruned = DynamicCache(config=model.config)
    try:
        for module in attention:
            module.rotary_emb = model.model.rotary_emb  # what kvpress's context manager provides to its presses
        for layer_idx, module in enumerate(attention):
            kwargs = {**capture.layer_kwargs[layer_idx], "past_key_values": capture.cache}
            dense = capture.cache.layers[layer_idx]
            keys, values = press.compress(module, kwargs["hidden_states"], dense.keys, dense.values, None, kwargs)
            pruned.update(keys.contiguous(), values.contiguous(), layer_idx)
    finally:
        for module, had in zip(attention, had_rotary, strict=True):
            if not had and hasattr(module, "rotary_emb"):
                del module.rotary_emb
    return PressedContext(cache=pruned, context_length=tokens, pressed_length=pruned.get_seq_length())


@torch.no_grad()
def press_forward(model: nn.Module, pressed: PressedContext, input_ids: torch.Tensor) -> torch.Tensor:
    """Feed tokens after what ``pressed.cache`` holds, at their original positions; appends them to the cache.

    ``cache_position`` is where the tokens land in the (shorter) cache, which also builds the causal mask;
    ``position_ids`` (RoPE) add the tokens the press removed, so the first token after the context gets position
    ``context_length``.

    Args:
        model: the causal LM that prefilled ``pressed``.
        pressed: from :func:`press_prefill`; its cache grows by ``tokens``.
        input_ids: ``(batch, tokens)``, the batch of the prefill.

    Returns:
        Logits of the last position, ``(batch, vocab)``.
    """
    start = pressed.cache.get_seq_length()
    cache_position = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
    position_ids = (cache_position + pressed.position_offset).unsqueeze(0).expand(input_ids.shape[0], -1)
    out = model(
        input_ids=input_ids,
        past_key_values=pressed.cache,
        use_cache=True,
        cache_position=cache_position,
        position_ids=position_ids,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


@torch.no_grad()
def press_answer(
    model: nn.Module,
    pressed: PressedContext,
    question_ids: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
) -> list[int]:
    """Greedy answer to a question appended after a pressed context, positions continuing from the original length.

    The question goes through :func:`press_forward`, then :func:`xkv.generation.decode_n_tokens` (the one greedy
    loop) feeds each token back through it: the question and each generated token (but the last) are appended to
    ``pressed.cache`` uncompressed, as in :func:`xkv.generation.greedy_generate`; a second call continues after them.

    Args:
        model: the causal LM that prefilled ``pressed``.
        pressed: from :func:`press_prefill` with batch 1.
        question_ids: ``(1, tokens)`` question (and assistant-turn opening) token ids.
        max_new_tokens: at most this many tokens are generated.
        stop_ids: token ids that end generation (not included in the result).

    Returns:
        The generated token ids.

    Raises:
        ValueError: for ``question_ids`` not of shape ``(1, tokens)`` or ``max_new_tokens < 1``.
    """
    if question_ids.dim() != 2 or question_ids.shape[0] != 1 or question_ids.shape[1] == 0:
        raise ValueError(f"`question_ids` must have shape (1, tokens) but got {tuple(question_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1 but got {max_new_tokens}")
    logits = press_forward(model, pressed, question_ids)
    step = partial(press_forward, model, pressed)
    return decode_n_tokens(step, logits, max_new_tokens, stop_ids, question_ids.device).tokens


def press_cache_bytes(cache: DynamicCache) -> int:
    """Bytes a (pruned) ``DynamicCache`` holds, summed from its key and value storages (each counted once)."""
    return tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


def press_memory_report(pressed: PressedContext) -> MemoryReport:
    """What a pressed cache holds against a dense cache of the same dtype for every token seen.

    Tokens seen are the original context plus everything fed since (``context_length`` + growth of the cache).

    Args:
        pressed: from :func:`press_prefill`, before or after answering.

    Returns:
        ``held_bytes`` (measured, :func:`press_cache_bytes`) and ``dense_bytes``. No groups, and ``tail_bytes`` 0:
        in a ``DynamicCache`` the tokens appended after the pruned context share one tensor per layer with it, so
        there is no separate tail to measure.
    """
    cache = pressed.cache
    keys = cache.layers[0].keys
    batch, num_kv_heads, cached, head_dim = keys.shape  # (batch, kv_heads, kept + appended, head_dim)
    seen = pressed.context_length + cached - pressed.pressed_length
    return MemoryReport(
        held_bytes=press_cache_bytes(cache),
        dense_bytes=dense_kv_bytes(batch, seen, len(cache.layers), num_kv_heads * head_dim, keys.dtype),
    )
