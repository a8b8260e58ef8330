"""Byte accounting: what a cache actually holds, against what a dense cache would hold for the same tokens.

Held bytes are summed from the storages of the tensors a cache keeps (whatever their dtype or shape, counted once
each, including any storage a view keeps alive), never from a formula. The formula
:func:`compression_factor` is the prediction the measurement is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch


def compression_factor(tokens: int, group_size: int, dim: int, rank: int) -> float:
    """Analytic compression factor of one factored group side: ``G*T*D / (T*r + r*G*D)`` (xKV, section 3).

    Args:
        tokens: T.
        group_size: G.
        dim: D, features per layer.
        rank: r.
    """
    return group_size * tokens * dim / (tokens * rank + rank * group_size * dim)


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the storages behind ``tensors``, each storage counted once.

    A slice keeps its whole storage alive, so a view is charged for all of it (an empty view of a large storage
    too): this is what the process holds.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def dense_kv_bytes(
    batch: int, tokens: int, num_layers: int, dim: int, dtype: torch.dtype, value_dim: int | None = None
) -> int:
    """Bytes of a dense cache: keys and values of ``num_layers`` layers, ``dim = kv_heads * head_dim`` each.

    ``value_dim`` where values have other features per token than keys (MLA: the latent and the RoPE part).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * tokens * num_layers * (dim + (dim if value_dim is None else value_dim)) * itemsize


@dataclass
class GroupMemory:
    """Memory of one layer group's compressed prefix (its exact decode tail is counted in the report's tail bytes).

    Attributes:
        group_idx: index of the group.
        layers: model layers in the group.
        tokens: tokens in the compressed prefix.
        rank_k: key rank (``None`` if keys are kept exact).
        rank_v: value rank (``None`` if values are kept exact).
        held_bytes: bytes of the tensors stored for the prefix.
        dense_bytes: bytes the same tokens take in a dense cache.
    """

    group_idx: int
    layers: tuple[int, ...]
    tokens: int
    rank_k: int | None
    rank_v: int | None
    held_bytes: int
    dense_bytes: int

    @property
    def compression_factor(self) -> float:
        """``dense_bytes / held_bytes``."""
        return self.dense_bytes / self.held_bytes if self.held_bytes else float("inf")


@dataclass
class MemoryReport:
    """What a cache holds, measured from its tensors.

    Attributes:
        groups: one entry per factored group.
        tail_bytes: exact (uncompressed) tokens of compressed layers: the buffers of the decode tokens and turns
            appended after the compressed context (their capacity: at least 16 tokens, doubled when full), plus
            prefill tensors of groups not yet factored.
        dense_layer_bytes: layers outside the compressed range, kept as a dense cache.
        table_bytes: tables kept for decoding (the prefix's RoPE angles), shared by all layers.
        workspace_bytes: the rebuild buffers of the "rebuild" and "absorb" decode paths (one layer's rebuilt prefix
            at a time, kept from the first decode step on).
        held_bytes: everything the cache holds (groups, tails, dense layers, tables, workspace).
        dense_bytes: what a dense cache of the model's dtype holds for the same tokens in every layer.
    """

    groups: list[GroupMemory] = field(default_factory=list)
    tail_bytes: int = 0
    dense_layer_bytes: int = 0
    table_bytes: int = 0
    workspace_bytes: int = 0
    held_bytes: int = 0
    dense_bytes: int = 0

    @property
    def compression_factor(self) -> float:
        """Whole cache: ``dense_bytes / held_bytes``."""
        return self.dense_bytes / self.held_bytes if self.held_bytes else float("inf")

    @property
    def context_compression_factor(self) -> float:
        """Compressed groups only: dense bytes of their prefix over the bytes held for it."""
        held = sum(g.held_bytes for g in self.groups)
        dense = sum(g.dense_bytes for g in self.groups)
        return dense / held if held else float("inf")

    def to_dict(self) -> dict:
        """Plain data for JSON, with the derived factors included."""
        data = asdict(self)
        data["compression_factor"] = self.compression_factor
        data["context_compression_factor"] = self.context_compression_factor
        for entry, group in zip(data["groups"], self.groups, strict=True):
            entry["compression_factor"] = group.compression_factor
        return data
