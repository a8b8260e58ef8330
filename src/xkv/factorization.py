"""Cross-layer low-rank factorization (xKV, arXiv 2503.18893, section 3): pure tensor functions, no transformers.

The caches of the G layers of a group are concatenated along the feature axis, ``A = [X_1 | ... | X_G]`` of shape
``(tokens, G * D)``, and one truncated SVD ``A ~ U_r S_r V_r^T`` gives a token basis shared by the group plus one
small reconstruction matrix per layer: ``X_l ~ U_r @ B_l`` of shape ``(r, D)``. Storing ``U_r`` once and the
``B_l`` costs ``T*r + r*G*D`` numbers instead of ``G*T*D``. The singular values are split between the factors
(``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T``): ``S_r V_r^T`` alone grows like ``|x| sqrt(T)`` and overflows float16 on
long prefixes, the split keeps both near ``|x|``. Quantized storage forms live in :mod:`xkv.forms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from xkv.budget import full_rank
from xkv.config import parse_niter
from xkv.forms import FactorFormat, QuantizedFactors, StoredFactors, gather_chunks


@dataclass
class LowRankFactors(StoredFactors):
    """The factors of one group and one side (keys or values), in a floating dtype (the ``"model"`` form).

    Attributes:
        token_basis: ``(batch, tokens, rank)``, ``U_r sqrt(S_r)``, shared by the group's layers.
        reconstruction: ``(batch, group_size, rank, dim)``, ``sqrt(S_r) V_r^T`` restricted to layer ``l``'s columns.
    """

    token_basis: torch.Tensor
    reconstruction: torch.Tensor

    @property
    def rank(self) -> int:
        """Number of singular vectors kept."""
        return self.token_basis.shape[-1]

    @property
    def tokens(self) -> int:
        """Rows of the token basis."""
        return self.token_basis.shape[1]

    @property
    def num_layers(self) -> int:
        """G, layers of the group."""
        return self.reconstruction.shape[1]

    def basis(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(batch, tokens, rank)`` token basis (the stored tensor itself when ``dtype`` matches)."""
        return self.token_basis if dtype is None else self.token_basis.to(dtype)

    def chunk_rows(self, chunks: torch.Tensor, chunk_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows of whole chunks: ``chunks`` ``(b, H, k)`` -> ``(b, H, k*c, rank)``."""
        rows = gather_chunks(self.token_basis, chunks, chunk_size)
        return rows if dtype is None else rows.to(dtype)

    def matrix(self, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(batch, rank, dim)`` reconstruction matrix of layer ``slot``."""
        matrix = self.reconstruction[:, slot]
        return matrix if dtype is None else matrix.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Both factors."""
        return [self.token_basis, self.reconstruction]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Both factors, and the form ``"model"``."""
        return {"token_basis": self.token_basis, "reconstruction": self.reconstruction}, {"form": "model"}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LowRankFactors:
        """A copy with ``fn`` applied to both factors."""
        return LowRankFactors(fn(self.token_basis), fn(self.reconstruction))

    def crop(self, length: int) -> LowRankFactors:
        """The first ``length`` token rows (copied; the reconstruction is shared)."""
        return LowRankFactors(self.token_basis[:, :length].clone(), self.reconstruction)

    def truncate(self, rank: int) -> LowRankFactors:
        """The first ``rank`` directions, copied.

        Singular values are sorted: these are the best rank-``rank`` factors when they came from an exact SVD.
        """
        return LowRankFactors(self.token_basis[..., :rank].clone(), self.reconstruction[:, :, :rank].clone())

    def recompressed(self, rank: int) -> LowRankFactors:
        """The best rank-``rank`` factors of the product ``U W``, whatever basis ``U`` is in.

        :meth:`truncate` is right only for sorted singular directions; after a rotation or a quantization round
        trip the columns mix them. Here ``U = Q R`` (thin QR), then the SVD of the small ``R W`` gives the
        directions (Brand's update with no new rows). Computed in float32 (float64 stays), returned in that dtype.
        """
        batch, tokens, held = self.token_basis.shape
        num_layers, dim = self.reconstruction.shape[1], self.reconstruction.shape[-1]
        dtype = torch.float64 if self.token_basis.dtype == torch.float64 else torch.float32
        q, r = torch.linalg.qr(self.token_basis.to(dtype))
        flat = self.reconstruction.to(dtype).transpose(1, 2).reshape(batch, held, num_layers * dim)
        u, s, vh = torch.linalg.svd(r @ flat, full_matrices=False)
        root = s[..., :rank].sqrt()
        basis = (q @ u[..., :rank]) * root.unsqueeze(-2)
        recon = (root.unsqueeze(-1) * vh[..., :rank, :]).reshape(batch, rank, num_layers, dim).transpose(1, 2)
        return LowRankFactors(basis.contiguous(), recon.contiguous())

    def stored(self, fmt: FactorFormat, head: int = 0, dtype: torch.dtype | None = None) -> StoredFactors:
        """These factors in storage form ``fmt`` (``self`` for ``"model"``); ``head``: int8 directions of int4.

        ``dtype``: the quantized form's dtype (default: these factors'; see :meth:`QuantizedFactors.from_float`).
        """
        if fmt.form == "model":
            return self
        return QuantizedFactors.from_float(self.token_basis, self.reconstruction, fmt, head, dtype)


def _randomized_svd(
    matrix: torch.Tensor, rank: int, oversample: int, niter: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko, Martinsson, Tropp 2011, algorithms 4.4 and 5.1) with whole or half power iterations.

    ``matrix`` ``(batch, rows, cols)`` (tokens x features) is read in ``2 * niter + 2`` passes (products with a
    ``width``-column block). The sketch alternates sides: ``Y = A Omega`` on the token side (``Omega`` Gaussian),
    ``Z = A^T Y`` on the feature side, and so on.
    For a tall matrix (more tokens than features, long prefixes) only the feature side's blocks are orthonormalized
    between passes (a QR of ``cols x width`` is cheap, one of ``rows x width`` costs about a pass), which spans the
    same subspaces as Halko's QR after every product: the error matched to 3-4 digits on SmolLM2's KV groups
    (``benchmarks/prefill/README.md``). A whole number of iterations ends on the token side with ``Q`` and
    finishes as ``A ~ Q (Q^T A)``; a half iteration ends on the feature side with ``Z`` and finishes as
    ``A ~ (A Z) Z^T``, the SVD of ``A Z`` taken through its QR: one pass fewer than the next whole number, typically
    at an error between the two. A wide matrix (a prefix shorter than ``G*D``) orthonormalizes both sides, as
    Halko's algorithm 4.4 does.

    ``torch.svd_lowrank`` draws its test matrix from the global RNG; this takes an explicit generator so factors are
    reproducible without touching global state.

    Returns:
        ``(u, s, vh)`` with ``width = min(rank + oversample, rows, cols)`` directions, largest first.
    """
    batch, rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    # One test matrix over the features for every sequence of the batch: a sequence gets the factors it gets alone,
    # and left padding (zero rows) changes them only by rounding (as long as the randomized path is taken).
    test = torch.randn(cols, width, generator=generator, dtype=matrix.dtype, device="cpu").to(matrix.device)
    long = matrix @ test  # A Omega: (batch, rows, width)
    halves = round(2 * niter)
    side: torch.Tensor | None = None
    for _ in range((halves + 1) // 2):  # the token side's block is left unnormalized where it is the long one
        if rows < cols:  # a short prefix of a wide group: the token side is the cheap one too
            long = torch.linalg.qr(long).Q
        side = torch.linalg.qr(matrix.mT @ long).Q  # (batch, cols, width)
        long = matrix @ side
    if halves % 2:  # a half iteration: A ~ (A Z) Z^T
        assert side is not None
        q, r = torch.linalg.qr(long)
        u_small, s, vh_small = torch.linalg.svd(r, full_matrices=False)
        return q @ u_small, s, vh_small @ side.mT
    basis = torch.linalg.qr(long).Q  # whole iterations: A ~ Q (Q^T A)
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def _gram_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``matrix`` from the eigendecomposition of its smaller Gram matrix.

    For a tall ``(batch, rows, cols)`` matrix (more tokens than ``G*D`` features) ``A^T A`` is ``cols x cols``: one
    pass over ``A`` to build it, an eigendecomposition whose cost depends on ``cols`` only (not on the tokens, not
    on the rank), and one product ``A V`` for the token side. A wide matrix uses ``A A^T`` the same way. The Gram
    matrix is accumulated in the input's precision and decomposed in float64; it squares the condition number, so
    directions whose singular value is below about ``sqrt(eps)`` of the largest (3e-4 in float32) come out noisy,
    far below any rank a compression factor keeps (the tests compare the error against ``torch.linalg.svd``).
    Deterministic: no test matrix, and zero rows (left padding) leave the Gram matrix unchanged.

    Returns:
        ``(u, s, vh)`` with ``rank`` directions, largest first; a direction with a zero singular value has a zero
        column in ``u``.
    """
    tall = matrix.shape[-2] >= matrix.shape[-1]
    gram = matrix.mT @ matrix if tall else matrix @ matrix.mT
    values, vectors = torch.linalg.eigh(gram.double())  # ascending
    values, vectors = values.flip(-1)[..., :rank], vectors.flip(-1)[..., :rank]
    s = values.clamp(min=0).sqrt()
    kept = s > s[..., :1] * 1e-6  # below: no direction to speak of (rank-deficient input)
    inverse = torch.where(kept, 1 / torch.where(kept, s, 1), 0).to(matrix.dtype)
    vectors, s = vectors.to(matrix.dtype), s.to(matrix.dtype)
    if tall:  # A V = U S
        return (matrix @ vectors) * inverse.unsqueeze(-2), s, vectors.mT
    return vectors, s, (matrix.mT @ vectors * inverse.unsqueeze(-2)).mT  # A^T U = V S


def cross_layer_svd(
    layers: list[torch.Tensor],
    rank: int,
    *,
    method: Literal["exact", "randomized", "gram"] = "exact",
    oversample: int = 10,
    niter: float = 2,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> LowRankFactors:
    """Factor the caches of one layer group with a shared token basis.

    Args:
        layers: G tensors of shape ``(batch, tokens, dim)`` (keys pre-RoPE, or values). Upcast to float32 for the
            SVD (float64 stays float64).
        rank: singular vectors kept, ``1 <= rank <= min(tokens, G * dim)``.
        method: ``"exact"`` (``torch.linalg.svd``), ``"gram"`` (the same subspace from the eigendecomposition of
            the ``G*D x G*D`` Gram matrix, see :func:`_gram_svd`) or ``"randomized"`` (exact where
            ``rank + oversample`` reaches the matrix's smaller side: the range finder would be as wide as the
            matrix).
        oversample: extra random directions (randomized only).
        niter: power iterations, a multiple of 0.5 (used by the randomized method; a half iteration saves a pass
            over the matrix, see :func:`_randomized_svd`).
        seed: seed of the random test matrix (randomized only).
        out_dtype: dtype of the stored factors; defaults to the input dtype.

    Returns:
        Factors with ``token_basis`` ``(batch, tokens, rank)`` (``U sqrt(S)``) and ``reconstruction``
        ``(batch, G, rank, dim)`` (``sqrt(S) V^T``), both contiguous, each in a storage of its own size.

    Raises:
        ValueError: if the layers disagree in shape, the rank is out of range, or ``method`` or ``niter`` is not one
            of the accepted values (``niter`` is checked whatever the method).
    """
    if not layers:
        raise ValueError("`layers` must hold at least one tensor")
    shape = layers[0].shape
    if len(shape) != 3:
        raise ValueError(f"each layer must be (batch, tokens, dim) but got shape {tuple(shape)}")
    for i, layer in enumerate(layers):
        if layer.shape != shape:
            raise ValueError(f"layer {i} of the group has shape {tuple(layer.shape)}, layer 0 has {tuple(shape)}")
    batch, tokens, dim = shape
    group_size = len(layers)
    bound = full_rank(tokens, group_size, dim)
    if not 1 <= rank <= bound:
        raise ValueError(f"`rank` must be in [1, {bound}] for a ({tokens}, {group_size * dim}) group but got {rank}")
    if method not in ("exact", "randomized", "gram"):
        raise ValueError(f"`method` must be one of ['exact', 'randomized', 'gram'] but got {method!r}")
    niter = parse_niter(niter, "niter")
    out_dtype = out_dtype or layers[0].dtype
    compute_dtype = torch.float64 if layers[0].dtype == torch.float64 else torch.float32
    stacked = torch.cat([layer.to(compute_dtype) for layer in layers], dim=-1)  # (batch, tokens, G*dim)
    # A range finder as wide as the matrix saves nothing (and squares the condition number in its power steps).
    if method == "gram":
        u, s, vh = _gram_svd(stacked, rank)
    elif method == "exact" or rank + oversample >= min(tokens, group_size * dim):
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    else:
        generator = torch.Generator().manual_seed(seed)
        u, s, vh = _randomized_svd(stacked, rank, oversample, niter, generator)
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    root = s.sqrt()
    u = u * root.unsqueeze(-2)
    reconstruction = (root.unsqueeze(-1) * vh).reshape(batch, rank, group_size, dim).transpose(1, 2)
    # clone(): a slice of the SVD output would keep the discarded directions' storage alive (memory.tensor_bytes
    # charges for it), and LAPACK returns U column-major, where even a "contiguous" slice shares that storage.
    return LowRankFactors(
        token_basis=u.to(out_dtype).clone(memory_format=torch.contiguous_format),
        reconstruction=reconstruction.to(out_dtype).clone(memory_format=torch.contiguous_format),
    )


def relative_error(original: list[torch.Tensor], factors: LowRankFactors) -> float:
    """Relative Frobenius error ``||A - U B|| / ||A||`` over the whole group (float64)."""
    num = 0.0
    den = 0.0
    for slot, layer in enumerate(original):
        rebuilt = factors.layer(slot).to(torch.float64)
        num += float((layer.to(torch.float64) - rebuilt).pow(2).sum())
        den += float(layer.to(torch.float64).pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def as_float(factors: StoredFactors) -> LowRankFactors:
    """Factors of any storage form as :class:`LowRankFactors` with the same product.

    Factors already in that form come back unchanged (in the model's dtype); quantized ones are dequantized to
    float32.
    """
    if isinstance(factors, LowRankFactors):
        return factors
    slots = [factors.matrix(slot, torch.float32) for slot in range(factors.num_layers)]
    return LowRankFactors(factors.basis(torch.float32).contiguous(), torch.stack(slots, dim=1))


def append_rows(factors: LowRankFactors, rows: list[torch.Tensor], rank: int) -> LowRankFactors:
    """Fold new token rows into a group's factors: the incremental SVD of Brand (2002).

    With ``A ~ U W`` (``W`` the stacked reconstruction matrices) and new rows ``X``, ``U = Q R`` (thin QR) gives
    ``[A; X] ~ blockdiag(Q, I) [R W; X]``; the SVD of the small ``(r + m, G*D)`` matrix ``[R W; X]`` then gives the
    factors of every row at once. At full rank this is exact; after a truncation it is the best rank-``rank``
    approximation of the truncated old rows plus the new ones.

    Args:
        factors: the group side's factors ``(b, T, r)`` and ``(b, G, r, D)``.
        rows: G tensors ``(b, m, D)``, the new tokens of each layer (keys pre-RoPE, or values).
        rank: directions kept, at most ``min(r + m, G*D)``.

    Returns:
        Factors over ``T + m`` tokens (singular values split as in :func:`cross_layer_svd`), in the dtype of
        ``factors``.

    Raises:
        ValueError: if the rows do not match the group's layers and dimension, or the rank is out of range.
    """
    basis, recon = factors.token_basis, factors.reconstruction
    batch, tokens, old_rank = basis.shape
    group_size, dim = recon.shape[1], recon.shape[-1]
    if len(rows) != group_size or any(r.shape[0] != batch or r.shape[-1] != dim for r in rows):
        raise ValueError(f"`rows` must be {group_size} tensors (batch={batch}, m, dim={dim})")
    new = rows[0].shape[1]
    bound = min(old_rank + new, group_size * dim)
    if not 1 <= rank <= bound:
        raise ValueError(f"`rank` must be in [1, {bound}] when folding {new} rows into rank {old_rank} but got {rank}")
    compute = torch.float64 if basis.dtype == torch.float64 else torch.float32
    q, r = torch.linalg.qr(basis.to(compute))  # (b, T, r), (b, r, r)
    stacked = recon.to(compute).transpose(1, 2).reshape(batch, old_rank, group_size * dim)  # W: (b, r, G*D)
    small = torch.cat([r @ stacked, torch.cat([x.to(compute) for x in rows], dim=-1)], dim=1)  # (b, r+m, G*D)
    p, s, vh = torch.linalg.svd(small, full_matrices=False)
    p, s, vh = p[..., :rank], s[..., :rank], vh[..., :rank, :]
    root = s.sqrt()
    u = torch.cat([q @ p[:, :old_rank], p[:, old_rank:]], dim=1) * root.unsqueeze(-2)  # (b, T+m, rank)
    w = (root.unsqueeze(-1) * vh).reshape(batch, rank, group_size, dim).transpose(1, 2)
    return LowRankFactors(
        u.to(basis.dtype).contiguous(), w.to(basis.dtype).clone(memory_format=torch.contiguous_format)
    )


def from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> StoredFactors:
    """Factors of any storage form from :meth:`StoredFactors.state`'s output.

    Raises:
        ValueError: for an unknown form or a missing tensor (named).
    """
    form = meta.get("form")
    if form == "model":
        missing = [name for name in ("token_basis", "reconstruction") if name not in tensors]
        if missing:
            raise ValueError(f"factors in the model's dtype lack {missing}")
        return LowRankFactors(tensors["token_basis"], tensors["reconstruction"])
    if form in ("int8", "int4"):
        return QuantizedFactors.from_state(tensors, meta)
    raise ValueError(f"unknown factor form {form!r}")
