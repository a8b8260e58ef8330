"""Why a shared basis works: per layer pair, token-wise similarity against subspace alignment (``xkv analyze``).

xKV's premise (arXiv 2503.18893, section 3): the caches of adjacent layers are not similar token by token (what
MiniCache's merging assumes) yet their dominant singular vectors are well aligned, so one token basis serves a group.
Three measures per layer pair on the same prompt, for pre-RoPE keys and for values (each layer's cache flattened to
``(tokens, kv_heads * head_dim)``):

* **token cosine**: the mean over tokens of the cosine between the two layers' vectors of that token;
* **linear CKA** (Kornblith et al. 2019): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred ``X, Y``;
* **subspace alignment**: ``||U_X^T U_Y||_F^2 / r`` for the top-``r`` left singular vectors (the mean squared cosine
  of the principal angles between the two token subspaces: 1 when they span the same space, about ``r / T`` for
  random ones).

And the energy a group's shared basis captures against its rank, for groups of 1, 2, 4 and 8 contiguous layers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity of ``x`` and ``y`` ``(tokens, dim)``."""
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of ``x`` ``(tokens, d1)`` and ``y`` ``(tokens, d2)`` (columns centred), in ``[0, 1]``."""
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def top_subspace(x: torch.Tensor, rank: int) -> torch.Tensor:
    """``(tokens, rank)`` orthonormal top left singular vectors of ``x``."""
    u, _, _ = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :rank]


def subspace_alignment(u: torch.Tensor, v: torch.Tensor) -> float:
    """``||u^T v||_F^2 / r`` for orthonormal ``u``, ``v`` ``(tokens, r)``: 1 for the same subspace."""
    return float(torch.linalg.matrix_norm(u.T @ v) ** 2 / u.shape[1])


def energy_curve(layers: list[torch.Tensor]) -> torch.Tensor:
    """Fraction of the stacked group's squared Frobenius norm captured by the top ``r`` directions, ``r = 1..``."""
    s = torch.linalg.svdvals(torch.cat([layer.double() for layer in layers], dim=-1))
    energy = s**2
    return energy.cumsum(0) / energy.sum()


@dataclass
class SideAnalysis:
    """The measures of one side (``"keys"`` pre-RoPE, or ``"values"``).

    Attributes:
        cosine: ``[i][j]`` token cosine of layers ``i`` and ``j``.
        cka: ``[i][j]`` linear CKA.
        alignment: ``[i][j]`` top-``rank`` subspace alignment.
        energy: group size -> mean over its contiguous groups of the energy captured at rank ``1..``.
    """

    cosine: list[list[float]] = field(default_factory=list)
    cka: list[list[float]] = field(default_factory=list)
    alignment: list[list[float]] = field(default_factory=list)
    energy: dict[int, list[float]] = field(default_factory=dict)


def analyze_layers(
    layers: list[torch.Tensor],
    rank: int,
    group_sizes: tuple[int, ...] = (1, 2, 4, 8),
    on_progress: Callable[[str], None] | None = None,
) -> SideAnalysis:
    """All measures for one side.

    Args:
        layers: per layer ``(tokens, dim)`` (one sequence).
        rank: ``r`` of the subspace alignment.
        group_sizes: group sizes of the energy curves.
        on_progress: called with a short label as work proceeds.

    Raises:
        ValueError: for no layers, layers of different shapes, or a rank outside ``[1, min(tokens, dim)]``.
    """
    if not layers:
        raise ValueError("`layers` must hold at least one layer")
    shape = layers[0].shape
    if any(layer.shape != shape for layer in layers) or len(shape) != 2:
        raise ValueError(f"every layer must be (tokens, dim) of one shape; the first is {tuple(shape)}")
    if not 1 <= rank <= min(shape):
        raise ValueError(f"`rank` must be in [1, {min(shape)}] for ({shape[0]}, {shape[1]}) layers but got {rank}")
    n = len(layers)
    subspaces = [top_subspace(layer, rank) for layer in layers]
    result = SideAnalysis()
    for i in range(n):
        result.cosine.append([token_cosine(layers[i], layers[j]) for j in range(n)])
        result.cka.append([linear_cka(layers[i], layers[j]) for j in range(n)])
        result.alignment.append([subspace_alignment(subspaces[i], subspaces[j]) for j in range(n)])
        if on_progress:
            on_progress(f"layer {i + 1}/{n}")
    for size in group_sizes:
        curves = [energy_curve(layers[start : start + size]) for start in range(0, n - size + 1, size)]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        result.energy[size] = [float(v) for v in torch.stack([c[:length] for c in curves]).mean(dim=0)]
        if on_progress:
            on_progress(f"energy of groups of {size}")
    return result


def alignment_matrix(layers: list[torch.Tensor], rank: int) -> list[list[float]]:
    """``[i][j]``: top-``rank`` subspace alignment of layers ``i`` and ``j`` ``(tokens, dim)`` (1 on the diagonal)."""
    subspaces = [top_subspace(layer, rank) for layer in layers]
    return [[subspace_alignment(u, v) for v in subspaces] for u in subspaces]


def within_group_score(similarity: list[list[float]], groups: list[list[int]]) -> float:
    """Mean similarity over the pairs of layers that share a group (``similarity`` indexed by layer position)."""
    pairs = [similarity[a][b] for group in groups for i, a in enumerate(group) for b in group[i + 1 :]]
    return sum(pairs) / len(pairs) if pairs else 0.0


def alignment_groups(
    similarity: list[list[float]], group_size: int, restarts: int = 32, seed: int = 0
) -> list[list[int]]:
    """Split positions ``0..n-1`` into groups with a high sum of within-group ``similarity``.

    The groups have the sizes contiguous groups would have (``group_size``, the last one shorter). Local search from
    several starts: the contiguous groups, a greedy one (each group starts from the lowest unassigned position and
    takes, one at a time, the position most similar to its members) and ``restarts`` seeded random partitions; from
    each, the best swap of two positions between groups is applied while it raises the sum. The best result wins.
    Deterministic for a seed.

    Args:
        similarity: symmetric ``[i][j]`` similarities, e.g. :func:`alignment_matrix`.
        group_size: G.
        restarts: random starting partitions besides the greedy one.
        seed: seed of those partitions.

    Returns:
        Groups of positions, each sorted, ordered by their first position.

    Raises:
        ValueError: for ``group_size < 1``, ``restarts < 0`` or a non-square matrix.
    """
    n = len(similarity)
    if group_size < 1:
        raise ValueError(f"`group_size` must be >= 1 but got {group_size}")
    if restarts < 0:
        raise ValueError(f"`restarts` must be >= 0 but got {restarts}")
    if any(len(row) != n for row in similarity):
        raise ValueError("`similarity` must be a square matrix")
    sizes = [min(group_size, n - start) for start in range(0, n, group_size)]
    free = list(range(n))
    greedy: list[list[int]] = []
    for size in sizes:
        group = [free.pop(0)]
        while len(group) < size:
            best = max(free, key=lambda c: (sum(similarity[c][m] for m in group), -c))
            free.remove(best)
            group.append(best)
        greedy.append(group)
    starts = [[list(range(start, start + size)) for start, size in zip(range(0, n, group_size), sizes, strict=True)]]
    starts.append(greedy)  # contiguous first: the result never scores below contiguous groups
    generator = random.Random(seed)
    for _ in range(restarts):
        order = list(range(n))
        generator.shuffle(order)
        starts.append(
            [order[start : start + size] for start, size in zip(range(0, n, group_size), sizes, strict=True)]
        )
    results = [_swap_search(similarity, groups) for groups in starts]
    best_groups = max(results, key=lambda groups: within_group_score(similarity, groups))
    return sorted(sorted(group) for group in best_groups)


def _swap_search(similarity: list[list[float]], groups: list[list[int]]) -> list[list[int]]:
    """Apply the best swap of two positions between groups while it raises the within-group sum (in place)."""

    def gain(g1: list[int], a: int, g2: list[int], b: int) -> float:  # a moves to g2, b to g1
        return sum(similarity[b][x] - similarity[a][x] for x in g1 if x != a) + sum(
            similarity[a][y] - similarity[b][y] for y in g2 if y != b
        )

    while True:
        best_gain, best_move = 1e-12, None
        for i, g1 in enumerate(groups):
            for j in range(i + 1, len(groups)):
                for a in g1:
                    for b in groups[j]:
                        value = gain(g1, a, groups[j], b)
                        if value > best_gain:
                            best_gain, best_move = value, (i, a, j, b)
        if best_move is None:
            return groups
        i, a, j, b = best_move
        groups[i][groups[i].index(a)] = b
        groups[j][groups[j].index(b)] = a
