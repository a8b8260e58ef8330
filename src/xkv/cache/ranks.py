"""A group's rank budget: both sides' ranks for a prefix length, with Selective Reconstruction's index paid for."""

from __future__ import annotations

import logging

import torch

from xkv.adapters import ModelSpec
from xkv.budget import index_reservations, side_budgets
from xkv.cache.runtime import DecodeRuntime
from xkv.cache.side import Side
from xkv.config import RankSetting, UnreachableRatioError, XKVConfig
from xkv.decode import SelectiveIndex, selective_index_bytes
from xkv.groups import LayerGroup

logger = logging.getLogger(__name__)


class GroupRanks:
    """The ranks of a group's two sides (mixed into :class:`~xkv.cache.store.XKVGroupStore`).

    A side's setting (an explicit rank, a fraction or a compression factor) becomes a rank for a given prefix
    length and dtype; a side kept exact has none. Where the group holds (or will build) a Selective Reconstruction
    index, its bytes are paid for out of the sides' compression factors.
    """

    group: LayerGroup
    spec: ModelSpec
    config: XKVConfig
    runtime: DecodeRuntime
    keys: Side
    values: Side
    selective: dict[int, SelectiveIndex]
    index_fits: bool
    dtype: torch.dtype | None

    @property
    def is_ready(self) -> bool:
        """Whether the group's prefix has been factored (the store's)."""
        raise NotImplementedError

    def check_static_ranks(self) -> None:
        """Check explicit integer ranks against ``G * D`` (the token bound is checked at the first prefill).

        Raises:
            ValueError: naming the field and the group.
        """
        bound = self.spec.kv_dim * self.group.size
        for side in (self.keys, self.values):
            setting = side.frame.setting
            if side.factored and setting.kind == "rank" and setting.value > bound:
                raise ValueError(
                    f"`rank_{side.frame.letter}` for group {self.group.index} must be in [1, {bound}] "
                    f"(group_size * kv_heads * head_dim) but got {int(setting.value)}"
                )

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
        reserved = self._index_reservations(tokens, itemsize, [self.keys.frame.setting, self.values.frame.setting])
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

    def side_bytes(self, tokens: int, dtype: torch.dtype) -> list[float | None]:
        """Bytes each side's compression factor allows for ``tokens`` tokens, the index's share taken off.

        ``None`` for a side set by an explicit rank or a fraction (it has no byte budget).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        settings = [self.keys.frame.setting, self.values.frame.setting]
        budgets = self._factor_budgets(tokens, itemsize, settings)
        reserved = self._index_reservations(tokens, itemsize, settings)
        return [b - r if s.kind == "factor" else None for s, b, r in zip(settings, budgets, reserved, strict=True)]

    def index_share(self, tokens: int, dtype: torch.dtype) -> float:
        """The fraction of this group's byte budget Selective Reconstruction's index would take (0 without one)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        settings = [self.keys.frame.setting, self.values.frame.setting]
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

    def _factor_budgets(self, tokens: int, itemsize: int, settings: list[RankSetting]) -> list[float]:
        """Bytes each side's compression factor allows for ``tokens`` tokens (:func:`xkv.budget.side_budgets`)."""
        return side_budgets(settings, self.group.size, tokens, self.spec.kv_dim, itemsize)

    def _index_reservations(self, tokens: int, itemsize: int, settings: list[RankSetting]) -> list[float]:
        """Bytes of the Selective Reconstruction index each side's compression factor must also pay for.

        The index's bytes (:func:`xkv.decode.selective_index_bytes`, ``G`` layers) are shared between the sides
        set by a compression factor (:func:`xkv.budget.index_reservations`). Nothing is reserved without an index.
        """
        budgets = self._factor_budgets(tokens, itemsize, settings)
        if not self._holds_index(tokens):
            return [0.0 for _ in settings]
        config = self.config
        per_layer = sum(selective_index_bytes(
            tokens, self.spec.num_kv_heads, self.spec.head_dim, itemsize, config.sr_chunk_size,
            config.sr_sink_chunks, config.sr_local_chunks, config.sr_outlier_chunks, config.sr_landmarks == "bounds",
        ))  # fmt: skip
        return index_reservations(budgets, self.group.size * per_layer)
