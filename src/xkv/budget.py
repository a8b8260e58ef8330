"""Rank settings to ranks under a byte budget, from plain numbers: shapes, the dtype's size and the storage form.

Every place that turns a setting into a rank asks this module: the first prefill, ``with_ranks``, folds and
trims (through the cache's :class:`~xkv.cache.ranks.GroupRanks`), the share of the budget Selective
Reconstruction's index takes, and the evaluation's split of one target factor between keys and values. Nothing here
imports the cache or touches a tensor.
"""

from __future__ import annotations

import math

from xkv.config import RankSetting, UnreachableRatioError
from xkv.forms import FactorFormat


def full_rank(tokens: int, group_size: int, dim: int) -> int:
    """Largest useful rank of a ``(tokens, group_size * dim)`` matrix."""
    return min(tokens, group_size * dim)


def rank_for_compression_factor(
    tokens: int,
    group_size: int,
    dim: int,
    factor: float,
    fmt: FactorFormat | None = None,
    itemsize: int = 4,
    reserved_bytes: float = 0.0,
) -> int:
    """Largest rank whose bytes are at most ``1 / factor`` of the dense group in the model's dtype.

    In the model's dtype this is the inverse of :func:`xkv.memory.compression_factor`: ``G*T*D / (T*r + r*G*D) >=
    factor``. In a quantized form the packed values and their scales are counted (:meth:`FactorFormat.
    factor_bytes`, what ``memory_report()`` measures). Returns 0 when even rank 1 cannot reach ``factor``.

    Args:
        tokens: T.
        group_size: G.
        dim: D.
        factor: target compression factor (> 1).
        fmt: storage form of the factors (default: the model's dtype).
        itemsize: bytes per value of the model's dtype (the dense cache's, and the ``"model"`` form's).
        reserved_bytes: bytes held beside the factors that the budget must also pay for (Selective
            Reconstruction's landmarks and exact chunks).
    """
    budget = group_size * tokens * dim * itemsize / factor - reserved_bytes
    if budget <= 0:
        return 0
    if fmt is None or fmt.form == "model":
        return int(math.floor(budget / (itemsize * (tokens + group_size * dim)) + 1e-9))
    low, high = 0, full_rank(tokens, group_size, dim)
    while low < high:  # bytes grow with the rank: the largest rank within the budget
        mid = (low + high + 1) // 2
        if fmt.factor_bytes(tokens, group_size, dim, mid, itemsize) <= budget * (1 + 1e-9):
            low = mid
        else:
            high = mid - 1
    return low


def resolve_rank(
    setting: RankSetting,
    tokens: int,
    group_size: int,
    dim: int,
    *,
    field_name: str,
    fmt: FactorFormat | None = None,
    itemsize: int = 4,
    reserved_bytes: float = 0.0,
) -> int:
    """Turn a rank setting into a number of singular vectors for a group of known shape.

    Args:
        setting: the parsed config value.
        tokens: T, tokens being factored.
        group_size: G, layers in the group.
        dim: D, features per layer (``kv_heads * head_dim``).
        field_name: named in error messages (e.g. ``"rank_k for group 3"``).
        fmt: storage form of the factors: a compression factor counts its bytes (default: the model's dtype).
        itemsize: bytes per value of the model's dtype.
        reserved_bytes: bytes a compression factor must also pay for (see :func:`rank_for_compression_factor`).

    Returns:
        ``r`` with ``1 <= r <= min(T, G*D)``.

    Raises:
        UnreachableRatioError: (a ``ValueError``) if the rank is larger than the data allows, or a compression
            factor cannot be reached.
    """
    bound = full_rank(tokens, group_size, dim)
    if setting.kind == "rank":
        rank = int(setting.value)
        if rank > bound:
            raise UnreachableRatioError(
                f"`{field_name}` must be in [1, {bound}] (min(tokens={tokens}, group_size*dim={group_size * dim})) "
                f"but got {rank}"
            )
        return rank
    if setting.kind == "fraction":
        return max(1, min(bound, round(setting.value * bound)))
    rank = min(
        bound, rank_for_compression_factor(tokens, group_size, dim, setting.value, fmt, itemsize, reserved_bytes)
    )
    if rank < 1:
        fmt = fmt or FactorFormat()
        held = fmt.factor_bytes(tokens, group_size, dim, 1, itemsize) + reserved_bytes
        best = group_size * tokens * dim * itemsize / held
        extra = f" and {reserved_bytes:.0f} bytes of Selective Reconstruction's index" if reserved_bytes else ""
        raise UnreachableRatioError(
            f"`{field_name}` asks for {setting.value:g}x, which {tokens} tokens of a {group_size}-layer group "
            f"cannot reach even at rank 1 (at most {best:.2f}x with {fmt.form} factors{extra}): use a longer "
            "context, a lower factor or a larger group"
        )
    return rank


def side_budgets(settings: list[RankSetting], group_size: int, tokens: int, dim: int, itemsize: int) -> list[float]:
    """Bytes each side's compression factor allows a ``(tokens, group_size * dim)`` group (0 for a rank or fraction).

    Args:
        settings: one setting per side.
        group_size: G.
        tokens: T.
        dim: D, features per layer.
        itemsize: bytes per value of the model's dtype (the dense cache's).
    """
    dense_side = group_size * tokens * dim * itemsize
    return [dense_side / s.value if s.kind == "factor" else 0.0 for s in settings]


def index_reservations(budgets: list[float], index_bytes: float) -> list[float]:
    """Each side's share of ``index_bytes`` (an index beside the factors), in proportion to its budget.

    So each side's factors plus its share meet its factor: ``"4x"`` measures 4x with the index counted. A side with
    no budget (an explicit rank or fraction) pays nothing; without any budget nothing is reserved.
    """
    total = sum(budgets)
    if total == 0 or index_bytes == 0:
        return [0.0 for _ in budgets]
    return [index_bytes * (b / total) for b in budgets]


def split_factor(factor: float, key_share: float) -> tuple[float, float]:
    """Key and value factors for ``factor`` overall, keys compressed ``key_share`` times harder than values.

    With ``1/f_k + 1/f_v = 2/f`` and ``f_k = key_share * f_v``: ``f_v = f (1 + key_share) / (2 key_share)``. Below
    2.1x the split is narrowed to ``factor / (2.1 - factor)`` at most, so values keep a factor of at least 1.05
    (at 1.3x: K@1.71x / V@1.05x).

    Returns:
        ``(f_k, f_v)``.
    """
    if factor < 2.1:  # below ~2x the split is narrowed so values still get a factor of at least 1.05
        key_share = min(key_share, factor / (2.1 - factor))
    f_v = factor * (1 + key_share) / (2 * key_share)
    return key_share * f_v, f_v
