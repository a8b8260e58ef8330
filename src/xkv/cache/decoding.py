"""A group's decode glue: which path a layer decodes with, and what ``update`` and attention get on each."""

from __future__ import annotations

import functools
import logging

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
    prefix_mask,
    tail_mask,
    ungroup_output,
)

logger = logging.getLogger(__name__)


class GroupDecode:
    """Decode paths of a group's layers (mixed into :class:`~xkv.cache.store.XKVGroupStore`).

    ``"rebuild"`` hands attention the rebuilt prefix and the tail; ``"absorb"`` and ``"selective"`` leave a pending
    request that :mod:`xkv.attention` serves with the query, reading the factors directly.
    """

    index: int
    spec: ModelSpec
    config: XKVConfig
    runtime: DecodeRuntime
    keys: Side
    values: Side
    selective: dict[int, SelectiveIndex]
    prefix_len: int
    _fallbacks_logged: set[str]

    def decode_path(self, slot: int) -> str:
        """The path this group's layer at ``slot`` decodes with.

        ``config.decode`` where it can serve, else a fallback, logged once per reason.
        """
        wanted = self.config.decode
        reason = None
        if wanted == "rebuild":
            return wanted
        if not self.runtime.fast:
            reason = "the model does not run attention through 'xkv'"
        elif not (self.keys.factored and self.values.factored):
            reason = "a side of the prefix is kept exact (compress_keys/compress_values=false or a short prefill)"
        elif wanted == "selective" and slot not in self.selective:
            reason = (
                "the prefix is shorter than sr_min_tokens, was cropped or folded, the batch is left-padded, or the "
                "landmarks did not fit the target ratio: no Selective Reconstruction index"
            )
            if reason not in self._fallbacks_logged:
                self._fallbacks_logged.add(reason)
                logger.info("group %d decodes with 'absorb' instead of 'selective': %s", self.index, reason)
            return "absorb"
        if reason is not None:
            if reason not in self._fallbacks_logged:
                self._fallbacks_logged.add(reason)
                logger.info("group %d decodes with 'rebuild' instead of %r: %s", self.index, wanted, reason)
            return "rebuild"
        return wanted

    def attention_inputs(
        self, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor, new_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild path: prefix and tail in one reused workspace. Fast paths: the tail, plus a pending request.

        On the fast paths attention itself (:func:`xkv.attention.xkv_attention_forward`) reads the factors; the
        tensors returned here are the exact tail only. Updates of more than :data:`FAST_PATH_MAX_QUERIES` tokens
        (a prefill chunk, a long question) take the rebuild path: it is exact, and SDPA over the rebuilt prefix
        needs neither the fast paths' ``(queries, prefix)`` float32 score matrices nor their time.
        """
        path = self.decode_path(slot) if new_tokens <= FAST_PATH_MAX_QUERIES else "rebuild"
        if path == "rebuild":
            return self.keys.rebuilt_with_tail(slot, tail_keys), self.values.rebuilt_with_tail(slot, tail_values)
        attend = functools.partial(self._attend, slot, path, tail_keys, tail_values)
        attention.leave(attention.PendingAttention(layer_idx, tail_keys, attend, self.runtime))
        return tail_keys, tail_values

    def _attend(
        self,
        slot: int,
        path: str,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of ``query`` ``(b, Hq, q, hd)`` over this layer's prefix and tail: ``(b, q, Hq, hd)``."""
        key_factors, value_factors = self.keys.factors, self.values.factors
        assert key_factors is not None and value_factors is not None
        tokens, heads = self.prefix_len, self.spec.num_kv_heads
        num_heads, length = query.shape[1], query.shape[2]
        hidden = None
        if path == "absorb":  # follows the model's mask over the prefix (left padding), or the padding it saw
            hidden = prefix_mask(attention_mask, self.runtime.real_rows(tokens, query.device), tokens, length,
                                 num_heads // heads)  # fmt: skip
        else:  # Selective Reconstruction's index is built for unpadded prefixes only
            check_prefix_visible(attention_mask, tokens)
        grouped = group_queries(query, heads)
        mask = tail_mask(attention_mask, tokens, tail_keys.shape[-2], length, num_heads // heads, query.device)
        if path == "absorb":
            keys = self.keys.rebuilt_with_tail(slot, tail_keys[:, :, :0])
            out = attend_absorbed(
                grouped, keys, value_factors, slot, tail_keys, tail_values, scaling, mask, hidden
            )  # fmt: skip
        else:
            table = self.runtime.table
            angles = table.joint_table(tokens, query.device) if table is not None else None
            out = attend_selective(
                grouped, self.selective[slot], key_factors, value_factors, slot, angles,
                self.config.budget_chunks(tokens, self.selective[slot].chunk_size), tail_keys, tail_values, scaling,
                mask,
            )  # fmt: skip
        return ungroup_output(out.to(query.dtype), num_heads, length)
