"""``XKVGroupStore``: one layer group's prefix (pending prefill, then its factors) and its decode glue."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from xkv import attention
from xkv.adapters import ModelSpec
from xkv.cache.base import CompressedStore, check_finite
from xkv.cache.runtime import FAST_PATH_MAX_QUERIES, DecodeRuntime
from xkv.cache.side import ExactSide, NoRotation, RopeRotation, Side, SideFrame, StoredSide
from xkv.compat import UpdateInputs
from xkv.config import ResolvedRank, XKVConfig
from xkv.decode import (
    SelectiveIndex,
    attend_absorbed,
    attend_selective,
    build_selective_index,
    check_prefix_visible,
    group_queries,
    prefix_mask,
    selective_index_bytes,
    tail_mask,
    ungroup_output,
)
from xkv.factorization import (
    UnreachableRatioError,
)
from xkv.forms import StoredFactors, dtype_named
from xkv.groups import LayerGroup, build_groups
from xkv.rope import PrefixAngles, RotaryAngles

logger = logging.getLogger(__name__)


#: Settings the Selective Reconstruction index is built with: a copy at other settings cannot reuse it.
_INDEX_FIELDS = ("sr_chunk_size", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks")
#: The tensors of one layer's index, in :meth:`SelectiveIndex.tensors` order (prefix-file names).
_INDEX_PARTS = ("landmarks", "landmark_scales", "exact_chunks", "exact_keys", "exact_values")


class XKVGroupStore(CompressedStore):
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
    @property
    def exact_prefill(self) -> bool:
        """Whether this prefill is kept exact (shorter than ``min_tokens``)."""
        return self._exact_prefill

    @property
    def setting_k(self) -> ResolvedRank:
        """The keys' rank setting."""
        return self.keys.frame.setting

    @property
    def setting_v(self) -> ResolvedRank:
        """The values' rank setting."""
        return self.values.frame.setting

    @property
    def key_factors(self) -> StoredFactors | None:
        """The keys' factors (``None`` for keys kept exact)."""
        return self.keys.factors

    @property
    def value_factors(self) -> StoredFactors | None:
        """The values' factors (``None`` for values kept exact)."""
        return self.values.factors

    @property
    def exact_keys(self) -> list[torch.Tensor] | None:
        """Per slot the exact keys ``(b, H, T, hd)``, post-RoPE (``None`` for factored keys)."""
        return self.keys.exact

    @property
    def exact_values(self) -> list[torch.Tensor] | None:
        """Per slot the exact values (``None`` for factored values)."""
        return self.values.exact

    @property
    def pending_keys(self) -> dict[int, torch.Tensor]:
        """Slot -> keys of a prefill waiting for the rest of the group."""
        return self.keys.pending

    @property
    def rank_k(self) -> int | None:
        """Directions of the keys' factors (``None`` for keys kept exact)."""
        return self.keys.rank

    @property
    def rank_v(self) -> int | None:
        """Directions of the values' factors (``None`` for values kept exact)."""
        return self.values.rank

    # ------------------------------------------------------------------ rank budget
    def begin_prefill(self, exact: bool, tokens: int, dtype: torch.dtype) -> None:
        """Start a first prefill of ``tokens`` tokens, exact if ``exact``; check its ranks (:meth:`plan_index`)."""
        self._reset_state(exact)
        self.plan_index(tokens, dtype)

    def headroom_ranks(self, tokens: int) -> tuple[int | None, int | None]:
        """Ranks a prefix of unbounded length would get, capped by what ``tokens`` tokens allow (``fold_headroom``)."""
        assert self.dtype is not None
        bound = min(tokens, self.group.size * self.spec.kv_dim)
        now, long = self.check_ranks(tokens, self.dtype), self.check_ranks(1 << 40, self.dtype)
        return self.keys.widened(now[0], long[0], bound), self.values.widened(now[1], long[1], bound)

    def check_ranks(self, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None]:
        """Resolve both ranks for a prefill of ``tokens`` tokens in ``dtype`` without changing any state.

        A compression factor counts the bytes of ``config.factor_form`` against a dense cache in ``dtype``; a side
        kept exact has no rank (``None``).

        Raises:
            ValueError: if a rank does not fit the data; the message names the field and the group.
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        reserved = self._index_reservations(tokens, itemsize, [self.setting_k, self.setting_v])
        return self.keys.resolve(tokens, itemsize, reserved[0]), self.values.resolve(tokens, itemsize, reserved[1])

    def plan_index(self, tokens: int, dtype: torch.dtype) -> None:
        """Check the ranks of a first prefill; drop Selective Reconstruction's index where it does not fit.

        A short prefix at a high factor may not afford the landmarks and exact chunks on top of rank 1, and at a
        high factor they may take more than ``sr_max_share`` of the bytes: the group then decodes with ``"absorb"``
        (logged) instead of failing or starving its factors.

        Raises:
            UnreachableRatioError: if a rank does not fit even without the index.
        """
        self.index_fits = True
        if self.affordable_ranks(tokens, dtype) is None:
            self.index_fits = False
            self.check_ranks(tokens, dtype)
            logger.info(
                "group %d: Selective Reconstruction's landmarks and exact chunks do not fit the target at %d tokens "
                "(more than sr_max_share=%g of its bytes); it decodes with 'absorb'",
                self.group.index, tokens, self.config.sr_max_share,
            )  # fmt: skip

    def affordable_ranks(self, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None] | None:
        """The ranks with the index paid for, or ``None`` where the index does not fit.

        It does not fit when it would leave a side no rank or take more than ``sr_max_share`` of the budget.

        Raises:
            UnreachableRatioError: if a rank does not fit and no index is reserved for.
        """
        try:
            ranks = self.check_ranks(tokens, dtype)
        except UnreachableRatioError:
            if not self._holds_index(tokens):
                raise
            return None
        return ranks if self.index_share(tokens, dtype) <= self.config.sr_max_share else None

    def index_share(self, tokens: int, dtype: torch.dtype) -> float:
        """The fraction of this group's byte budget Selective Reconstruction's index would take (0 without one)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        settings = [self.setting_k, self.setting_v]
        budget = sum(self._factor_budgets(tokens, itemsize, settings))
        return sum(self._index_reservations(tokens, itemsize, settings)) / budget if budget else 0.0

    def builds_index(self, tokens: int) -> bool:
        """Whether a prefill of ``tokens`` tokens holds a Selective Reconstruction index (landmarks, exact chunks)."""
        config = self.config
        return (
            self.index_fits
            and config.decode == "selective"
            and self.runtime.fast
            and self.runtime.pads is None
            and self.keys.factored
            and self.values.factored
            and tokens >= config.sr_min_tokens
        )

    def _holds_index(self, tokens: int) -> bool:
        """Whether ranks resolved now pay for an index.

        Once factored, the one held (folds and crops drop it); before, the one a prefill of ``tokens`` tokens builds.
        """
        return bool(self.selective) if self.is_ready else self.builds_index(tokens)

    def _factor_budgets(self, tokens: int, itemsize: int, settings: list[ResolvedRank]) -> list[float]:
        """Bytes each side's compression factor allows for ``tokens`` tokens (0 for an explicit rank or fraction)."""
        dense_side = self.group.size * tokens * self.spec.kv_dim * itemsize
        return [dense_side / s.value if s.kind == "factor" else 0.0 for s in settings]

    def _index_reservations(self, tokens: int, itemsize: int, settings: list[ResolvedRank]) -> list[float]:
        """Bytes of the Selective Reconstruction index each side's compression factor must also pay for.

        The index's bytes (:func:`xkv.decode.selective_index_bytes`, ``G`` layers) are shared between the sides
        set by a compression factor, in proportion to their budgets, so each side's factors plus its share meet
        its factor: ``"4x"`` measures 4x with the landmarks and exact chunks counted. Nothing is reserved without
        an index, or for a side set by an explicit rank or fraction.
        """
        budgets = self._factor_budgets(tokens, itemsize, settings)
        total = sum(budgets)
        if not self._holds_index(tokens) or total == 0:
            return [0.0 for _ in settings]
        config = self.config
        per_layer = sum(selective_index_bytes(
            tokens, self.spec.num_kv_heads, self.spec.head_dim, itemsize, config.sr_chunk_size,
            config.sr_sink_chunks, config.sr_local_chunks, config.sr_outlier_chunks,
        ))  # fmt: skip
        return [self.group.size * per_layer * b / total for b in budgets]

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
                config.sr_outlier_chunks,
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
        for side, room in zip(self.sides, rooms, strict=True):
            side.factor(room, headroom, self.prefix_len, self.dtype)

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
        for side, rank, new in zip(self.sides, ranks, parts, strict=True):
            side.fold(new, start, rank, headroom, self.dtype)
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
        cut = [side.trim(rank, self.prefix_len, self.dtype) for side, rank in zip(self.sides, ranks, strict=True)]
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
            and all(getattr(config, name) == getattr(self.config, name) for name in _INDEX_FIELDS)
        ):
            new.selective = dict(self.selective)  # rank-independent, never edited in place
        new.prefix_len = self.prefix_len
        new.dtype = self.dtype
        assert self.dtype is not None
        ranks = new.affordable_ranks(self.prefix_len, self.dtype)
        if ranks is None:  # the index does not fit these ranks' budget: decode with "absorb"
            new.selective = {}
            ranks = new.check_ranks(self.prefix_len, self.dtype)
        for side, source, rank in zip(new.sides, self.sides, ranks, strict=True):
            side.take_truncated(source, rank, self.prefix_len, self.dtype)
        return new

    # ------------------------------------------------------------------ rebuild
    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, prefix_len)`` RoPE positions of the prefix: ``0..T-1``, or after each sequence's left padding."""
        return self.runtime.positions(0, self.prefix_len, batch, device)

    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer, rebuilt from the factors."""
        return self.keys.rebuild(slot)

    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer, rebuilt from the factors."""
        return self.values.rebuild(slot)

    # ------------------------------------------------------------------ decode
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
