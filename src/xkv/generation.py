"""Greedy generation split by phase, as in gpt-fast's ``generate.py``, for any transformers causal LM and cache.

:func:`prefill` (or :func:`chunked_prefill`) fills the cache, :func:`decode_one_token` runs one step and
:func:`decode_n_tokens` is the one greedy loop: the CLI and :func:`greedy_generate`, the evaluation's methods and the
kvpress baselines (whose :data:`Step` shifts positions) all decode through it; ``xkv bench`` times :func:`prefill`
and :func:`decode_one_token` directly. Compression happens inside the cache at the prefill -> decode boundary;
nothing here knows which cache it drives. ``model.generate(..., **xkv.compat.cache_kwargs(cache))`` works too;
these functions exist so the demo, tests and benchmarks can time each phase and append an uncompressed question
after a compressed context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from xkv.compat import cache_kwargs
from xkv.positions import left_padded_positions


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
    """Result of :func:`greedy_generate` and :func:`decode_n_tokens`.

    Attributes:
        sequences: per sequence of the batch, its generated token ids (stop token excluded).
        prefill_s: wall time of the prefill (0 from :func:`decode_n_tokens`, which runs none).
        decode_s: wall time of all decode steps (0 from :func:`decode_n_tokens`, which does not time).
        steps: decode steps run (forward passes after the prefill).
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


#: One forward pass after the prefill: token ids ``(batch, tokens)`` in, last logits ``(batch, vocab)`` out; it
#: appends the tokens to the cache it drives (:func:`decode_one_token`, or a press's shifted positions).
Step = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def decode_n_tokens(
    step: Step,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Collection[int] | None = None,
    device: torch.device | str | None = None,
) -> Generation:
    """The greedy loop: pick each sequence's token from ``logits``, record it, feed the batch's tokens to ``step``.

    A sequence ends at its first stop token (not recorded) or after ``max_new_tokens``; the others go on. Each
    finished sequence is fed its last token again while the batch runs, and nothing more is recorded for it. No
    step runs after the last token, so the cache holds the prompt and every generated token but the last.

    Args:
        step: see :data:`Step`.
        logits: ``(batch, vocab)``, the last position's logits of the prefill.
        max_new_tokens: at most this many tokens per sequence (0: none).
        stop_ids: token ids that end a sequence.
        device: where ``step`` takes its token ids; ``logits``'s device by default.

    Returns:
        The tokens per sequence and the steps run (no timings).
    """
    stops = set(stop_ids or [])
    batch = logits.shape[0]
    result = Generation(sequences=[[] for _ in range(batch)])
    done = [False] * batch
    for index in range(max_new_tokens):
        chosen = logits.argmax(dim=-1).tolist()
        for i, token in enumerate(chosen):
            done[i] = done[i] or token in stops
            if not done[i]:
                result.sequences[i].append(token)
        if all(done) or index == max_new_tokens - 1:
            break
        last = [seq[-1] if seq else chosen[i] for i, seq in enumerate(result.sequences)]
        logits = step(torch.tensor(last, device=device or logits.device).view(batch, 1))
        result.steps += 1
    return result


def cache_step(model: nn.Module, cache: Cache, attention_mask: torch.Tensor | None = None) -> Step:
    """A :data:`Step` through ``cache`` (:func:`prefill` of the ids fed), a left-padding mask growing with them.

    Args:
        model: a causal LM.
        cache: the cache the prefill filled.
        attention_mask: ``(batch, cached)``, what the cache holds so far, or ``None`` for no padding.
    """
    mask = attention_mask

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(input_ids.shape[0], input_ids.shape[1])], dim=1)
        return prefill(model, input_ids, cache, mask)

    return step


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Generation:
    """Greedy decoding through ``cache``, one sequence or a batch: :func:`prefill`, then :func:`decode_n_tokens`.

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
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache, attention_mask)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    step = cache_step(model, cache, attention_mask)
    result = decode_n_tokens(step, logits, max_new_tokens, stop_ids, input_ids.device)
    result.decode_s = time.perf_counter() - start
    result.prefill_s = prefill_s
    return result
