"""``XKVGroupStore``: one layer group's prefix (pending prefill, then its factors) and its decode glue."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import torch

from xkv import attention
from xkv.adapters import ModelSpec
from xkv.cache.base import CompressedStore, check_finite
from xkv.cache.runtime import FAST_PATH_MAX_QUERIES, DecodeRuntime
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
    LowRankFactors,
    UnreachableRatioError,
    append_rows,
    as_float,
    cross_layer_svd,
    resolve_rank,
)
from xkv.forms import StoredFactors, choose_head
from xkv.groups import LayerGroup, build_groups
from xkv.rope import PrefixAngles, RotaryAngles, apply_rope, apply_rope_, unapply_rope

logger = logging.getLogger(__name__)


#: Settings the Selective Reconstruction index is built with: a copy at other settings cannot reuse it.
_INDEX_FIELDS = ("sr_chunk_size", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks")


class XKVGroupStore(CompressedStore):
    """State shared by the layers of one group: pending prefill tensors, then the factors of the prefix.

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
        self.setting_k = config.rank_setting("k", group.index, num_groups)
        self.setting_v = config.rank_setting("v", group.index, num_groups)
        self._reset_state()

    def _reset_state(self) -> None:
        # Prefill: slot -> (batch, tokens, D) pre-RoPE keys / values when compressed, else exact (batch, H, T, hd).
        self.pending_keys: dict[int, torch.Tensor] = {}
        self.pending_values: dict[int, torch.Tensor] = {}
        self.key_factors: StoredFactors | None = None
        self.value_factors: StoredFactors | None = None
        self.dtype: torch.dtype | None = None  # the model's, set at the first prefill
        # Exact prefix per slot, when a side is not compressed: (batch, H, T, hd), keys post-RoPE.
        self.exact_keys: list[torch.Tensor] | None = None
        self.exact_values: list[torch.Tensor] | None = None
        self.prefix_len = 0
        self.rank_k: int | None = None
        self.rank_v: int | None = None
        # Set by the cache for a prefill shorter than `config.min_tokens`: the group keeps it exact.
        self.exact_prefill = False
        # Selective Reconstruction: landmarks and exact chunks per slot (built at prefill when decode="selective").
        self.selective: dict[int, SelectiveIndex] = {}
        # False when the index's bytes would leave a side no rank at the target (`plan_index`).
        self.index_fits = True

    # ------------------------------------------------------------------ prefill
    def headroom_ranks(self, tokens: int) -> tuple[int | None, int | None]:
        """Ranks a prefix of unbounded length would get, capped by what ``tokens`` tokens allow (``fold_headroom``)."""
        assert self.dtype is not None
        bound = min(tokens, self.group.size * self.spec.kv_dim)
        now, long = self.check_ranks(tokens, self.dtype), self.check_ranks(1 << 40, self.dtype)
        return tuple(  # type: ignore[return-value]
            None if r is None or big is None else max(r, min(big, bound)) for r, big in zip(now, long, strict=True)
        )

    def check_ranks(self, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None]:
        """Resolve both ranks for a prefill of ``tokens`` tokens in ``dtype`` without changing any state.

        A compression factor counts the bytes of ``config.factor_form`` against a dense cache in ``dtype``.

        Raises:
            ValueError: if a rank does not fit the data; the message names the field and the group.
        """
        if self.exact_prefill:
            return None, None
        fmt, itemsize = self.config.factor_format, torch.empty((), dtype=dtype).element_size()
        sides = (
            ("k", self.setting_k, self.config.compress_keys),
            ("v", self.setting_v, self.config.compress_values),
        )
        reserved = self._index_reservations(tokens, itemsize, [setting for _, setting, _ in sides])
        ranks: list[int | None] = []
        for (side, setting, wanted), extra in zip(sides, reserved, strict=True):
            field_name = f"rank_{side} for group {self.group.index}"
            ranks.append(
                resolve_rank(setting, tokens, self.group.size, self.spec.kv_dim, field_name=field_name, fmt=fmt,
                             itemsize=itemsize, reserved_bytes=extra)
                if wanted else None
            )  # fmt: skip
        return ranks[0], ranks[1]

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
            and config.compress_keys
            and config.compress_values
            and not self.exact_prefill
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

    def add_prefill(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, inputs: UpdateInputs):
        """Hold one layer's prefill states; factor the group once its last layer has arrived.

        Args:
            slot: position of the layer in the group.
            key_states: ``(batch, kv_heads, tokens, head_dim)``, post-RoPE (as attention hands them over).
            value_states: ``(batch, kv_heads, tokens, head_dim)``.
            inputs: RoPE angles the model used, when the transformers version passes them.
        """
        batch, heads, tokens, head_dim = key_states.shape
        if self.pending_keys and tokens != self.prefix_len:
            raise RuntimeError(
                f"layer {self.group.layers[slot]} prefilled {tokens} tokens, its group started with {self.prefix_len}"
            )
        if not self.exact_prefill and (self.config.compress_keys or self.config.compress_values):
            check_finite(self.group.layers[slot], key_states, value_states)  # before anything of it is held
        self.prefix_len = tokens
        self.dtype = key_states.dtype
        # Sides kept exact are cloned: the caller (e.g. `from_dense` with a DynamicCache) may reuse its tensors.
        if self.config.compress_keys and not self.exact_prefill:
            keys = key_states
            if self.angles is not None:
                cos, sin = inputs.cos, inputs.sin
                if cos is None or sin is None:
                    cos, sin = self.angles(self.positions(batch, key_states.device))
                keys = unapply_rope(key_states, cos, sin)
            self.pending_keys[slot] = self._without_padding(keys.transpose(1, 2).reshape(batch, tokens, -1))
        else:
            self.pending_keys[slot] = key_states.clone()
        if self.config.compress_values and not self.exact_prefill:
            self.pending_values[slot] = self._without_padding(value_states.transpose(1, 2).reshape(batch, tokens, -1))
        else:
            self.pending_values[slot] = value_states.clone()
        config = self.config
        if self.builds_index(tokens):
            self.selective[slot] = build_selective_index(
                key_states, value_states, config.sr_chunk_size, config.sr_sink_chunks, config.sr_local_chunks,
                config.sr_outlier_chunks,
            )  # fmt: skip
        if len(self.pending_keys) == self.group.size:
            self._factor()

    def _without_padding(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` ``(batch, tokens, D)`` with the rows of left padding zeroed (a copy), so no basis sees them."""
        real = self.runtime.real_rows(flat.shape[1], flat.device)
        return flat if real is None else flat * real.unsqueeze(-1).to(flat.dtype)

    def _factor(self) -> None:
        assert self.dtype is not None
        self.rank_k, self.rank_v = self.check_ranks(self.prefix_len, self.dtype)
        keys = [self.pending_keys[s] for s in range(self.group.size)]
        values = [self.pending_values[s] for s in range(self.group.size)]
        # With folding and headroom, later chunks will be folded in: keep room for directions they will need.
        headroom = self.config.fold_headroom and self.config.fold_tokens > 0
        room_k, room_v = self.headroom_ranks(self.prefix_len) if headroom else (self.rank_k, self.rank_v)
        # With headroom the factors stay in the model's dtype until `XKVCache.fold()` stores them in their form:
        # quantizing at every fold would add a rounding error per chunk.
        store = (lambda factors, setting, rank: factors) if headroom else self._store
        if room_k is not None:
            self.key_factors = store(self._svd(keys, room_k), self.setting_k, room_k)
        else:
            self.exact_keys = keys
        if room_v is not None:
            self.value_factors = store(self._svd(values, room_v), self.setting_v, room_v)
        else:
            self.exact_values = values
        self.pending_keys.clear()
        self.pending_values.clear()
        # An int4 form with an int8 head may keep fewer directions than the resolved (all-int4) rank.
        self.rank_k = self.key_factors.rank if self.key_factors is not None else None
        self.rank_v = self.value_factors.rank if self.value_factors is not None else None

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
        keys0 = tails[0][0]
        batch, heads, _, head_dim = keys0.shape
        start, tokens = self.prefix_len, self.prefix_len + count
        self.selective = {}  # its chunks describe the old prefix; no bytes are reserved for it from here on
        rank_k, rank_v = self.headroom_ranks(tokens) if headroom else self.check_ranks(tokens, self.dtype)
        cos = sin = None
        if self.angles is not None:
            cos, sin = self.angles(self.runtime.positions(start, tokens, batch, keys0.device))

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, count, heads * head_dim)

        for side, rank in (("k", rank_k), ("v", rank_v)):
            held = self.key_factors if side == "k" else self.value_factors
            new = [(k if side == "k" else v)[:, :, :count] for k, v in tails]
            if held is None:
                exact = self.exact_keys if side == "k" else self.exact_values
                assert exact is not None
                exact[:] = [torch.cat([old, part], dim=-2) for old, part in zip(exact, new, strict=True)]
                continue
            if side == "k" and cos is not None and sin is not None:
                new = [unapply_rope(part, cos, sin) for part in new]
            floating = as_float(held)  # quantized forms: float32 (folded and quantized again without rounding)
            assert rank is not None
            grown = append_rows(floating, [flat(part) for part in new], min(rank, floating.rank + count))
            if isinstance(held, LowRankFactors) or headroom:  # headroom: the model's dtype until `trim`
                grown = self._in_model_dtype(grown)
            self.prefix_len = tokens  # `_store` sizes an int4 budget by the new length
            setting = self.setting_k if side == "k" else self.setting_v
            self._set_side(side, grown if headroom else self._store(grown, setting, budget_rank=rank))
        self.prefix_len = tokens
        self.selective = {}

    def trim(self) -> bool:
        """Bring factors to the ranks resolved at the prefix's length and to their storage form; whether any changed.

        Folds with ``fold_headroom`` leave more directions, in the model's dtype; a quantized side holding too many
        is dequantized, cut and quantized again.
        """
        if not self.is_ready or self.exact_prefill:
            return False
        assert self.dtype is not None
        rank_k, rank_v = self.check_ranks(self.prefix_len, self.dtype)
        quantized = self.config.factor_form != "model"
        cut = False
        for side, rank in (("k", rank_k), ("v", rank_v)):
            held = self.key_factors if side == "k" else self.value_factors
            if held is None or rank is None:
                continue
            if held.rank <= rank and not (quantized and isinstance(held, LowRankFactors)):
                continue
            # Not `truncate`: a Hadamard rotation or a quantization round trip leaves the columns out of order.
            floating = as_float(held)
            if floating.rank > rank:
                floating = floating.recompressed(rank)
            if isinstance(held, LowRankFactors):
                floating = self._in_model_dtype(floating)
            setting = self.setting_k if side == "k" else self.setting_v
            self._set_side(side, self._store(floating, setting, budget_rank=rank))
            cut = True
        return cut

    def _in_model_dtype(self, factors: LowRankFactors) -> LowRankFactors:
        """``factors`` cast to the cache's dtype (folds and recompressions compute in float32)."""
        return LowRankFactors(factors.token_basis.to(self.dtype), factors.reconstruction.to(self.dtype))

    def _set_side(self, side: str, stored: StoredFactors) -> None:
        """Hold ``stored`` as the keys' (``"k"``) or values' factors, with its rank."""
        if side == "k":
            self.key_factors, self.rank_k = stored, stored.rank
        else:
            self.value_factors, self.rank_v = stored, stored.rank

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
        new.rank_k, new.rank_v = ranks
        for side, rank, held, exact in (
            ("k", new.rank_k, self.key_factors, self.exact_keys),
            ("v", new.rank_v, self.value_factors, self.exact_values),
        ):
            if rank is None:
                if exact is None:
                    raise ValueError(f"`compress_{'keys' if side == 'k' else 'values'}`=False needs the exact side")
                kept = [t.clone() for t in exact]
                if side == "k":
                    new.exact_keys = kept
                else:
                    new.exact_values = kept
                continue
            if held is None or rank > held.rank:
                have = None if held is None else held.rank
                raise ValueError(f"`rank_{side}` for group {self.index} is {rank} but only rank {have} is held")
            if not isinstance(held, LowRankFactors):
                raise ValueError(
                    f"group {self.index} holds {self.config.factor_form} factors: truncating them would quantize "
                    "twice; lower ranks from factors in the model's dtype (factor_form='model')"
                )
            factors = new._store(held.truncate(rank), new.setting_k if side == "k" else new.setting_v)
            if side == "k":
                new.key_factors, new.rank_k = factors, factors.rank
            else:
                new.value_factors, new.rank_v = factors, factors.rank
        return new

    def _svd(self, layers: list[torch.Tensor], rank: int) -> LowRankFactors:
        config = self.config
        factors = cross_layer_svd(
            layers, rank, method=config.svd, oversample=config.svd_oversample, niter=config.svd_niter,
            seed=config.svd_seed,
        )  # fmt: skip
        real = self.runtime.real_rows(self.prefix_len, factors.token_basis.device)
        if real is None:
            return factors
        # The padding rows came in as zeros; the SVD leaves rounding noise there: make them exactly zero.
        basis = factors.token_basis
        return LowRankFactors(basis * real.unsqueeze(-1).to(basis.dtype), factors.reconstruction)

    def _store(self, factors: LowRankFactors, setting: ResolvedRank, budget_rank: int | None = None) -> StoredFactors:
        """``factors`` in the configured storage form.

        For ``"int4"`` with a compression-factor rank, the byte budget is that of ``budget_rank`` directions at int4
        alone (default: the rank of ``factors``, which then hold that many); the int8 head (``factor_head``) is paid
        for out of it, so the kept rank may be lower.
        """
        fmt, head = self.config.factor_format, self.config.factor_head
        if fmt.form != "int4":
            return factors.stored(fmt)
        if setting.kind == "factor":
            assert self.dtype is not None
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            rank = budget_rank or factors.rank
            budget = fmt.factor_bytes(self.prefix_len, self.group.size, self.spec.kv_dim, rank, itemsize)
            heads = None if head == "auto" else [int(head)]
            extra = 4 if itemsize == 2 else 0  # QuantizedFactors.balance
            chosen, rank = choose_head(factors.token_basis, factors.reconstruction, fmt, budget, heads, extra)
            return (factors.truncate(rank) if rank < factors.rank else factors).stored(fmt, chosen)
        return factors.stored(fmt, 0 if head == "auto" else min(int(head), factors.rank))

    # ------------------------------------------------------------------ rebuild
    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, prefix_len)`` RoPE positions of the prefix: ``0..T-1``, or after each sequence's left padding."""
        return self.runtime.positions(0, self.prefix_len, batch, device)

    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer, rebuilt from the factors."""
        if self.key_factors is None:
            assert self.exact_keys is not None, "rebuild before the group was factored"
            return self.exact_keys[slot]
        flat = self.key_factors.layer(slot)  # (batch, T, D), pre-RoPE
        batch, tokens, _ = flat.shape
        keys = flat.view(batch, tokens, self.spec.num_kv_heads, self.spec.head_dim).transpose(1, 2)
        if self.runtime.table is None:
            return keys
        return apply_rope(keys, *self.runtime.padded_angles(tokens, batch, keys.device))

    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer, rebuilt from the factors."""
        if self.value_factors is None:
            assert self.exact_values is not None, "rebuild before the group was factored"
            return self.exact_values[slot]
        flat = self.value_factors.layer(slot)
        batch, tokens, _ = flat.shape
        return flat.view(batch, tokens, self.spec.num_kv_heads, self.spec.head_dim).transpose(1, 2)

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
        elif self.key_factors is None or self.value_factors is None:
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
            return self._rebuilt("k", slot, tail_keys), self._rebuilt("v", slot, tail_values)
        attend = functools.partial(self._attend, slot, path, tail_keys, tail_values)
        attention.leave(attention.PendingAttention(layer_idx, tail_keys, attend, self.runtime))
        return tail_keys, tail_values

    def _rebuilt(self, side: str, slot: int, tail: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len + tail_len, head_dim)``: a view of the workspace (keys post-RoPE)."""
        factors = self.key_factors if side == "k" else self.value_factors
        if factors is None:
            exact = self.exact_keys if side == "k" else self.exact_values
            assert exact is not None, "rebuild before the group was factored"
            return torch.cat([exact[slot], tail], dim=-2)
        basis, matrix = factors.basis(), factors.matrix(slot)
        batch, tokens, _ = basis.shape
        heads, head_dim, length = self.spec.num_kv_heads, self.spec.head_dim, tail.shape[-2]
        flat = self.runtime.workspace.get(side, (batch, tokens + length, heads * head_dim), basis.dtype, basis.device)
        for i in range(batch):  # `out=` needs a contiguous target: one (T, D) block per sequence
            torch.matmul(basis[i], matrix[i], out=flat[i, :tokens])
        view = flat.view(batch, tokens + length, heads, head_dim)
        if side == "k" and self.runtime.table is not None:
            prefix = view[:, :tokens]
            if (
                self.runtime.table.halves_equal
                and basis.dtype in (torch.float32, torch.float64)
                and self.runtime.pads is None
            ):
                apply_rope_(prefix, *self.runtime.table.get(tokens, basis.device))
            else:
                rotated = apply_rope(prefix.transpose(1, 2), *self.runtime.padded_angles(tokens, batch, basis.device))
                prefix.copy_(rotated.transpose(1, 2))
        if length:
            view[:, tokens:] = tail.transpose(1, 2)
        return view.transpose(1, 2)

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
        assert self.key_factors is not None and self.value_factors is not None
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
            keys = self._rebuilt("k", slot, tail_keys[:, :, :0])
            out = attend_absorbed(
                grouped, keys, self.value_factors, slot, tail_keys, tail_values, scaling, mask, hidden
            )  # fmt: skip
        else:
            table = self.runtime.table
            angles = table.joint_table(tokens, query.device) if table is not None else None
            out = attend_selective(
                grouped, self.selective[slot], self.key_factors, self.value_factors, slot, angles,
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
        for factors in (self.key_factors, self.value_factors):
            if factors is not None:
                tensors += factors.tensors()
        for exact in (self.exact_keys, self.exact_values):
            if exact is not None:
                tensors += exact
        return tensors

    def pending_tensors(self) -> list[torch.Tensor]:
        """Prefill tensors held until the group is complete."""
        return list(self.pending_keys.values()) + list(self.pending_values.values())

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every held tensor (batch-dimension edits: beam reorder, select, repeat)."""
        if self.key_factors is not None:
            self.key_factors = self.key_factors.map(fn)
        if self.value_factors is not None:
            self.value_factors = self.value_factors.map(fn)
        for name in ("exact_keys", "exact_values"):
            exact = getattr(self, name)
            if exact is not None:
                setattr(self, name, [fn(t) for t in exact])
        for pending in (self.pending_keys, self.pending_values):
            for slot in pending:
                pending[slot] = fn(pending[slot])
        self.selective = {slot: index.map(fn) for slot, index in self.selective.items()}

    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens (rows of the token basis; the reconstruction is unchanged)."""
        if length >= self.prefix_len:
            return
        if length <= 0:
            self._reset_state()
            return
        self.selective = {}  # its chunks described the whole prefix: decode falls back to "absorb"
        if self.key_factors is not None:
            self.key_factors = self.key_factors.crop(length)
        if self.value_factors is not None:
            self.value_factors = self.value_factors.crop(length)
        for name in ("exact_keys", "exact_values"):
            exact = getattr(self, name)
            if exact is not None:
                setattr(self, name, [t[:, :, :length].clone() for t in exact])
        self.prefix_len = length

    def reset(self) -> None:
        """Drop everything held."""
        self._reset_state()


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
