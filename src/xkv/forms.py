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
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Storage forms of factors (``XKVConfig.factor_form``).
FACTOR_FORMS = ("model", "int8", "int4")
#: Rotations applied before quantizing (``XKVConfig.factor_rotation``).
FACTOR_ROTATIONS = ("none", "hadamard")
_BITS = {"int8": 8, "int4": 4}
_SCALE_BYTES = 4  # float32 scales


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
        packed = length if self.bits == 8 else (length + 1) // 2
        return rows * (packed + math.ceil(length / self.group_size) * _SCALE_BYTES)

    def factor_bytes(self, tokens: int, group_size: int, dim: int, rank: int, itemsize: int) -> int:
        """Bytes of one group side at ``rank``: ``U`` ``(T, r)`` plus ``G`` matrices ``(r, D)`` (batch 1)."""
        return self.values_bytes(tokens, rank, itemsize) + self.values_bytes(group_size * rank, dim, itemsize)


class StoredFactors(ABC):
    """One group side's factors, whatever their storage form.

    ``basis() @ matrix(slot)`` is layer ``slot``'s ``(b, T, D)`` rebuild. Edits return new objects or replace
    tensors whole, so a tensor shared with another cache (``XKVCache.with_ranks``) is never written in place.
    """

    @property
    @abstractmethod
    def rank(self) -> int:
        """Number of directions kept."""

    @property
    @abstractmethod
    def tokens(self) -> int:
        """Rows of the token basis."""

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
    if bits == 4:
        unpacked = torch.stack(((values & 15), (values >> 4)), dim=-1).flatten(-2)
        q = unpacked.to(torch.int8) - 8
    else:
        q = values
    groups = scales.shape[-1]
    q = torch.nn.functional.pad(q[..., :length], (0, groups * group_size - length))
    out = q.unflatten(-1, (groups, group_size)).to(torch.float32) * scales.unsqueeze(-1)
    return out.flatten(-2)[..., :length].to(dtype)


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
class QuantizedFactors(StoredFactors):
    """Factors stored as int8 or packed int4 with float32 group scales (:func:`quantize`).

    Attributes:
        fmt: the storage form.
        basis_values: ``U`` (unit-norm columns, rotated if ``fmt.rotation``): ``(b, T, r)`` int8 or
            ``(b, T, ceil(r/2))`` uint8.
        basis_scales: ``(b, T, ceil(r/g))`` float32.
        matrix_values: ``B`` ``(b, G, r, D)`` (rotated along ``D`` if ``fmt.rotation``), int8 or packed.
        matrix_scales: ``(b, G, r, ceil(D/g))`` float32.
        num_directions: ``r``.
        dim: ``D``.
        dtype: the dtype reads return by default (the model's).
    """

    fmt: FactorFormat
    basis_values: torch.Tensor
    basis_scales: torch.Tensor
    matrix_values: torch.Tensor
    matrix_scales: torch.Tensor
    num_directions: int
    dim: int
    dtype: torch.dtype

    @classmethod
    def from_float(cls, basis: torch.Tensor, matrices: torch.Tensor, fmt: FactorFormat) -> QuantizedFactors:
        """Quantize float factors ``basis`` ``(b, T, r)`` and ``matrices`` ``(b, G, r, D)`` (any split of S).

        The columns of ``basis`` are first scaled to unit norm (their norms move into the matrices), so every
        direction of ``U`` is quantized on the same scale and each row of ``B`` gets its own.
        """
        bits = fmt.bits
        if bits is None:
            raise ValueError(f"{fmt.form!r} is not a quantized form")
        dtype = basis.dtype
        basis32, matrices32 = basis.float(), matrices.float()
        norms = torch.linalg.vector_norm(basis32, dim=1, keepdim=True)  # (b, 1, r)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        basis32 = basis32 / safe
        matrices32 = matrices32 * safe.transpose(1, 2).unsqueeze(1)  # (b, 1, r, 1)
        if fmt.rotation == "hadamard":
            basis32 = rotate(basis32, fmt.group_size)
            matrices32 = rotate(matrices32, fmt.group_size)
            # U H and H B keep the product: rotate B's rank axis too, then undo that on read (see `matrix`).
            matrices32 = rotate(matrices32.transpose(-1, -2), fmt.group_size).transpose(-1, -2)
        basis_values, basis_scales = quantize(basis32, bits, fmt.group_size)
        matrix_values, matrix_scales = quantize(matrices32, bits, fmt.group_size)
        return cls(
            fmt, basis_values, basis_scales, matrix_values, matrix_scales, basis.shape[-1], matrices.shape[-1], dtype
        )

    @property
    def rank(self) -> int:
        """Number of directions kept."""
        return self.num_directions

    @property
    def tokens(self) -> int:
        """Rows of the token basis."""
        return self.basis_values.shape[1]

    def basis(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, T, r)``, dequantized (rotated if the form rotates: :meth:`matrix` undoes it)."""
        bits = self.fmt.bits
        assert bits is not None
        return dequantize(
            self.basis_values, self.basis_scales, bits, self.fmt.group_size, self.rank, dtype or self.dtype
        )

    def chunk_rows(self, chunks: torch.Tensor, chunk_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of whole chunks, dequantized after the gather (only those rows are unpacked)."""
        bits = self.fmt.bits
        assert bits is not None
        values = gather_chunks(self.basis_values, chunks, chunk_size)
        scales = gather_chunks(self.basis_scales, chunks, chunk_size)
        return dequantize(values, scales, bits, self.fmt.group_size, self.rank, dtype or self.dtype)

    def matrix(self, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(b, r, D)`` for layer ``slot``, dequantized.

        With rotation the stored ``H_r B H_D`` is turned back to ``H_r B``, which matches ``basis()`` (``U H_r``):
        ``(U H_r)(H_r B) = U B``.
        """
        bits = self.fmt.bits
        assert bits is not None
        b = dequantize(
            self.matrix_values[:, slot], self.matrix_scales[:, slot], bits, self.fmt.group_size, self.dim,
            torch.float32,
        )  # fmt: skip
        if self.fmt.rotation == "hadamard":
            b = rotate(b, self.fmt.group_size)  # undo H_D: the rank-axis rotation stays, matching the basis
        return b.to(dtype or self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Values and scales of both factors."""
        return [self.basis_values, self.basis_scales, self.matrix_values, self.matrix_scales]

    def _with(self, basis_values, basis_scales, matrix_values, matrix_scales) -> QuantizedFactors:
        return QuantizedFactors(
            self.fmt, basis_values, basis_scales, matrix_values, matrix_scales, self.num_directions, self.dim,
            self.dtype,
        )  # fmt: skip

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedFactors:
        """A copy with ``fn`` applied to every tensor."""
        return self._with(*(fn(t) for t in self.tensors()))

    def crop(self, length: int) -> QuantizedFactors:
        """The first ``length`` token rows (scales are per row, so they crop with it)."""
        return self._with(
            self.basis_values[:, :length].clone(), self.basis_scales[:, :length].clone(), self.matrix_values,
            self.matrix_scales,
        )  # fmt: skip
