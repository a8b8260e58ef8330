"""What a cache's groups share at decode: positions of a left-padded prefix, RoPE tables, workspaces."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from xkv.compat import UpdateInputs
from xkv.rope import PrefixAngles, RotaryAngles

logger = logging.getLogger(__name__)


#: Updates of up to this many tokens use the configured fast decode path; longer ones (prefill chunks, questions)
#: the rebuild path. A 512-token chunk on the absorb path held ~75 MB of scores per layer at 4k (benchmarks/memory).
FAST_PATH_MAX_QUERIES = 16


class Workspace:
    """Buffers reused by every layer's rebuild (one layer is rebuilt at a time), with 1/16 headroom for the tail.

    The rebuild path returns views of these buffers from ``update``; attention reads them before the next layer
    overwrites them. They live as long as the cache: ``memory_report()`` counts them in ``held_bytes`` (and shows
    them as ``workspace_bytes``) from the first decode step on.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` backed by the buffer ``name`` (contents undefined)."""
        need = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < need or buffer.dtype != dtype or buffer.device != device:
            size = need + need // 16  # headroom for the tail: a new buffer every ~T/16 decode steps, not each one
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:need].view(shape)

    def tensors(self) -> list[torch.Tensor]:
        """The buffers held."""
        return list(self.buffers.values())

    def reset(self) -> None:
        """Free the buffers."""
        self.buffers.clear()


@dataclass
class DecodeRuntime:
    """What the groups of one cache share at decode.

    Attributes:
        fast: whether the model runs attention through ``"xkv"`` (:mod:`xkv.attention`), so the absorb and selective
            paths can see the query; if ``False`` every layer uses the rebuild path.
        table: RoPE angles of the prefix positions (``None`` for a model without RoPE).
        workspace: the rebuild path's buffers.
        pads: ``(batch,)`` left-padding tokens per sequence of a padded batch, else ``None``: sequence ``b``'s token
            at index ``i`` sits at RoPE position ``i - pads[b]``, and its first ``pads[b]`` rows are zero in the
            factors (padding never enters a basis).
    """

    fast: bool
    table: PrefixAngles | None
    workspace: Workspace = field(default_factory=Workspace)
    pads: torch.Tensor | None = None
    # The prefix's per-sequence cos/sin for ``pads``, built at the first decode step, not at every one:
    # (pads it was built for, tokens, cos, sin). Counted with the RoPE table.
    _padded: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def positions(self, start: int, stop: int, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, stop - start)`` RoPE positions of token indices ``start .. stop-1`` (padding rows: 0)."""
        index = torch.arange(start, stop, device=device).unsqueeze(0)
        if self.pads is None:
            return index.expand(batch, -1)
        return (index - self.pads.to(device).unsqueeze(1)).clamp(min=0)

    def padded_angles(self, tokens: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, tokens, rot_dim)`` float32 cos and sin of the prefix rows, each sequence at its own positions."""
        assert self.table is not None
        cos, sin = self.table.get(tokens, device)
        if self.pads is None:
            return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        held = self._padded
        if held is None or held[0] is not self.pads or held[1] != tokens or held[2].device != device:
            index = self.positions(0, tokens, batch, device)
            held = self._padded = (self.pads, tokens, cos[index], sin[index])
        return held[2], held[3]

    def padded_tensors(self) -> list[torch.Tensor]:
        """The per-sequence cos/sin tables held for a padded batch (empty otherwise)."""
        held = self._padded
        return [held[2], held[3]] if held is not None and held[0] is self.pads else []

    def real_rows(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """``(batch, tokens)`` bool, ``False`` on left padding; ``None`` for an unpadded batch."""
        if self.pads is None:
            return None
        return torch.arange(tokens, device=device).unsqueeze(0) >= self.pads.to(device).unsqueeze(1)


def left_padding(
    inputs: UpdateInputs, angles: RotaryAngles | None, batch: int, tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Left padding per sequence of a first prefill, read from its RoPE positions; ``None`` if there is none.

    Each sequence must sit at positions ``0..n-1`` after its ``T - n`` padding tokens (what ``generate`` gives a
    left-padded batch); padding rows may carry any position. Positions come from ``position_ids`` (5.24) or are
    matched from the cos/sin the model applied (5.2); without either, ``0..T-1`` is assumed.

    Returns:
        ``(batch,)`` int64 padding counts, or ``None`` if every sequence starts at position 0 at index 0.

    Raises:
        ValueError: for positions of any other pattern (custom ``position_ids``, a shifted start).
    """
    index = torch.arange(tokens, device=device).unsqueeze(0)
    if inputs.position_ids is not None:
        positions = inputs.position_ids.to(device).expand(batch, tokens)
        pads = tokens - 1 - positions[:, -1]
        valid = bool(((pads >= 0) & (pads < tokens)).all())
        if valid:
            real = index >= pads.unsqueeze(1)
            valid = bool(torch.equal(positions[real], (index - pads.unsqueeze(1))[real]))
    elif inputs.cos is not None and inputs.sin is not None and angles is not None:
        cos, sin = angles(index)  # (1, T, rot)
        given_cos, given_sin = inputs.cos.float().to(device), inputs.sin.float().to(device)
        if given_cos.shape[-1] != cos.shape[-1] or given_cos.shape[-2] != tokens:
            valid, pads = False, torch.zeros(batch, dtype=torch.long, device=device)
        else:
            given_cos, given_sin = given_cos.expand(batch, -1, -1), given_sin.expand(batch, -1, -1)
            # the last token's angles name its position: the nearest row of the table (RoPE's slowest frequency
            # turns by far less than a full circle over T tokens, so rows are distinct)
            gap = (given_cos[:, -1:] - cos).square().sum(-1) + (given_sin[:, -1:] - sin).square().sum(-1)
            pads = tokens - 1 - gap.argmin(-1)
            rows = (index - pads.unsqueeze(1)).clamp(min=0)
            real = (index >= pads.unsqueeze(1)).unsqueeze(-1)
            tol = 1e-4 if inputs.cos.dtype in (torch.float32, torch.float64) else 2e-2
            valid = bool(
                ((given_cos - cos[0][rows]).abs().le(tol) | ~real).all()
                and ((given_sin - sin[0][rows]).abs().le(tol) | ~real).all()
            )
    else:
        return None
    if not valid:
        # Positions are known from position_ids; from cos/sin only their match against 0..T-1, which failed.
        seen = f" (the last of {tokens} at {int(positions[:, -1].max())})" if inputs.position_ids is not None else ""
        raise ValueError(
            "XKVCache needs each sequence of the first prefill at RoPE positions 0..n-1 after its left padding "
            f"(as generate() gives a left-padded batch); the model used other positions{seen}. Custom position_ids "
            "are not supported, and transformers 5.2's generate(prefill_chunk_size=...) "
            "gives a first chunk the positions of the prompt's last tokens: prefill the context in one call, in "
            "chunks with xkv.generation.chunked_prefill, or use generate's chunked prefill on transformers >= 5.24."
        )
    return pads.long() if bool(pads.any()) else None
