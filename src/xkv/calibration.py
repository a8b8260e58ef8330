"""Measurements on a calibration prompt that configure a cache (``grouping: auto``).

The per-layer states, and layer groups chosen from the alignment of their top singular subspaces. The paper groups
contiguous layers (arXiv 2503.18893); what makes a shared basis work is that the layers' dominant
singular subspaces are aligned, and nothing says the best-aligned layers are adjacent.
:func:`auto_groups` measures that alignment on a calibration prompt and forms groups of the configured size that
maximise it (:func:`xkv.analysis.alignment_groups`); the config then stores the groups, so the calibration runs
once.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import DynamicCache

from xkv.analysis import alignment_groups, alignment_matrix, within_group_score
from xkv.cache import XKVCache
from xkv.config import XKVConfig
from xkv.generation import prefill
from xkv.rope import unapply_rope


@torch.no_grad()
def layer_states(model: nn.Module, input_ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every layer's pre-RoPE keys and values on one prompt, as ``(tokens, kv_heads * head_dim)`` float32.

    Args:
        model: a supported causal LM.
        input_ids: ``(1, tokens)``.

    Returns:
        ``{"keys": [...], "values": [...]}``, one tensor per layer.

    Raises:
        ValueError: for a batch other than 1.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"`input_ids` must have shape (1, tokens) but got {tuple(input_ids.shape)}")
    cache = DynamicCache()
    prefill(model, input_ids, cache)
    angles = XKVCache(model).angles  # the model's own RoPE, to take keys back to pre-RoPE
    tokens = input_ids.shape[1]
    positions = torch.arange(tokens, device=input_ids.device).unsqueeze(0)
    sides: dict[str, list[torch.Tensor]] = {"keys": [], "values": []}
    for layer in cache.layers:
        keys = layer.keys
        if angles is not None:
            keys = unapply_rope(keys, *angles(positions))
        sides["keys"].append(keys[0].transpose(0, 1).reshape(tokens, -1).float())
        sides["values"].append(layer.values[0].transpose(0, 1).reshape(tokens, -1).float())
    return sides


@dataclasses.dataclass
class GroupingResult:
    """What :func:`auto_groups` found.

    Attributes:
        config: the input config with ``grouping="auto"`` and the groups found.
        layers: the compressed layers the groups cover.
        similarity: ``[i][j]`` mean of the keys' and values' top-``rank`` subspace alignment of ``layers[i]`` and
            ``layers[j]``.
        score: mean within-group similarity of the groups found.
        contiguous_score: the same for contiguous groups of the same size.
    """

    config: XKVConfig
    layers: list[int]
    similarity: list[list[float]]
    score: float
    contiguous_score: float


def auto_groups(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: XKVConfig | None = None,
    rank: int = 32,
    states: dict[str, list[torch.Tensor]] | None = None,
) -> GroupingResult:
    """Groups of ``config.group_size`` layers that maximise the alignment measured on ``input_ids``.

    The similarity of two layers is the mean of their pre-RoPE keys' and their values' top-``rank`` subspace
    alignment (1: the same token subspace). Only the layers ``config`` compresses are grouped (its layer range,
    minus ``dense_layers`` and sliding-window layers).

    Args:
        model: a supported causal LM.
        input_ids: ``(1, tokens)`` calibration prompt (keep it out of any evaluation).
        config: the settings to group for (``XKVConfig()`` if ``None``); every other field is kept.
        rank: ``r`` of the subspace alignment.
        states: :func:`layer_states` of ``input_ids`` if already measured (else they are).

    Returns:
        The grouped config and the measurements behind it.

    Raises:
        ValueError: for a batch other than 1 or a rank outside ``[1, min(tokens, kv_dim)]``.
    """
    base = dataclasses.replace(config or XKVConfig(), grouping="contiguous", groups=None)
    contiguous = [list(group.layers) for group in XKVCache(model, base).groups]
    layers = sorted(layer for group in contiguous for layer in group)
    states = states if states is not None else layer_states(model, input_ids)
    tokens, dim = states["keys"][0].shape
    if not 1 <= rank <= min(tokens, dim):
        raise ValueError(f"`rank` must be in [1, {min(tokens, dim)}] for {tokens} tokens of {dim} features")
    per_side = [alignment_matrix([states[side][layer] for layer in layers], rank) for side in ("keys", "values")]
    similarity = [
        [(k + v) / 2 for k, v in zip(row_k, row_v, strict=True)] for row_k, row_v in zip(*per_side, strict=True)
    ]
    found = alignment_groups(similarity, base.group_size)
    position = {layer: i for i, layer in enumerate(layers)}
    groups = [[layers[i] for i in group] for group in found]
    return GroupingResult(
        config=dataclasses.replace(base, grouping="auto", groups=groups),
        layers=layers,
        similarity=similarity,
        score=within_group_score(similarity, found),
        contiguous_score=within_group_score(similarity, [[position[x] for x in g] for g in contiguous]),
    )
