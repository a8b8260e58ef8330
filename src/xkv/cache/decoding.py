"""A group's decode paths as objects: what ``update`` returns and how attention reads the prefix on each.

Three paths (:class:`Rebuild`, :class:`Absorb`, :class:`Selective`) share one interface, :meth:`DecodePath.inputs`:
the keys and values ``update`` hands attention. ``Rebuild`` returns the rebuilt prefix followed by the tail; the two
fast paths return the tail and leave a request (:mod:`xkv.attention`) that calls their :meth:`FastPath.attend` with
the query. :meth:`GroupDecode.choose_path` is the one place that decides which path serves, and logs why a fallback
was taken.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from xkv import attention
from xkv.adapters import ModelSpec
from xkv.cache.runtime import FAST_PATH_MAX_QUERIES, DecodeRuntime
from xkv.cache.side import Side
from xkv.config import XKVConfig
from xkv.decode import (
    SelectiveIndex,
    attend_absorbed,
    attend_selective,
    check_prefix_visible,
    group_queries,
    landmark_probs,
    prefix_mask,
    tail_mask,
    ungroup_output,
    widened_count,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What a fast path attends with, for one layer and step.

    Attributes:
        grouped: the query grouped per KV head, ``(b, H, M, hd)`` (``M`` query rows per head).
        tail_keys: the layer's exact tail keys ``(b, H, L, hd)``.
        tail_values: its tail values ``(b, H, L, hd)``.
        attention_mask: the model's mask, or ``None``.
        mask: the additive tail mask built from it, or ``None``.
        scaling: score scale.
        length: query tokens (``M = length * query heads per KV head``).
    """

    grouped: torch.Tensor
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    attention_mask: torch.Tensor | None
    mask: torch.Tensor | None
    scaling: float
    length: int


class DecodePath(ABC):
    """How attention reads a factored layer's prefix at decode."""

    #: The ``XKVConfig.decode`` value that asks for this path.
    name: ClassVar[str]

    @abstractmethod
    def inputs(
        self, group: GroupDecode, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(b, H, ·, hd)`` keys and values ``update`` returns to attention for layer ``slot`` of ``group``."""


class Rebuild(DecodePath):
    """Every layer's prefix rebuilt into a reused workspace, followed by the tail: the fallback every model gets."""

    name = "rebuild"

    def inputs(
        self, group: GroupDecode, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rebuilt prefix and the tail (views of the workspace)."""
        return group.keys.rebuilt_with_tail(slot, tail_keys), group.values.rebuilt_with_tail(slot, tail_values)


class FastPath(DecodePath):
    """A path that needs the query: ``update`` returns the tail, attention calls :meth:`attend`."""

    def inputs(
        self, group: GroupDecode, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact tail; a pending request carries the rest to :func:`xkv.attention.xkv_attention_forward`."""
        attend = functools.partial(self._attend, group, slot, tail_keys, tail_values)
        attention.leave(attention.PendingAttention(layer_idx, tail_keys, attend, group.runtime))
        return tail_keys, tail_values

    def _attend(
        self,
        group: GroupDecode,
        slot: int,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of ``query`` ``(b, Hq, q, hd)`` over the layer's prefix and tail: ``(b, q, Hq, hd)``."""
        heads = group.spec.num_kv_heads
        num_heads, length = query.shape[1], query.shape[2]
        grouped = group_queries(query, heads)
        mask = tail_mask(attention_mask, group.prefix_len, tail_keys.shape[-2], length, num_heads // heads,
                         query.device)  # fmt: skip
        out = self.attend(group, slot, Request(grouped, tail_keys, tail_values, attention_mask, mask, scaling, length))
        return ungroup_output(out.to(query.dtype), num_heads, length)

    @abstractmethod
    def attend(self, group: GroupDecode, slot: int, request: Request) -> torch.Tensor:
        """``(b, H, M, hd)`` attention output for ``request``'s grouped query over layer ``slot``'s prefix and tail."""


class Absorb(FastPath):
    """Keys rebuilt, values absorbed: ``(p @ U_v) @ B_v`` (the same attention as rebuilding)."""

    name = "absorb"

    def attend(self, group: GroupDecode, slot: int, request: Request) -> torch.Tensor:
        """Follows the model's mask over the prefix (left padding), or the padding the cache saw."""
        tokens, grouped, length = group.prefix_len, request.grouped, request.length
        hidden = prefix_mask(request.attention_mask, group.runtime.real_rows(tokens, grouped.device), tokens, length,
                             grouped.shape[2] // length)  # fmt: skip
        values = group.values
        assert values.factors is not None
        keys = group.keys.rebuilt_with_tail(slot, request.tail_keys[:, :, :0])
        return attend_absorbed(grouped, keys, values.factors, slot, request.tail_keys, request.tail_values,
                               request.scaling, request.mask, hidden, values.read_basis())  # fmt: skip


class Selective(FastPath):
    """Selective Reconstruction: only the chunks the query scores highest are rebuilt; values absorbed."""

    name = "selective"

    def attend(self, group: GroupDecode, slot: int, request: Request) -> torch.Tensor:
        """Its index is built for unpadded prefixes only (a mask hiding part of the prefix is refused)."""
        tokens = group.prefix_len
        check_prefix_visible(request.attention_mask, tokens)
        table = group.runtime.table
        angles = table.joint_table(tokens, request.grouped.device) if table is not None else None
        index, config = group.selective[slot], group.config
        assert group.keys.factors is not None and group.values.factors is not None
        budget = min(config.budget_chunks(tokens, index.chunk_size), index.num_chunks)
        probs = landmark_probs(request.grouped, index, request.scaling)
        widened = widened_count(probs, budget, config.sr_widen_below, config.sr_widen)
        group.runtime.counts.add(widened > budget)
        return attend_selective(
            request.grouped, index, group.keys.factors, group.values.factors, slot, angles, widened,
            request.tail_keys, request.tail_values, request.scaling, request.mask, shared=config.sr_select == "shared",
            probs=probs,
        )  # fmt: skip


#: The paths by ``XKVConfig.decode`` value.
PATHS: dict[str, DecodePath] = {path.name: path for path in (Rebuild(), Absorb(), Selective())}


class GroupDecode:
    """Which decode path serves a group's layers (mixed into :class:`~xkv.cache.store.XKVGroupStore`)."""

    index: int
    spec: ModelSpec
    config: XKVConfig
    runtime: DecodeRuntime
    keys: Side
    values: Side
    selective: dict[int, SelectiveIndex]
    prefix_len: int
    _fallbacks_logged: set[str]

    def choose_path(self, slot: int) -> DecodePath:
        """The path layer ``slot`` of this group decodes with: ``config.decode`` where it can serve, else a fallback.

        ``selective`` falls back to ``absorb`` where the layer holds no index; a fast path falls back to
        ``rebuild`` where the model does not run attention through ``"xkv"`` or a side is kept exact. Each fallback
        is logged once per reason.
        """
        wanted = PATHS[self.config.decode]
        if wanted.name == "rebuild":
            return wanted
        if not self.runtime.fast:
            return self._fallback(wanted, PATHS["rebuild"], "the model does not run attention through 'xkv'")
        if not (self.keys.factored and self.values.factored):
            reason = "a side of the prefix is kept exact (compress_keys/compress_values=false or a short prefill)"
            return self._fallback(wanted, PATHS["rebuild"], reason)
        if wanted.name == "selective" and slot not in self.selective:
            reason = (
                "the prefix is shorter than sr_min_tokens, was cropped or folded, the batch is left-padded, the "
                "landmarks did not fit the target ratio, or this copy's sr_* index settings differ from those its "
                "factors were built with: no Selective Reconstruction index"
            )
            return self._fallback(wanted, PATHS["absorb"], reason)
        return wanted

    def _fallback(self, wanted: DecodePath, used: DecodePath, reason: str) -> DecodePath:
        if reason not in self._fallbacks_logged:
            self._fallbacks_logged.add(reason)
            logger.info("group %d decodes with %r instead of %r: %s", self.index, used.name, wanted.name, reason)
        return used

    def decode_path(self, slot: int) -> str:
        """The name of the path :meth:`choose_path` picks for layer ``slot`` (for logs and reports)."""
        return self.choose_path(slot).name

    def attention_inputs(
        self, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor, new_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention gets for layer ``slot``: the chosen path's :meth:`DecodePath.inputs`.

        Updates of more than :data:`FAST_PATH_MAX_QUERIES` tokens (a prefill chunk, a long question) take the
        rebuild path: it is exact, and SDPA over the rebuilt prefix needs neither the fast paths' ``(queries,
        prefix)`` float32 score matrices nor their time.
        """
        path = self.choose_path(slot) if new_tokens <= FAST_PATH_MAX_QUERIES else PATHS["rebuild"]
        return path.inputs(self, slot, layer_idx, tail_keys, tail_values)
