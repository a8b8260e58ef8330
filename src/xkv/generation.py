"""Greedy generation split by phase (prefill, then one token at a time), for any transformers causal LM and cache.

Compression happens inside the cache at the prefill -> decode boundary; nothing here knows which cache it drives.
``model.generate(..., **xkv.compat.cache_kwargs(cache))`` works too; these loops exist so the demo, tests
and benchmarks can time each phase and append an uncompressed question after a compressed context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from xkv.compat import cache_kwargs


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run ``input_ids`` through the model into ``cache``.

    Args:
        model: a causal LM.
        input_ids: ``(batch, tokens)``, appended after whatever ``cache`` already holds.
        cache: any transformers cache (``XKVCache`` compresses during its first prefill).

    Returns:
        Logits of the last position, ``(batch, vocab)``.
    """
    past = cache.get_seq_length()
    positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
    # logits_to_keep=1: the LM head runs on the last position only (a 4k prefill would otherwise build ~800 MB).
    out = model(input_ids=input_ids, use_cache=True, cache_position=positions, logits_to_keep=1, **cache_kwargs(cache))
    return out.logits[:, -1, :]


@torch.no_grad()
def chunked_prefill(model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int) -> torch.Tensor:
    """Run ``input_ids`` through the model in forward passes of at most ``chunk_size`` tokens.

    Each chunk attends to what ``cache`` already holds plus its own tokens, so the prefill's transients (attention
    scores, MLP activations) scale with ``chunk_size`` instead of the whole prompt. An ``XKVCache`` with
    ``fold_tokens`` set folds each finished chunk into its factors; call ``cache.fold(0)`` afterwards to fold the
    last one too.

    Args:
        model: a causal LM.
        input_ids: ``(batch, tokens)``.
        cache: any transformers cache.
        chunk_size: tokens per forward pass.

    Returns:
        Logits of the last position, ``(batch, vocab)``.

    Raises:
        ValueError: for ``chunk_size < 1`` or an empty prompt.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1 but got {chunk_size}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must have shape (batch, tokens >= 1) but got {tuple(input_ids.shape)}")
    logits = None
    for part in input_ids.split(chunk_size, dim=1):
        logits = prefill(model, part, cache)
    assert logits is not None
    return logits


@torch.no_grad()
def decode_one_token(model: nn.Module, token: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One decode step: ``token`` ``(batch, 1)`` in, last logits ``(batch, vocab)`` out."""
    return prefill(model, token, cache)


@dataclass
class Generation:
    """Result of :func:`greedy_generate`.

    Attributes:
        tokens: generated token ids (batch 1), stop token excluded.
        prefill_s: wall time of the prefill.
        decode_s: wall time of all decode steps.
        steps: decode steps run.
    """

    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
) -> Generation:
    """Greedy decoding of one sequence through ``cache``.

    Args:
        model: a causal LM.
        input_ids: ``(1, tokens)``: the tokens not yet in ``cache`` (a whole prompt, or a question appended after a
            context already prefilled).
        cache: the cache to prefill and decode through.
        max_new_tokens: at most this many tokens are generated.
        stop_ids: token ids that end generation.

    Returns:
        The generated tokens and the time of each phase.

    Raises:
        ValueError: for a batch other than 1 or ``max_new_tokens < 1``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"`input_ids` must have shape (1, tokens) but got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1 but got {max_new_tokens}")
    stops = set(stop_ids or [])
    result = Generation()
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache)
    result.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(max_new_tokens):
        token = int(logits.argmax(dim=-1)[0])
        if token in stops:
            break
        result.tokens.append(token)
        if step == max_new_tokens - 1:
            break
        logits = decode_one_token(model, torch.tensor([[token]], device=input_ids.device), cache)
        result.steps += 1
    result.decode_s = time.perf_counter() - start
    return result
