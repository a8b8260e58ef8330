"""One side (keys or values) of a layer group's prefix: its stored form, its rank setting and every edit of it.

A group holds two sides. :class:`StoredSide` keeps its side as cross-layer factors (:class:`~xkv.forms.
StoredFactors`, in the configured storage form); :class:`ExactSide` keeps it exact, per layer (``compress_keys``/
``compress_values=False``, a prefill under ``min_tokens``, MLA's ``k_pe``). Both implement :class:`Side`: hold the
prefill, factor, fold, trim, truncate, crop, map, rebuild and state, so the group never asks which one it has.

Keys differ from values only by RoPE: a :class:`StoredSide` of keys holds a :class:`RopeRotation`, which un-rotates
them to pre-RoPE before they are factored (and folded) and rotates them back when they are rebuilt; values, and keys
of a model without RoPE, hold :class:`NoRotation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xkv.adapters import ModelSpec
from xkv.budget import full_rank, resolve_rank
from xkv.cache.runtime import DecodeRuntime
from xkv.compat import UpdateInputs
from xkv.config import RankSetting, XKVConfig
from xkv.factorization import LowRankFactors, append_rows, as_float, cross_layer_svd, from_state
from xkv.forms import StoredFactors, choose_head
from xkv.positions import RotaryAngles, apply_rope, apply_rope_, unapply_rope


class NoRotation:
    """Values, or keys of a model without RoPE: stored as attention sees them."""

    def pre_rope(self, states: torch.Tensor, inputs: UpdateInputs) -> torch.Tensor:
        """A prefill's ``(b, H, T, hd)`` states as they are factored (here: unchanged)."""
        return states

    def pre_rope_at(self, parts: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        """Tokens at indices ``start .. stop-1`` (``(b, H, m, hd)`` per layer) as they are folded (unchanged)."""
        return parts

    def post_rope(self, states: torch.Tensor) -> torch.Tensor:
        """A rebuilt prefix ``(b, H, T, hd)`` as attention sees it (unchanged)."""
        return states

    def post_rope_rows_(self, rows: torch.Tensor, batch: int, tokens: int) -> None:
        """Rotate a rebuilt prefix ``(b, T, H, hd)`` in its workspace, in place (nothing to do)."""


class RopeRotation(NoRotation):
    """Keys of a RoPE model: factored pre-RoPE (the authors' choice), rotated back when rebuilt.

    Args:
        angles: the model's RoPE at given positions.
        runtime: the cache's decode state (positions of a left-padded batch, the prefix's angle table).
    """

    def __init__(self, angles: RotaryAngles, runtime: DecodeRuntime):
        self.angles = angles
        self.runtime = runtime

    def pre_rope(self, states: torch.Tensor, inputs: UpdateInputs) -> torch.Tensor:
        """Un-rotate a prefill's keys with the angles the model used, else those of the prefix's positions."""
        batch, _, tokens, _ = states.shape
        cos, sin = inputs.cos, inputs.sin
        if cos is None or sin is None:
            cos, sin = self.angles(self.runtime.positions(0, tokens, batch, states.device))
        return unapply_rope(states, cos, sin)

    def pre_rope_at(self, parts: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        """Un-rotate tail keys at their positions (angles computed once for every layer)."""
        cos, sin = self.angles(self.runtime.positions(start, stop, parts[0].shape[0], parts[0].device))
        return [unapply_rope(part, cos, sin) for part in parts]

    def post_rope(self, states: torch.Tensor) -> torch.Tensor:
        """Rotate rebuilt keys at each sequence's prefix positions."""
        batch, _, tokens, _ = states.shape
        return apply_rope(states, *self.runtime.padded_angles(tokens, batch, states.device))

    def post_rope_rows_(self, rows: torch.Tensor, batch: int, tokens: int) -> None:
        """Rotate rebuilt keys in place where the table allows it (float32/64, equal halves, no padding)."""
        table = self.runtime.table
        assert table is not None
        if table.halves_equal and rows.dtype in (torch.float32, torch.float64) and self.runtime.pads is None:
            apply_rope_(rows, *table.get(tokens, rows.device))
        else:
            rotated = apply_rope(rows.transpose(1, 2), *self.runtime.padded_angles(tokens, batch, rows.device))
            rows.copy_(rotated.transpose(1, 2))


@dataclass
class SideFrame:
    """What a side knows of its group and cache.

    Attributes:
        name: ``"keys"`` or ``"values"`` (error messages: ``compress_keys``).
        letter: ``"k"`` or ``"v"`` (``rank_k``, prefix-file names, workspace buffer).
        group_index: the group's index in its cache.
        group_size: G, layers of the group.
        spec: the model's attention geometry.
        config: the cache's settings.
        runtime: the cache's decode state.
        setting: this side's rank setting for this group.
        rotation: RoPE for keys; :class:`NoRotation` for values or a model without RoPE.
    """

    name: str
    letter: str
    group_index: int
    group_size: int
    spec: ModelSpec
    config: XKVConfig
    runtime: DecodeRuntime
    setting: RankSetting
    rotation: NoRotation


class Side(ABC):
    """One side of a group's prefix: its pending prefill tensors, then its stored form.

    Args:
        frame: the group, settings and RoPE of this side.
    """

    def __init__(self, frame: SideFrame):
        self.frame = frame
        #: slot -> the layer's prefill states in the form this side factors or keeps them, until the group is full.
        self.pending: dict[int, torch.Tensor] = {}

    @property
    def setting(self) -> RankSetting:
        """This side's rank setting for its group."""
        return self.frame.setting

    @property
    @abstractmethod
    def factored(self) -> bool:
        """Whether this side stores factors (else the exact states)."""

    @property
    def factors(self) -> StoredFactors | None:
        """The factors held; ``None`` for an exact side or before the prefill (compatibility view)."""
        return None

    @property
    def exact(self) -> list[torch.Tensor] | None:
        """Per layer the exact prefix ``(b, H, T, hd)`` (keys post-RoPE); ``None`` for a factored side."""
        return None

    @property
    def rank(self) -> int | None:
        """Directions held (``None`` where there are no factors)."""
        return None

    @abstractmethod
    def resolve(self, tokens: int, itemsize: int, reserved: float) -> int | None:
        """This side's rank for a prefix of ``tokens`` tokens (``reserved`` bytes go to the SR index); ``None``: exact.

        Raises:
            ValueError: if the rank does not fit the data; the message names the field and the group.
        """

    @abstractmethod
    def widened(self, rank: int | None, unbounded: int | None, bound: int) -> int | None:
        """The rank kept with ``fold_headroom``: ``unbounded`` (an unbounded prefix's rank), capped at ``bound``."""

    @abstractmethod
    def hold(self, slot: int, states: torch.Tensor, inputs: UpdateInputs) -> None:
        """Hold one layer's prefill states ``(b, H, T, hd)`` (keys post-RoPE) until the group is full."""

    @abstractmethod
    def factor(
        self, rank: int | None, headroom: bool, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """Turn the pending prefill into the stored form (``rank`` directions; ``headroom``: left unquantized).

        ``budget``: the bytes this side's compression factor allows (``None`` for an explicit rank or fraction).
        """

    @abstractmethod
    def fold(
        self,
        parts: list[torch.Tensor],
        start: int,
        rank: int | None,
        headroom: bool,
        dtype: torch.dtype,
        budget: float | None = None,
    ) -> None:
        """Append per layer the tokens ``parts`` ``(b, H, m, hd)`` at indices ``start ..`` to the prefix."""

    @abstractmethod
    def trim(self, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None) -> bool:
        """Bring the factors to ``rank`` and their storage form; whether anything changed."""

    @abstractmethod
    def take_truncated(
        self, source: Side, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """Hold ``source``'s prefix at ``rank`` (the first directions of its factors, or a copy of exact states)."""

    @abstractmethod
    def truncatable(self, rank: int) -> LowRankFactors:
        """These factors, for a copy at ``rank`` directions.

        Raises:
            ValueError: if this side holds fewer directions, none, or a quantized form.
        """

    @abstractmethod
    def exact_copy(self) -> list[torch.Tensor]:
        """Copies of the exact per-layer states.

        Raises:
            ValueError: for a factored side.
        """

    @abstractmethod
    def rebuild(self, slot: int) -> torch.Tensor:
        """``(b, H, T, hd)`` prefix of one layer (keys post-RoPE), a transient."""

    def read_basis(self) -> torch.Tensor:
        """``(b, T, r)`` token basis of a factored side (the fast decode paths run on factored sides only).

        Raises:
            ValueError: for a side without factors.
        """
        raise ValueError("this side holds no factors: it has no token basis")

    @abstractmethod
    def rebuilt_with_tail(self, slot: int, tail: torch.Tensor) -> torch.Tensor:
        """``(b, H, T + tail_len, hd)``: the prefix of layer ``slot`` followed by ``tail`` (keys post-RoPE)."""

    @abstractmethod
    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the prefix."""

    @abstractmethod
    def map_stored(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the stored prefix (batch edits)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens (copied, so the rest is freed)."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors by name, metadata)`` of the prefix, for a prefix file."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Hold the prefix described by :meth:`state`'s output."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every tensor held, pending ones included (beam reorder, select, repeat)."""
        self.map_stored(fn)
        for slot in self.pending:
            self.pending[slot] = fn(self.pending[slot])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the prefix (pending prefill tensors apart: :attr:`pending`)."""
        return self.stored_tensors()


class ExactSide(Side):
    """A side kept exact: per layer the prefill's states, with folded tokens appended."""

    def __init__(self, frame: SideFrame):
        super().__init__(frame)
        self.states: list[torch.Tensor] | None = None

    @property
    def factored(self) -> bool:
        """An exact side holds no factors."""
        return False

    @property
    def exact(self) -> list[torch.Tensor] | None:
        """Per layer the exact prefix ``(b, H, T, hd)`` (keys post-RoPE)."""
        return self.states

    def _held(self) -> list[torch.Tensor]:
        assert self.states is not None, "rebuild before the group was factored"
        return self.states

    def resolve(self, tokens: int, itemsize: int, reserved: float) -> int | None:
        """No rank: the side stays exact."""
        return None

    def widened(self, rank: int | None, unbounded: int | None, bound: int) -> int | None:
        """No rank: the side stays exact."""
        return None

    def hold(self, slot: int, states: torch.Tensor, inputs: UpdateInputs) -> None:
        """Cloned: the caller (e.g. ``from_dense`` with a DynamicCache) may reuse its tensors."""
        self.pending[slot] = states.clone()

    def factor(
        self, rank: int | None, headroom: bool, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """Keep the pending states as they are."""
        self.states = [self.pending[slot] for slot in range(self.frame.group_size)]
        self.pending.clear()

    def fold(
        self,
        parts: list[torch.Tensor],
        start: int,
        rank: int | None,
        headroom: bool,
        dtype: torch.dtype,
        budget: float | None = None,
    ) -> None:
        """Append the tokens."""
        self.states = [torch.cat([old, part], dim=-2) for old, part in zip(self._held(), parts, strict=True)]

    def trim(self, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None) -> bool:
        """Nothing to trim."""
        return False

    def take_truncated(
        self, source: Side, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """A copy of ``source``'s exact states (which must be exact)."""
        self.states = source.exact_copy()

    def truncatable(self, rank: int) -> LowRankFactors:
        """An exact side has no directions to keep."""
        frame = self.frame
        raise ValueError(f"`rank_{frame.letter}` for group {frame.group_index} is {rank} but only rank None is held")

    def exact_copy(self) -> list[torch.Tensor]:
        """Copies of the exact states."""
        return [t.clone() for t in self._held()]

    def rebuild(self, slot: int) -> torch.Tensor:
        """The exact prefix itself."""
        return self._held()[slot]

    def rebuilt_with_tail(self, slot: int, tail: torch.Tensor) -> torch.Tensor:
        """The exact prefix and the tail, concatenated."""
        return torch.cat([self._held()[slot], tail], dim=-2)

    def stored_tensors(self) -> list[torch.Tensor]:
        """The exact states."""
        return list(self.states) if self.states is not None else []

    def map_stored(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``fn`` on each layer's states."""
        if self.states is not None:
            self.states = [fn(t) for t in self.states]

    def crop(self, length: int) -> None:
        """The first ``length`` tokens of each layer, copied."""
        if self.states is not None:
            self.states = [t[:, :, :length].clone() for t in self.states]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``exact<slot>`` per layer, form ``"exact"``."""
        return {f"exact{slot}": t for slot, t in enumerate(self._held())}, {"form": "exact"}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Per layer ``exact<slot>``."""
        self.states = [tensors[f"exact{slot}"] for slot in range(self.frame.group_size)]


class StoredSide(Side):
    """A side stored as cross-layer factors (:func:`~xkv.factorization.cross_layer_svd`) in the configured form."""

    def __init__(self, frame: SideFrame):
        super().__init__(frame)
        self.stored: StoredFactors | None = None

    @property
    def factored(self) -> bool:
        """A stored side holds factors."""
        return True

    @property
    def factors(self) -> StoredFactors | None:
        """The factors (``None`` before the prefill)."""
        return self.stored

    @property
    def rank(self) -> int | None:
        """Directions held (``None`` before the prefill)."""
        return self.stored.rank if self.stored is not None else None

    def _held(self) -> StoredFactors:
        assert self.stored is not None, "rebuild before the group was factored"
        return self.stored

    def resolve(self, tokens: int, itemsize: int, reserved: float) -> int | None:
        """The setting resolved for ``tokens`` tokens (:func:`~xkv.budget.resolve_rank`)."""
        frame = self.frame
        return resolve_rank(
            frame.setting, tokens, frame.group_size, frame.spec.kv_dim,
            field_name=f"rank_{frame.letter} for group {frame.group_index}", fmt=frame.config.factor_format,
            itemsize=itemsize, reserved_bytes=reserved,
        )  # fmt: skip

    def widened(self, rank: int | None, unbounded: int | None, bound: int) -> int | None:
        """At least ``rank``, up to ``unbounded`` within ``bound``."""
        assert rank is not None and unbounded is not None
        return max(rank, min(unbounded, bound))

    def hold(self, slot: int, states: torch.Tensor, inputs: UpdateInputs) -> None:
        """Pre-RoPE, flattened to ``(b, T, D)``, left padding zeroed (a copy), so no basis sees it."""
        batch, _, tokens, _ = states.shape
        flat = self.frame.rotation.pre_rope(states, inputs).transpose(1, 2).reshape(batch, tokens, -1)
        real = self.frame.runtime.real_rows(tokens, flat.device)
        self.pending[slot] = flat if real is None else flat * real.unsqueeze(-1).to(flat.dtype)

    def factor(
        self, rank: int | None, headroom: bool, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """One SVD of the group's pending layers; with ``headroom`` the factors stay in the model's dtype.

        Quantizing at every fold would add a rounding error per chunk: ``XKVCache.fold()`` stores them in their form.
        """
        assert rank is not None
        layers = [self.pending[slot] for slot in range(self.frame.group_size)]
        factors = self._svd(layers, rank, tokens)
        self.stored = factors if headroom else self._store(factors, tokens, dtype, rank, budget)
        self.pending.clear()

    def _svd(self, layers: list[torch.Tensor], rank: int, tokens: int) -> LowRankFactors:
        config = self.frame.config
        factors = cross_layer_svd(
            layers, rank, method=config.svd, oversample=config.svd_oversample, niter=config.svd_niter,
            seed=config.svd_seed,
        )  # fmt: skip
        real = self.frame.runtime.real_rows(tokens, factors.token_basis.device)
        if real is None:
            return factors
        # The padding rows came in as zeros; the SVD leaves rounding noise there: make them exactly zero.
        basis = factors.token_basis
        return LowRankFactors(basis * real.unsqueeze(-1).to(basis.dtype), factors.reconstruction)

    def _store(
        self,
        factors: LowRankFactors,
        tokens: int,
        dtype: torch.dtype,
        budget_rank: int | None = None,
        budget: float | None = None,
    ) -> StoredFactors:
        """``factors`` in the configured storage form, for a prefix of ``tokens`` tokens in ``dtype``.

        For ``"int4"`` with a compression-factor rank, the byte budget is that of ``budget_rank`` directions at int4
        alone (default: the rank of ``factors``, which then hold that many); the int8 head (``factor_head``) is paid
        for out of it, so the kept rank may be lower. Where the matrix's shape caps that rank (``min(T, G*D)``,
        reached at low factors: values at 3x from about 1.1k tokens on SmolLM2) and ``budget`` (the side's bytes
        at its factor, Selective Reconstruction's share taken off) is larger, the rest buys a wider int8 head, so
        the side meets its factor instead of measuring above it.
        """
        config, frame = self.frame.config, self.frame
        fmt, head = config.factor_format, config.factor_head
        if fmt.form != "int4":
            return factors.stored(fmt, dtype=dtype)
        if frame.setting.kind == "factor":
            itemsize = torch.empty((), dtype=dtype).element_size()
            rank = budget_rank or factors.rank
            spend = fmt.factor_bytes(tokens, frame.group_size, frame.spec.kv_dim, rank, itemsize)
            if budget is not None and rank >= full_rank(tokens, frame.group_size, frame.spec.kv_dim):
                spend = max(spend, int(budget))
            heads = None if head == "auto" else [int(head)]
            extra = 4 if itemsize == 2 else 0  # QuantizedFactors.balance
            chosen, rank = choose_head(factors.token_basis, factors.reconstruction, fmt, spend, heads, extra)
            return (factors.truncate(rank) if rank < factors.rank else factors).stored(fmt, chosen, dtype)
        return factors.stored(fmt, 0 if head == "auto" else min(int(head), factors.rank), dtype)

    @staticmethod
    def _in_dtype(factors: LowRankFactors, dtype: torch.dtype) -> LowRankFactors:
        """``factors`` cast to the cache's dtype (folds and recompressions compute in float32)."""
        return LowRankFactors(factors.token_basis.to(dtype), factors.reconstruction.to(dtype))

    def fold(
        self,
        parts: list[torch.Tensor],
        start: int,
        rank: int | None,
        headroom: bool,
        dtype: torch.dtype,
        budget: float | None = None,
    ) -> None:
        """Incremental SVD (:func:`~xkv.factorization.append_rows`) of the pre-RoPE rows, at most ``rank``.

        A quantized side is dequantized, folded and quantized again; with ``headroom`` the result stays in the
        model's dtype until :meth:`trim`.
        """
        assert rank is not None
        held = self._held()
        batch, heads, count, head_dim = parts[0].shape
        rows = self.frame.rotation.pre_rope_at(parts, start, start + count)
        floating = as_float(held)  # quantized forms: float32 (folded and quantized again without rounding)
        flat = [part.transpose(1, 2).reshape(batch, count, heads * head_dim) for part in rows]
        grown = append_rows(floating, flat, min(rank, floating.rank + count))
        if not held.quantized or headroom:  # headroom: the model's dtype until `trim`
            grown = self._in_dtype(grown, dtype)
        self.stored = grown if headroom else self._store(grown, start + count, dtype, rank, budget)

    def trim(self, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None) -> bool:
        """Cut to ``rank`` and store in the configured form; a quantized side holding too many is re-quantized."""
        assert rank is not None
        held = self._held()
        quantized = self.frame.config.factor_form != "model"
        if held.rank <= rank and not (quantized and not held.quantized):
            return False
        # Not `truncate`: a Hadamard rotation or a quantization round trip leaves the columns out of order.
        floating = as_float(held)
        if floating.rank > rank:
            floating = floating.recompressed(rank)
        if not held.quantized:
            floating = self._in_dtype(floating, dtype)
        self.stored = self._store(floating, tokens, dtype, rank, budget)
        return True

    def take_truncated(
        self, source: Side, rank: int | None, tokens: int, dtype: torch.dtype, budget: float | None = None
    ) -> None:
        """The first ``rank`` directions of ``source``'s factors, in this side's form."""
        assert rank is not None
        self.stored = self._store(source.truncatable(rank).truncate(rank), tokens, dtype, budget=budget)

    def truncatable(self, rank: int) -> LowRankFactors:
        """The factors, if they hold ``rank`` directions in the model's dtype."""
        held, frame = self.stored, self.frame
        if held is not None and held.quantized:  # first: an int4 side may hold fewer directions than a lower factor
            raise ValueError(
                f"group {frame.group_index} holds {frame.config.factor_form} factors: truncating them would quantize "
                "twice; lower ranks from factors in the model's dtype (factor_form='model')"
            )
        if held is None or rank > held.rank:
            have = None if held is None else held.rank
            raise ValueError(
                f"`rank_{frame.letter}` for group {frame.group_index} is {rank} but only rank {have} is held"
            )
        return as_float(held)

    def exact_copy(self) -> list[torch.Tensor]:
        """A factored side holds no exact states."""
        raise ValueError(f"`compress_{self.frame.name}`=False needs the exact side")

    def rebuild(self, slot: int) -> torch.Tensor:
        """``basis @ matrix(slot)`` as ``(b, H, T, hd)``, keys rotated back."""
        flat = self._held().layer(slot)  # (batch, T, D), keys pre-RoPE
        batch, tokens, _ = flat.shape
        states = flat.view(batch, tokens, self.frame.spec.num_kv_heads, self.frame.spec.head_dim).transpose(1, 2)
        return self.frame.rotation.post_rope(states)

    def read_basis(self) -> torch.Tensor:
        """``(b, T, r)`` token basis in the read dtype.

        A quantized basis is unpacked once per group and decode step into the workspace (every layer of the group
        reads the same ``U``), not once per layer.
        """
        factors = self._held()
        if not factors.quantized:
            return factors.basis()
        return self.frame.runtime.workspace.holding(f"basis_{self.frame.letter}", factors, factors.basis)

    def rebuilt_with_tail(self, slot: int, tail: torch.Tensor) -> torch.Tensor:
        """A view of the workspace: the rebuilt prefix written in place, then the tail."""
        factors, frame = self._held(), self.frame
        basis, matrix = self.read_basis(), factors.matrix(slot)
        batch, tokens, _ = basis.shape
        heads, head_dim, length = frame.spec.num_kv_heads, frame.spec.head_dim, tail.shape[-2]
        workspace = frame.runtime.workspace
        flat = workspace.get(frame.letter, (batch, tokens + length, heads * head_dim), basis.dtype, basis.device)
        for i in range(batch):  # `out=` needs a contiguous target: one (T, D) block per sequence
            torch.matmul(basis[i], matrix[i], out=flat[i, :tokens])
        view = flat.view(batch, tokens + length, heads, head_dim)
        frame.rotation.post_rope_rows_(view[:, :tokens], batch, tokens)
        if length:
            view[:, tokens:] = tail.transpose(1, 2)
        return view.transpose(1, 2)

    def stored_tensors(self) -> list[torch.Tensor]:
        """The factors' tensors."""
        return self.stored.tensors() if self.stored is not None else []

    def map_stored(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``fn`` on the factors."""
        if self.stored is not None:
            self.stored = self.stored.map(fn)

    def crop(self, length: int) -> None:
        """The first ``length`` rows of the token basis (the reconstruction is unchanged)."""
        if self.stored is not None:
            self.stored = self.stored.crop(length)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The factors' :meth:`~xkv.forms.StoredFactors.state`."""
        return self._held().state()

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Factors of the form ``meta`` names."""
        self.stored = from_state(tensors, meta)
