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
from xkv.rope import left_padded_positions


@torch.no_grad()
def prefill(
    model: nn.Module, input_ids: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``input_ids`` through the model into ``cache``.

    Args:
        model: a causal LM.
        input_ids: ``(batch, tokens)``, appended after whatever ``cache`` already holds.
        cache: any transformers cache (``XKVCache`` compresses during its first prefill).
        attention_mask: ``(batch, cached + tokens)``, 0 on left padding, for a padded batch; each sequence then
            gets RoPE positions ``0, 1, ...`` from its first real token, as ``generate`` gives it.

    Returns:
        Logits of the last position, ``(batch, vocab)``.

    Raises:
        ValueError: for an ``attention_mask`` of the wrong shape.
    """
    past = cache.get_seq_length()
    batch, tokens = input_ids.shape
    positions = torch.arange(past, past + tokens, device=input_ids.device)
    extra: dict[str, torch.Tensor] = {}
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, past + tokens):
            raise ValueError(
                f"`attention_mask` must have shape (batch, cached + new tokens) = {(batch, past + tokens)} but got "
                f"{tuple(attention_mask.shape)}"
            )
        position_ids = left_padded_positions(attention_mask)[:, past:]
        extra = {"attention_mask": attention_mask, "position_ids": position_ids}
    # logits_to_keep=1: the LM head runs on the last position only (a 4k prefill would otherwise build ~800 MB).
    out = model(
        input_ids=input_ids, use_cache=True, cache_position=positions, logits_to_keep=1, **extra, **cache_kwargs(cache)
    )
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
def decode_one_token(
    model: nn.Module, token: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One decode step: ``token`` ``(batch, 1)`` in, last logits ``(batch, vocab)`` out (mask: see :func:`prefill`)."""
    return prefill(model, token, cache, attention_mask)


@dataclass
class Generation:
    """Result of :func:`greedy_generate`.

    Attributes:
        sequences: per sequence of the batch, its generated token ids (stop token excluded).
        prefill_s: wall time of the prefill.
        decode_s: wall time of all decode steps.
        steps: decode steps run.
    """

    sequences: list[list[int]] = field(default_factory=lambda: [[]])
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0

    @property
    def tokens(self) -> list[int]:
        """The generated token ids of a batch of one.

        Raises:
            ValueError: for a batch of several sequences (read ``sequences``).
        """
        if len(self.sequences) != 1:
            raise ValueError(f"`tokens` is for a batch of one; this generation has {len(self.sequences)} sequences")
        return self.sequences[0]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Generation:
    """Greedy decoding through ``cache``, one sequence or a batch.

    A sequence ends at its first stop token (or after ``max_new_tokens``); the others go on. Each finished
    sequence is fed its last token again while the batch runs, and nothing more is recorded for it.

    Args:
        model: a causal LM.
        input_ids: ``(batch, tokens)``: the tokens not yet in ``cache`` (a whole prompt, or a question appended
            after a context already prefilled).
        cache: the cache to prefill and decode through.
        max_new_tokens: at most this many tokens are generated per sequence.
        stop_ids: token ids that end a sequence.
        attention_mask: ``(batch, cached + tokens)``, 0 on left padding, for a left-padded batch.

    Returns:
        The generated tokens per sequence and the time of each phase.

    Raises:
        ValueError: for ``input_ids`` that are not ``(batch, tokens)``, ``max_new_tokens < 1``, or a mask of the
            wrong shape.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"`input_ids` must have shape (batch, tokens) but got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1 but got {max_new_tokens}")
    stops = set(stop_ids or [])
    batch = input_ids.shape[0]
    result = Generation(sequences=[[] for _ in range(batch)])
    done = [False] * batch
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache, attention_mask)
    result.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(max_new_tokens):
        chosen = logits.argmax(dim=-1)
        for i, token in enumerate(chosen.tolist()):
            if done[i] or token in stops:
                done[i] = True
                continue
            result.sequences[i].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        last = torch.tensor([seq[-1] if seq else int(chosen[i]) for i, seq in enumerate(result.sequences)])
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        logits = prefill(model, last.view(batch, 1).to(input_ids.device), cache, attention_mask)
        result.steps += 1
    result.decode_s = time.perf_counter() - start
    return result
