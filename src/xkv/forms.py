"""Storage forms of a group's factors: one interface, whatever the bits (pure tensor code, no transformers).

A factored group side holds a token basis ``U`` ``(b, T, r)`` and per-layer reconstruction matrices ``B``
``(b, G, r, D)``; layer ``l`` is ``U @ B_l``. The forms:

* ``"model"``: both factors in the model's dtype (:class:`xkv.factorization.LowRankFactors`). The singular values
  are split between them (``U sqrt(S)``, ``sqrt(S) V^T``), so neither grows like ``sqrt(T)`` and fp16 stays finite.
* ``"int8"`` / ``"int4"`` (:class:`QuantizedFactors`): symmetric integers with one float32 scale per
  ``group_size`` consecutive values along the last axis (the rank axis of ``U``, the feature axis of ``B``); int4 is
  packed two values per byte. ``U`` is stored with unit-norm columns and the singular values go to ``B``, whose
  rows then each get their own scales. Optionally both are first rotated by a block Hadamard matrix along the last
  axis (blocks of ``group_size``; a last partial block is left as it is), which spreads outliers over a group
  before rounding (as QuaRot does for weights); the rotations are undone on the small ``B`` at read time, never on
  ``U``.

Readers never ask which form they hold (:class:`StoredFactors`): they take ``basis()`` (or ``chunk_rows``) and
``matrix(slot)``, whose product is the layer, and list ``tensors()`` for byte accounting.
"""

from __future__ import annotations

import functools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

#: Storage forms of factors (``XKVConfig.factor_form``).
FACTOR_FORMS = ("model", "int8", "int4")
#: Rotations applied before quantizing (``XKVConfig.factor_rotation``).
FACTOR_ROTATIONS = ("none", "hadamard")
_BITS = {"int8": 8, "int4": 4}
#: Dtypes a model's keys and values may have, by name: the allow-list a prefix file's ``"dtype"`` is read through
#: (never ``getattr(torch, name)``, which accepts any attribute of torch).
MODEL_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
logger = logging.getLogger(__name__)
_SCALE_BYTES = 4  # float32 scales


def packed_bytes(rows: int, length: int, bits: int, group_size: int) -> int:
    """Bytes of a ``(rows, length)`` tensor quantized by :func:`quantize`: packed values plus float32 scales."""
    packed = length if bits == 8 else (length + 1) // 2
    return rows * (packed + math.ceil(length / group_size) * _SCALE_BYTES)


@dataclass(frozen=True)
class FactorFormat:
    """How a group's factors are stored.

    Attributes:
        form: ``"model"`` (the model's dtype), ``"int8"`` or ``"int4"``.
        group_size: values per scale along the last axis (quantized forms).
        rotation: ``"none"`` or ``"hadamard"`` (quantized forms; ``group_size`` must then be a power of two).
    """

    form: str = "model"
    group_size: int = 64
    rotation: str = "none"

    def __post_init__(self) -> None:
        if self.form not in FACTOR_FORMS:
            raise ValueError(f"`factor_form` must be one of {list(FACTOR_FORMS)} but got {self.form!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"`factor_group_size` must be an int >= 1 but got {self.group_size!r}")
        if self.rotation not in FACTOR_ROTATIONS:
            raise ValueError(f"`factor_rotation` must be one of {list(FACTOR_ROTATIONS)} but got {self.rotation!r}")
        if self.rotation == "hadamard" and self.group_size & (self.group_size - 1):
            raise ValueError(
                f"`factor_rotation`='hadamard' rotates blocks of `factor_group_size` values, which must be a power "
                f"of two, but got {self.group_size}"
            )

    @property
    def bits(self) -> int | None:
        """Bits per stored value (``None`` for the model's dtype)."""
        return _BITS.get(self.form)

    def values_bytes(self, rows: int, length: int, itemsize: int) -> int:
        """Bytes of a ``(rows, length)`` factor in this form, values and scales (``itemsize``: the model's dtype)."""
        if self.bits is None:
            return rows * length * itemsize
        return packed_bytes(rows, length, self.bits, self.group_size)

    def factor_bytes(self, tokens: int, group_size: int, dim: int, rank: int, itemsize: int, head: int = 0) -> int:
        """Bytes of one group side at ``rank``: ``U`` ``(T, r)`` plus ``G`` matrices ``(r, D)`` (batch 1).

        ``head``: leading directions of an ``"int4"`` form stored in int8 (:func:`choose_head`).
        """
        if head and self.bits == 4:
            int8 = FactorFormat("int8", self.group_size)
            return int8.factor_bytes(tokens, group_size, dim, head, itemsize) + self.factor_bytes(
                tokens, group_size, dim, rank - head, itemsize
            )
        balance = rank * _SCALE_BYTES if self.bits is not None and itemsize == 2 else 0  # QuantizedFactors.balance
        return (
            self.values_bytes(tokens, rank, itemsize) + self.values_bytes(group_size * rank, dim, itemsize) + balance
        )


class StoredFactors(ABC):
    """One group side's factors, whatever their storage form.

    ``basis() @ matrix(slot)`` is layer ``slot``'s ``(b, T, D)`` rebuild. Edits return new objects or replace
    tensors whole, so a tensor shared with another cache (``XKVCache.with_ranks``) is never written in place.
    """

    #: Whether the form rounds the factors (int8/int4): editing them means dequantizing and quantizing again.
    quantized: ClassVar[bool] = False

    @property
    @abstractmethod
    def rank(self) -> int:
        """Number of directions kept."""

    @property
    @abstractmethod
    def tokens(self) -> int:
        """Rows of the token basis."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """G, layers of the group (one reconstruction matrix each)."""

    @abstractmethod
    def basis(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, T, r)`` token basis, in ``dtype`` (default: the compute dtype of the form)."""

    @abstractmethod
    def chunk_rows(self, chunks: torch.Tensor, chunk_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of the token basis for whole chunks: ``chunks`` ``(b, H, k)`` -> ``(b, H, k*c, r)``."""

    @abstractmethod
    def matrix(self, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, r, D)``: the matrix that turns ``basis()`` rows into layer ``slot``'s features."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for byte accounting)."""

    @abstractmethod
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StoredFactors:
        """A copy with ``fn`` applied along the batch axis of every tensor (beam reorder, select, repeat)."""

    @abstractmethod
    def crop(self, length: int) -> StoredFactors:
        """A copy holding the first ``length`` token rows (copied: a view would keep every row alive)."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Named tensors and plain-data metadata that rebuild these factors (``xkv.factorization.from_state``)."""

    def layer(self, slot: int) -> torch.Tensor:
        """Rebuild the ``slot``-th layer of the group: ``(b, T, D)``."""
        return torch.matmul(self.basis(), self.matrix(slot))


def gather_chunks(x: torch.Tensor, chunks: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rows of whole chunks, ``(b, H, k*c, d)``.

    ``x`` is ``(b, T, d)`` (or ``(T, d)``, shared by the batch) and ``chunks`` ``(b, H, k)``. One
    ``index_select`` of contiguous ``c*d`` blocks per sequence: several times faster on CPU than advanced indexing
    of single token rows.
    """
    batch, heads, count = chunks.shape
    shared = x.dim() == 2
    rows = x if shared else x[0]
    dim = rows.shape[-1]
    num = rows.shape[0] // chunk_size
    out = []
    for i in range(batch):
        source = (x if shared else x[i])[: num * chunk_size].reshape(num, chunk_size * dim)
        out.append(source.index_select(0, chunks[i].reshape(-1)))
    gathered = out[0].unsqueeze(0) if batch == 1 else torch.stack(out)  # stack would copy even one block
    return gathered.view(batch, heads, count * chunk_size, dim)


def dtype_named(name: object) -> torch.dtype:
    """The model dtype called ``name`` (``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"``).

    Raises:
        ValueError: for any other name.
    """
    if not isinstance(name, str) or name not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {list(MODEL_DTYPES)} but got {name!r}")
    return MODEL_DTYPES[name]


# ---------------------------------------------------------------------- quantization
def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization along the last axis, one scale per ``group_size`` values.

    Args:
        x: ``(..., n)`` floating tensor.
        bits: 8 or 4.
        group_size: values per scale (the last group may be shorter).

    Returns:
        ``(values, scales)``: int8 ``(..., n)`` for 8 bits, uint8 ``(..., ceil(n/2))`` (two values a byte, low
        nibble first) for 4 bits; float32 scales ``(..., ceil(n/group_size))``. Each value is within half a scale
        of ``x``.
    """
    n = x.shape[-1]
    groups = math.ceil(n / group_size)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group_size - n)).unflatten(-1, (groups, group_size))
    qmax = 2 ** (bits - 1) - 1
    scales = (padded.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(padded / scales).clamp_(-qmax, qmax).to(torch.int8).flatten(-2)[..., :n]
    scales = scales.squeeze(-1).contiguous()
    if bits == 8:
        return q.contiguous(), scales
    if n % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = (q + 8).to(torch.uint8)  # 1..15
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous(), scales


def dequantize(
    values: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(..., length)`` in ``dtype``."""
    full = scales.shape[-1] * group_size
    out = torch.empty((*values.shape[:-1], full), dtype=torch.float32, device=values.device)
    result = dequantize_into(out, values, scales, bits, group_size, length)
    return result if dtype == torch.float32 else result.to(dtype)


def dequantize_into(
    out: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, length: int
) -> torch.Tensor:
    """:func:`dequantize` into ``out``, a float32 ``(..., groups * group_size)`` view with a unit last stride.

    Written in place (two passes over the values for int8, three for int4): decode reads the factors at every
    step, and the temporaries of a straightforward unpack cost more than the arithmetic. Returns
    ``out[..., :length]``.
    """
    groups = scales.shape[-1]
    full = groups * group_size
    if bits == 4:
        out[..., 0:length:2] = values[..., : (length + 1) // 2] & 15
        out[..., 1:length:2] = values[..., : length // 2] >> 4
        out[..., :length].sub_(8.0)
    else:
        out[..., :length] = values[..., :length]
    if full > length:
        out[..., length:] = 0.0
    out.unflatten(-1, (groups, group_size)).mul_(scales.unsqueeze(-1))
    return out[..., :length]


@functools.lru_cache(maxsize=8)
def _hadamard(size: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix ``(size, size)``, symmetric (its own inverse), float32."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(size)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Multiply the last axis by a block-diagonal Hadamard matrix (full blocks of ``block``; the rest unchanged).

    The matrix is symmetric and orthogonal, so applying this twice gives ``x`` back.
    """
    n = x.shape[-1]
    full = n // block * block
    if full == 0:
        return x
    h = _hadamard(block).to(device=x.device, dtype=x.dtype)
    head = (x[..., :full].unflatten(-1, (full // block, block)) @ h).flatten(-2)
    return torch.cat([head, x[..., full:]], dim=-1) if full < n else head


@dataclass
class Band:
    """Consecutive directions of quantized factors, stored at one bit width.

    Attributes:
        bits: 8 or 4.
        size: directions in the band.
        basis_values: ``U`` columns of the band (unit norm, rotated if the form rotates): ``(b, T, size)`` int8 or
            ``(b, T, ceil(size/2))`` uint8 (int4 packed).
        basis_scales: ``(b, T, ceil(size/g))`` float32.
        matrix_values: the band's rows of ``B`` ``(b, G, size, D)`` (rotated along ``D`` and the band's directions if
            the form rotates), int8 or packed.
        matrix_scales: ``(b, G, size, ceil(D/g))`` float32.
    """

    bits: int
    size: int
    basis_values: torch.Tensor
    basis_scales: torch.Tensor
    matrix_values: torch.Tensor
    matrix_scales: torch.Tensor

    @classmethod
    def quantize(cls, basis: torch.Tensor, matrices: torch.Tensor, bits: int, group_size: int, rotation: str) -> Band:
        """Quantize float32 ``basis`` ``(b, T, k)`` and ``matrices`` ``(b, G, k, D)`` (unit-norm basis columns)."""
        if rotation == "hadamard":
            basis = rotate(basis, group_size)
            # U H and H B keep the product: rotate B's rank axis too (undone by `basis() @ matrix()` pairing), and
            # its feature axis (undone in `matrix`).
            matrices = rotate(rotate(matrices, group_size).transpose(-1, -2), group_size).transpose(-1, -2)
        basis_values, basis_scales = quantize(basis, bits, group_size)
        matrix_values, matrix_scales = quantize(matrices, bits, group_size)
        return cls(bits, basis.shape[-1], basis_values, basis_scales, matrix_values, matrix_scales)

    def tensors(self) -> list[torch.Tensor]:
        """Values and scales of both factors."""
        return [self.basis_values, self.basis_scales, self.matrix_values, self.matrix_scales]

    def replaced(self, tensors: list[torch.Tensor]) -> Band:
        """The same band over other tensors (in :meth:`tensors` order)."""
        return Band(self.bits, self.size, *tensors)


@dataclass
class QuantizedFactors(StoredFactors):
    """Factors stored as int8 or packed int4 with float32 group scales (:func:`quantize`), in bands of directions.

    An ``"int4"`` form may keep its first directions (the largest singular values) in an int8 band: those carry most
    of the energy, and int4's rounding error on them would cost more than the bytes saved (:func:`choose_head`).

    Attributes:
        fmt: the storage form.
        bands: the bands in direction order.
        dim: ``D``.
        dtype: the dtype reads return by default (the model's).
        balance: ``(b, r)`` float32 for 2-byte models, else ``None``: reads scale the basis columns by it and the
            matrix rows by its inverse, so neither exceeds about ``sqrt(s_i)`` in float16 (``B`` alone carries the
            singular values, which grow like ``|x| sqrt(T)``).
    """

    fmt: FactorFormat
    bands: list[Band]
    dim: int
    dtype: torch.dtype
    balance: torch.Tensor | None = None
    quantized: ClassVar[bool] = True

    @classmethod
    def from_float(
        cls,
        basis: torch.Tensor,
        matrices: torch.Tensor,
        fmt: FactorFormat,
        head: int = 0,
        dtype: torch.dtype | None = None,
    ) -> QuantizedFactors:
        """Quantize float factors ``basis`` ``(b, T, r)`` and ``matrices`` ``(b, G, r, D)`` (any split of S).

        The columns of ``basis`` are first scaled to unit norm (their norms move into the matrices), so every
        direction of ``U`` is quantized on the same scale and each row of ``B`` gets its own.

        Args:
            basis: the token basis.
            matrices: the reconstruction matrices.
            fmt: a quantized form.
            head: for ``"int4"``, the first ``head`` directions are stored in int8.
            dtype: the dtype reads return and the cache's (default: ``basis``'s); factors folded or trimmed in
                float32 for a 16-bit model pass the model's, so they get its ``balance`` and load as its cache.
        """
        bits = fmt.bits
        if bits is None:
            raise ValueError(f"{fmt.form!r} is not a quantized form")
        rank = basis.shape[-1]
        if not 0 <= head <= rank:
            raise ValueError(f"`head` must be in [0, {rank}] but got {head}")
        basis32, matrices32 = unit_columns(basis, matrices)
        cuts = [0, head, rank] if bits == 4 and head else [0, rank]
        bands = [
            Band.quantize(
                basis32[..., lo:hi],
                matrices32[..., lo:hi, :],
                8 if hi == head else bits,
                fmt.group_size,
                fmt.rotation,
            )  # fmt: skip
            for lo, hi in zip(cuts, cuts[1:], strict=False)
            if hi > lo
        ]
        out = dtype or basis.dtype
        factors = cls(fmt, bands, matrices.shape[-1], out)
        if torch.empty((), dtype=out).element_size() == 2:
            rows = torch.stack([factors.matrix(s, torch.float32) for s in range(factors.num_layers)], dim=1)
            norms = rows.pow(2).sum(dim=(1, 3)).sqrt()  # (b, r): ~s_i
            factors.balance = norms.clamp_min(torch.finfo(torch.float32).tiny).sqrt().contiguous()
        return factors

    @property
    def rank(self) -> int:
        """Number of directions kept."""
        return sum(band.size for band in self.bands)

    @property
    def head(self) -> int:
        """Directions of an ``"int4"`` form stored in int8 (all of them where its byte budget allows; 0 for int8)."""
        return self.bands[0].size if self.fmt.bits == 4 and self.bands[0].bits == 8 else 0

    @property
    def tokens(self) -> int:
        """Rows of the token basis."""
        return self.bands[0].basis_values.shape[1]

    @property
    def num_layers(self) -> int:
        """G, layers of the group."""
        return self.bands[0].matrix_values.shape[1]

    def _padded(self, size: int) -> int:
        return math.ceil(size / self.fmt.group_size) * self.fmt.group_size

    def _rows(self, parts: list[tuple[Band, torch.Tensor, torch.Tensor]], dtype: torch.dtype | None) -> torch.Tensor:
        """Bands' basis values and scales (in band order) dequantized side by side into one buffer: ``(..., r)``.

        Bands are written in order, each with its padding to whole groups: a band's padding lies inside the next
        band's columns (shorter than one group, the next band has at least one), which overwrite it afterwards.
        """
        g = self.fmt.group_size
        lead = parts[0][1].shape[:-1]
        out = torch.empty((*lead, self.rank - parts[-1][0].size + self._padded(parts[-1][0].size)),
                          dtype=torch.float32, device=parts[0][1].device)  # fmt: skip
        start = 0
        for band, values, scales in parts:
            dequantize_into(out[..., start : start + self._padded(band.size)], values, scales, band.bits, g, band.size)
            start += band.size
        result = out[..., : self.rank]
        if self.balance is not None:
            shape = (self.balance.shape[0], *[1] * (result.dim() - 2), self.rank)
            result = result * self.balance.view(shape)
        return result.to(dtype or self.dtype) if (dtype or self.dtype) != torch.float32 else result

    def basis(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, T, r)``, dequantized (rotated if the form rotates: :meth:`matrix` matches it)."""
        return self._rows([(b, b.basis_values, b.basis_scales) for b in self.bands], dtype)

    def chunk_rows(self, chunks: torch.Tensor, chunk_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of whole chunks, dequantized after the gather (only those rows are unpacked)."""
        parts = [
            (b, gather_chunks(b.basis_values, chunks, chunk_size), gather_chunks(b.basis_scales, chunks, chunk_size))
            for b in self.bands
        ]
        return self._rows(parts, dtype)

    def matrix(self, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, r, D)`` for layer ``slot``, dequantized.

        With rotation a band stores ``H B H_D``; ``H_D`` is undone here, leaving ``H B``, which matches the band's
        ``basis()`` columns ``U H``: ``(U H)(H B) = U B``.
        """
        first = self.bands[0].matrix_values
        out = torch.empty(
            (first.shape[0], self.rank, self._padded(self.dim)), dtype=torch.float32, device=first.device
        )
        start = 0
        for band in self.bands:
            rows = out[:, start : start + band.size]
            dequantize_into(rows, band.matrix_values[:, slot], band.matrix_scales[:, slot], band.bits,
                            self.fmt.group_size, self.dim)  # fmt: skip
            start += band.size
        result = out[..., : self.dim]
        if self.fmt.rotation == "hadamard":
            result = rotate(result, self.fmt.group_size)
        if self.balance is not None:
            result = result / self.balance.unsqueeze(-1)
        return result.to(dtype or self.dtype) if (dtype or self.dtype) != torch.float32 else result

    def tensors(self) -> list[torch.Tensor]:
        """Values and scales of every band (and the balance, if any)."""
        held = [t for band in self.bands for t in band.tensors()]
        return held + [self.balance] if self.balance is not None else held

    _BAND_FIELDS = ("basis_values", "basis_scales", "matrix_values", "matrix_scales")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Each band's values and scales, and the form, band widths, ``D`` and read dtype."""
        tensors = {
            f"band{j}.{name}": tensor
            for j, band in enumerate(self.bands)
            for name, tensor in zip(self._BAND_FIELDS, band.tensors(), strict=True)
        }
        if self.balance is not None:
            tensors["balance"] = self.balance
        meta = {
            "form": self.fmt.form, "group_size": self.fmt.group_size, "rotation": self.fmt.rotation,
            "bands": [[band.bits, band.size] for band in self.bands], "dim": self.dim,
            "dtype": str(self.dtype).removeprefix("torch."),
        }  # fmt: skip
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedFactors:
        """Inverse of :meth:`state`.

        Raises:
            ValueError: if a tensor is missing or the metadata does not describe quantized factors.
        """
        fmt = FactorFormat(meta["form"], int(meta["group_size"]), meta["rotation"])
        bands = []
        for j, (bits, size) in enumerate(meta["bands"]):
            missing = [name for name in cls._BAND_FIELDS if f"band{j}.{name}" not in tensors]
            if missing:
                raise ValueError(f"quantized factors lack band {j}'s {missing}")
            bands.append(Band(int(bits), int(size), *(tensors[f"band{j}.{name}"] for name in cls._BAND_FIELDS)))
        return cls(fmt, bands, int(meta["dim"]), dtype_named(meta["dtype"]), tensors.get("balance"))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedFactors:
        """A copy with ``fn`` applied to every tensor."""
        bands = [band.replaced([fn(t) for t in band.tensors()]) for band in self.bands]
        balance = fn(self.balance) if self.balance is not None else None
        return QuantizedFactors(self.fmt, bands, self.dim, self.dtype, balance)

    def crop(self, length: int) -> QuantizedFactors:
        """The first ``length`` token rows (scales are per row, so they crop with it)."""
        bands = [
            band.replaced(
                [
                    band.basis_values[:, :length].clone(),
                    band.basis_scales[:, :length].clone(),
                    band.matrix_values,
                    band.matrix_scales,
                ]
            )  # fmt: skip
            for band in self.bands
        ]
        return QuantizedFactors(self.fmt, bands, self.dim, self.dtype, self.balance)


def unit_columns(basis: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 factors with the same product and unit-norm basis columns (the norms moved into the matrices)."""
    basis32, matrices32 = basis.float(), matrices.float()
    norms = torch.linalg.vector_norm(basis32, dim=1, keepdim=True)  # (b, 1, r)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return basis32 / safe, matrices32 * safe.transpose(1, 2).unsqueeze(1)


def _direction_errors(basis: torch.Tensor, matrices: torch.Tensor, bits: int, fmt: FactorFormat) -> torch.Tensor:
    """``(r,)``: the squared error each direction adds to the product when both factors are stored at ``bits``.

    ``||s_i du_i||^2 + ||db_i||^2`` summed over the batch and layers, with ``basis`` of unit columns and
    ``matrices`` carrying the singular values. Groups of ``fmt.group_size`` directions start at direction 0, as
    they do in every band that starts at a multiple of the group size.
    """
    band = Band.quantize(basis, matrices, bits, fmt.group_size, fmt.rotation)
    kept = QuantizedFactors(fmt, [band], matrices.shape[-1], torch.float32)
    du = kept.basis() - (rotate(basis, fmt.group_size) if fmt.rotation == "hadamard" else basis)
    if fmt.rotation == "hadamard":
        du = rotate(du, fmt.group_size)  # back to the directions' own axes
    energy = matrices.pow(2).sum(dim=(1, 3))  # (b, r): s_i^2 per sequence
    stored = torch.stack([kept.matrix(slot) for slot in range(matrices.shape[1])], dim=1)
    if fmt.rotation == "hadamard":
        stored = rotate(stored.transpose(-1, -2), fmt.group_size).transpose(-1, -2)
    db = stored - matrices
    return (energy * du.pow(2).sum(dim=1)).sum(dim=0) + db.pow(2).sum(dim=(0, 1, 3))


def choose_head(
    basis: torch.Tensor,
    matrices: torch.Tensor,
    fmt: FactorFormat,
    budget: int,
    heads: list[int] | None = None,
    per_direction: int = 0,
) -> tuple[int, int]:
    """How many leading directions an ``"int4"`` form keeps in int8, and the rank that then fits ``budget`` bytes.

    The error of the product is estimated per direction from the spectrum: a direction left out costs its energy
    ``s_i^2``, one kept costs its rounding error at its width (:func:`_direction_errors`). Heads are tried in steps
    of ``fmt.group_size`` (so rounding groups stay aligned); the head with the least estimated error wins.

    Args:
        basis: ``(b, T, r)`` float factors of the largest rank the budget allows at int4 (any split of S).
        matrices: ``(b, G, r, D)``.
        fmt: an ``"int4"`` form.
        budget: bytes the side may hold per sequence.
        heads: the head sizes to try (default: every multiple of ``fmt.group_size`` up to ``r``).
        per_direction: further bytes each kept direction costs (the balance of 2-byte models).

    Returns:
        ``(head, rank)`` with ``head <= rank <= r``.
    """
    basis32, matrices32 = unit_columns(basis, matrices)
    batch, tokens, rank = basis32.shape
    groups, dim = matrices32.shape[1], matrices32.shape[-1]
    energy = matrices32.pow(2).sum(dim=(0, 1, 3)) / batch
    err4 = _direction_errors(basis32, matrices32, 4, fmt) / batch
    err8 = _direction_errors(basis32, matrices32, 8, fmt) / batch
    cum = [torch.cat([torch.zeros(1, dtype=torch.float64), x.double().cpu().cumsum(0)]) for x in (energy, err4, err8)]
    total_energy = float(cum[0][-1])

    def band_bytes(size: int, bits: int) -> int:
        if size <= 0:
            return 0
        g = fmt.group_size
        return packed_bytes(tokens, size, bits, g) + packed_bytes(groups * size, dim, bits, g) + size * per_direction

    def fit(head: int) -> tuple[float, int, int] | None:
        """(estimated error, head, rank) with the most int4 directions that fit after ``head`` int8 ones."""
        spent = band_bytes(head, 8)
        if spent > budget:
            return None
        low, high = head, rank
        while low < high:  # the largest total rank whose int4 band still fits
            mid = (low + high + 1) // 2
            if spent + band_bytes(mid - head, 4) <= budget:
                low = mid
            else:
                high = mid - 1
        error = float(cum[2][head] + cum[1][low] - cum[1][head]) + total_energy - float(cum[0][low])
        return error, head, low

    tried = [fit(min(head, rank)) for head in (heads if heads is not None else range(0, rank + 1, fmt.group_size))]
    fitting = [t for t in tried if t is not None and t[2] > 0]
    if heads is not None and not fitting:
        logger.warning(
            "factor_head=%s does not fit a budget of %d bytes: all directions stored in int4", heads, budget
        )
    # No head fits: all int4, at least one direction (the caller's rank check has made sure one fits).
    best = min(fitting) if fitting else (0.0, 0, max(1, (fit(0) or (0.0, 0, 1))[2]))
    return best[1], best[2]
