"""What a cache's groups share at decode: positions of a left-padded prefix, RoPE tables, workspaces."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xkv.positions import PrefixAngles

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
        # What a buffer holds, where its contents outlive one layer (a group's dequantized token basis): a weak
        # reference to the source, so the buffer is refilled once the source changes or another group writes it.
        self.sources: dict[str, weakref.ref[object]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` backed by the buffer ``name`` (contents undefined)."""
        need = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < need or buffer.dtype != dtype or buffer.device != device:
            size = need + need // 16  # headroom for the tail: a new buffer every ~T/16 decode steps, not each one
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        self.sources.pop(name, None)  # a plain get() may overwrite the contents
        return buffer[:need].view(shape)

    def holding(self, name: str, source: object, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The buffer ``name`` filled with ``read()``, filled again only when ``source`` is not what it last held.

        For a read that every layer of a group repeats at each decode step (a quantized token basis): the group's
        first layer unpacks it into the buffer, the others reuse it. One buffer per name serves every group, so it
        costs one group's tensor, counted with the workspace.
        """
        held = self.sources.get(name)
        buffer = self.buffers.get(name)
        if held is not None and held() is source and buffer is not None:
            shape = self._shapes[name]
            return buffer[: math.prod(shape)].view(shape)
        value = read()
        out = self.get(name, tuple(value.shape), value.dtype, value.device)
        out.copy_(value)
        self.sources[name] = weakref.ref(source)
        self._shapes[name] = tuple(value.shape)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The buffers held."""
        return list(self.buffers.values())

    def reset(self) -> None:
        """Free the buffers."""
        self.buffers.clear()
        self.sources.clear()


@dataclass
class SelectiveCounts:
    """Layer steps Selective Reconstruction served, and how many rebuilt a widened budget (``sr_widen_below``).

    Attributes:
        steps: calls of the selective path (one per layer and decode step it served).
        widened: those that rebuilt ``sr_widen`` times the budget.
    """

    steps: int = 0
    widened: int = 0

    def add(self, widened: bool) -> None:
        """Count one layer step."""
        self.steps += 1
        self.widened += int(widened)

    @property
    def widened_share(self) -> float:
        """``widened / steps`` (0 before any step)."""
        return self.widened / self.steps if self.steps else 0.0


@dataclass
class DecodeRuntime:
    """What the groups of one cache share at decode.

    Attributes:
        fast: whether the model runs attention through ``"xkv"`` (:mod:`xkv.attention`), so the absorb and selective
            paths can see the query; if ``False`` every layer uses the rebuild path.
        table: RoPE angles of the prefix positions (``None`` for a model without RoPE).
        workspace: the rebuild path's buffers.
        counts: the selective path's layer steps, and how many of them widened their budget.
        pads: ``(batch,)`` left-padding tokens per sequence of a padded batch, else ``None``: sequence ``b``'s token
            at index ``i`` sits at RoPE position ``i - pads[b]``, and its first ``pads[b]`` rows are zero in the
            factors (padding never enters a basis).
    """

    fast: bool
    table: PrefixAngles | None
    workspace: Workspace = field(default_factory=Workspace)
    counts: SelectiveCounts = field(default_factory=SelectiveCounts)
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
