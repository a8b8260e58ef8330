"""``XKVGroupStore``: one layer group's prefix (pending prefill, then its factors) and its decode glue."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from xkv.adapters import ModelSpec
from xkv.cache.base import CompressedStore, check_finite
from xkv.cache.decoding import GroupDecode
from xkv.cache.ranks import GroupRanks
from xkv.cache.runtime import DecodeRuntime
from xkv.cache.side import ExactSide, NoRotation, RopeRotation, Side, SideFrame, StoredSide
from xkv.compat import UpdateInputs
from xkv.config import SR_INDEX_FIELDS, XKVConfig
from xkv.decode import (
    SelectiveIndex,
    build_selective_index,
)
from xkv.forms import dtype_named
from xkv.groups import LayerGroup, build_groups
from xkv.positions import PrefixAngles, RotaryAngles

logger = logging.getLogger(__name__)


#: Settings the Selective Reconstruction index is built with: a copy at other settings cannot reuse it.
#: The tensors of one layer's index, in :meth:`SelectiveIndex.tensors` order (prefix-file names).
_INDEX_PARTS = ("landmarks", "landmark_scales", "exact_chunks", "exact_keys", "exact_values")


def _on_side(side: str, name: str, doc: str) -> Any:
    """A read-only property of the store reading ``name`` of its ``side`` (the names tests and analyses use)."""
    return property(lambda store: getattr(getattr(store, side), name), doc=doc)


class XKVGroupStore(GroupRanks, GroupDecode, CompressedStore):
    """State shared by the layers of one group: two sides (keys, values), the SR index, the prefix length.

    Each side (:mod:`xkv.cache.side`) holds its pending prefill, then its stored form: factors, or exact states
    where the config keeps that side exact or the prefill was shorter than ``min_tokens``.

    Args:
        group: the layers of the group.
        config: the cache's configuration.
        num_groups: groups in the cache (to resolve per-group rank lists).
        spec: the model's attention geometry.
        angles: RoPE cos/sin at given positions (``None`` for a model without RoPE).
        runtime: decode state shared by the cache's groups; a private one (rebuild path only) if ``None``.
    """

    def __init__(
        self,
        group: LayerGroup,
        config: XKVConfig,
        num_groups: int,
        spec: ModelSpec,
        angles: RotaryAngles | None,
        runtime: DecodeRuntime | None = None,
    ):
        self.group = group
        self.runtime = runtime or DecodeRuntime(False, PrefixAngles(angles) if angles is not None else None)
        self._fallbacks_logged: set[str] = set()
        self.index = group.index
        self.layers = group.layers
        self.config = config
        self.spec = spec
        self.angles = angles
        key_rotation = RopeRotation(angles, self.runtime) if angles is not None else NoRotation()
        self._frames = (
            SideFrame("keys", "k", group.index, group.size, spec, config, self.runtime,
                      config.rank_setting("k", group.index, num_groups), key_rotation),
            SideFrame("values", "v", group.index, group.size, spec, config, self.runtime,
                      config.rank_setting("v", group.index, num_groups), NoRotation()),
        )  # fmt: skip
        self._compress = (config.compress_keys, config.compress_values)
        self._reset_state()

    def _reset_state(self, exact_prefill: bool = False) -> None:
        # Set by the cache for a prefill shorter than `config.min_tokens`: the group keeps it exact.
        self._exact_prefill = exact_prefill
        self.keys, self.values = (
            StoredSide(frame) if compress and not exact_prefill else ExactSide(frame)
            for frame, compress in zip(self._frames, self._compress, strict=True)
        )
        self.dtype: torch.dtype | None = None  # the model's, set at the first prefill
        self.prefix_len = 0
        # Selective Reconstruction: landmarks and exact chunks per slot (built at prefill when decode="selective").
        self.selective: dict[int, SelectiveIndex] = {}
        # False when the index's bytes would leave a side no rank at the target (`plan_index`).
        self.index_fits = True

    @property
    def sides(self) -> tuple[Side, Side]:
        """``(keys, values)``."""
        return self.keys, self.values

    # ------------------------------------------------------------------ names tests and analyses read
    exact_prefill = property(
        lambda self: self._exact_prefill, doc="Whether this prefill is kept exact (< min_tokens)."
    )
    setting_k = _on_side("keys", "setting", "The keys' rank setting.")
    setting_v = _on_side("values", "setting", "The values' rank setting.")
    key_factors = _on_side("keys", "factors", "The keys' factors (``None`` for keys kept exact).")
    value_factors = _on_side("values", "factors", "The values' factors (``None`` for values kept exact).")
    exact_keys = _on_side("keys", "exact", "Per slot the exact keys, post-RoPE (``None`` for factored keys).")
    exact_values = _on_side("values", "exact", "Per slot the exact values (``None`` for factored values).")
    pending_keys = _on_side("keys", "pending", "Slot -> keys of a prefill waiting for the rest of the group.")
    rank_k = _on_side("keys", "rank", "Directions of the keys' factors (``None`` for keys kept exact).")
    rank_v = _on_side("values", "rank", "Directions of the values' factors (``None`` for values kept exact).")

    # ------------------------------------------------------------------ rank budget
    def begin_prefill(self, exact: bool, tokens: int, dtype: torch.dtype) -> None:
        """Start a first prefill of ``tokens`` tokens, exact if ``exact``; check its ranks (:meth:`plan_index`)."""
        self._reset_state(exact)
        self.plan_index(tokens, dtype)

    @property
    def is_ready(self) -> bool:
        """Whether the group's prefix has been factored."""
        return self.prefix_len > 0 and not self.pending_keys

    def ranks(self) -> tuple[int | None, int | None]:
        """``(rank_k, rank_v)`` of the factors (``None`` for a side kept exact)."""
        return self.rank_k, self.rank_v

    # ------------------------------------------------------------------ prefill
    def add_prefill(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, inputs: UpdateInputs):
        """Hold one layer's prefill states; factor the group once its last layer has arrived.

        Args:
            slot: position of the layer in the group.
            key_states: ``(batch, kv_heads, tokens, head_dim)``, post-RoPE (as attention hands them over).
            value_states: ``(batch, kv_heads, tokens, head_dim)``.
            inputs: RoPE angles the model used, when the transformers version passes them.
        """
        tokens = key_states.shape[-2]
        if self.pending_keys and tokens != self.prefix_len:
            raise RuntimeError(
                f"layer {self.group.layers[slot]} prefilled {tokens} tokens, its group started with {self.prefix_len}"
            )
        if self.keys.factored or self.values.factored:
            check_finite(self.group.layers[slot], key_states, value_states)  # before anything of it is held
        self.prefix_len = tokens
        self.dtype = key_states.dtype
        self.keys.hold(slot, key_states, inputs)
        self.values.hold(slot, value_states, inputs)
        config = self.config
        if self.builds_index(tokens):
            self.selective[slot] = build_selective_index(
                key_states, value_states, config.sr_chunk_size, config.sr_sink_chunks, config.sr_local_chunks,
                config.sr_outlier_chunks, bounds=config.sr_landmarks == "bounds",
            )  # fmt: skip
        if len(self.pending_keys) == self.group.size:
            self._factor()

    def _factor(self) -> None:
        assert self.dtype is not None
        ranks = self.check_ranks(self.prefix_len, self.dtype)
        # With folding and headroom, later chunks will be folded in: keep room for directions they will need.
        # The factors then stay in the model's dtype until `XKVCache.fold()` stores them in their form.
        headroom = self.config.fold_headroom and self.config.fold_tokens > 0
        rooms = self.headroom_ranks(self.prefix_len) if headroom else ranks
        budgets = self.side_bytes(self.prefix_len, self.dtype)
        for side, room, budget in zip(self.sides, rooms, budgets, strict=True):
            side.factor(room, headroom, self.prefix_len, self.dtype, budget)

    def fold(self, tails: list[tuple[torch.Tensor, torch.Tensor]], count: int, headroom: bool = False) -> None:
        """Fold the ``count`` oldest tail tokens of every layer into the prefix (the caller drops them from the tails).

        Keys are un-rotated at their positions ``prefix_len .. prefix_len + count - 1``; each factored side gets
        the new rows by an incremental SVD (:func:`xkv.factorization.append_rows`) at the ranks resolved for the new
        length (at most ``rank + count``); a quantized side is dequantized, folded and quantized again. A side kept
        exact gets the tokens appended. Selective Reconstruction's index no longer covers the prefix and is dropped
        (decode falls back to ``"absorb"``).

        Args:
            tails: per slot, the layer's exact tail ``(keys, values)``, each ``(b, H, L, hd)``, keys post-RoPE.
            count: tokens to fold, ``1 <= count <= L``.
            headroom: keep up to :meth:`headroom_ranks` directions instead of the new length's ranks (:meth:`trim`
                cuts back).
        """
        assert self.is_ready and self.dtype is not None
        for slot, (keys, values) in enumerate(tails):
            check_finite(self.group.layers[slot], keys[:, :, :count], values[:, :, :count])
        start, tokens = self.prefix_len, self.prefix_len + count
        self.selective = {}  # its chunks describe the old prefix; no bytes are reserved for it from here on
        ranks = self.headroom_ranks(tokens) if headroom else self.check_ranks(tokens, self.dtype)
        parts = ([keys[:, :, :count] for keys, _ in tails], [values[:, :, :count] for _, values in tails])
        budgets = self.side_bytes(tokens, self.dtype)
        for side, rank, new, budget in zip(self.sides, ranks, parts, budgets, strict=True):
            side.fold(new, start, rank, headroom, self.dtype, budget)
        self.prefix_len = tokens

    def trim(self) -> bool:
        """Bring factors to the ranks resolved at the prefix's length and to their storage form; whether any changed.

        Folds with ``fold_headroom`` leave more directions, in the model's dtype; a quantized side holding too many
        is dequantized, cut and quantized again.
        """
        if not self.is_ready or self.exact_prefill:
            return False
        assert self.dtype is not None
        ranks = self.check_ranks(self.prefix_len, self.dtype)
        budgets = self.side_bytes(self.prefix_len, self.dtype)
        cut = [
            side.trim(rank, self.prefix_len, self.dtype, budget)
            for side, rank, budget in zip(self.sides, ranks, budgets, strict=True)
        ]
        return any(cut)

    def truncated(self, config: XKVConfig, num_groups: int, runtime: DecodeRuntime | None = None) -> XKVGroupStore:
        """A copy of this factored store keeping the first ``r`` singular directions of each side.

        With exact SVD factors this equals factoring the same prefix at rank ``r`` (singular values are sorted), so
        one full-rank factorization serves every lower rank (e.g. several target factors in an evaluation).

        Args:
            config: settings whose ranks are resolved for this group and its prefix length.
            num_groups: groups in the cache (for per-group rank lists).
            runtime: decode state of the copy's cache (this store's if ``None``).

        Raises:
            ValueError: if the store is not factored, a side asked for is not factored here, or a rank exceeds the
                rank held.
        """
        if not self.is_ready or self.exact_prefill:
            raise ValueError(f"group {self.index} holds no factors to truncate")
        new = XKVGroupStore(self.group, config, num_groups, self.spec, self.angles, runtime or self.runtime)
        if (
            config.decode == "selective"
            and self.prefix_len >= config.sr_min_tokens
            and all(getattr(config, name) == getattr(self.config, name) for name in SR_INDEX_FIELDS)
        ):
            new.selective = dict(self.selective)  # rank-independent, never edited in place
        new.prefix_len = self.prefix_len
        new.dtype = self.dtype
        assert self.dtype is not None
        ranks = new.affordable_ranks(self.prefix_len, self.dtype)
        if ranks is None:  # the index does not fit these ranks' budget: decode with "absorb"
            new.selective = {}
            ranks = new.check_ranks(self.prefix_len, self.dtype)
        budgets = new.side_bytes(self.prefix_len, self.dtype)
        for side, source, rank, budget in zip(new.sides, self.sides, ranks, budgets, strict=True):
            side.take_truncated(source, rank, self.prefix_len, self.dtype, budget)
        return new

    # ------------------------------------------------------------------ rebuild
    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer, rebuilt from the factors."""
        return self.keys.rebuild(slot)

    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer, rebuilt from the factors."""
        return self.values.rebuild(slot)

    # ------------------------------------------------------------------ bookkeeping
    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the factored prefix.

        The factors (or exact sides), and Selective Reconstruction's landmarks and exact chunks.
        """
        tensors: list[torch.Tensor] = [t for index in self.selective.values() for t in index.tensors()]
        return tensors + self.keys.tensors() + self.values.tensors()

    def pending_tensors(self) -> list[torch.Tensor]:
        """Prefill tensors held until the group is complete."""
        return list(self.keys.pending.values()) + list(self.values.pending.values())

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every held tensor (batch-dimension edits: beam reorder, select, repeat)."""
        for side in self.sides:
            side.map(fn)
        self.selective = {slot: index.map(fn) for slot, index in self.selective.items()}

    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens (rows of the token basis; the reconstruction is unchanged)."""
        if length >= self.prefix_len:
            return
        if length <= 0:
            self._reset_state()
            return
        self.selective = {}  # its chunks described the whole prefix: decode falls back to "absorb"
        for side in self.sides:
            side.crop(length)
        self.prefix_len = length

    def reset(self) -> None:
        """Drop everything held."""
        self._reset_state()

    # ------------------------------------------------------------------ state (prefix files)
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a finished group holds: ``(tensors by name, metadata)`` (:mod:`xkv.cache.io` writes them).

        Names: ``k.<name>``/``v.<name>`` for each side (:meth:`Side.state`), ``sr<slot>.<part>`` for the index.
        """
        meta: dict[str, Any] = {
            "layers": list(self.layers), "prefix_len": self.prefix_len, "rank_k": self.rank_k, "rank_v": self.rank_v,
            "exact_prefill": self.exact_prefill, "dtype": str(self.dtype).removeprefix("torch."),
            "selective": {str(slot): index.chunk_size for slot, index in self.selective.items()},
        }  # fmt: skip
        tensors: dict[str, torch.Tensor] = {}
        for side in self.sides:
            named, meta[side.frame.letter] = side.state()
            tensors.update({f"{side.frame.letter}.{name}": t for name, t in named.items()})
        for slot, index in self.selective.items():
            tensors.update({f"sr{slot}.{n}": t for n, t in zip(_INDEX_PARTS, index.tensors(), strict=True)})
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Hold what :meth:`state` described (checked beforehand by :func:`xkv.prefix.check_layout`)."""
        self._reset_state(bool(meta["exact_prefill"]))
        self.prefix_len, self.dtype = meta["prefix_len"], dtype_named(meta["dtype"])
        for side in self.sides:
            head = f"{side.frame.letter}."
            side.load_state(
                {n[len(head) :]: t for n, t in tensors.items() if n.startswith(head)}, meta[side.frame.letter]
            )
        for slot, chunk in meta["selective"].items():
            parts = [tensors[f"sr{slot}.{n}"] for n in _INDEX_PARTS]
            self.selective[int(slot)] = SelectiveIndex(int(chunk), *parts)


def _kept_dense(config: XKVConfig, spec: ModelSpec) -> tuple[int, ...]:
    """Layers outside every group: ``config.dense_layers`` and the model's sliding-window layers."""
    return tuple(sorted(set(config.dense_layers) | set(spec.sliding_layers)))


def effective_config(config: XKVConfig, spec: ModelSpec) -> XKVConfig:
    """``config`` as a model of ``spec`` runs it: for MLA the values (the RoPE part ``k_pe``) are kept exact."""
    if spec.latent_attention and config.compress_values:
        # MLA: the cache's values are the rotated shared key part k_pe, which the paper keeps exact.
        logger.info("%s: factoring the MLA latent; its RoPE part (k_pe) is kept exact", spec.model_type)
        return dataclasses.replace(config, compress_values=False)
    return config


def groups_for(config: XKVConfig, spec: ModelSpec) -> list[LayerGroup]:
    """The layer groups ``config`` asks for on a model of ``spec`` (sliding-window layers never join one)."""
    return build_groups(
        spec.num_layers, config.group_size, config.grouping, config.first_layer, config.last_layer,
        _kept_dense(config, spec), config.groups,
    )  # fmt: skip
