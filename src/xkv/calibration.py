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
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from xkv.adapters import describe_model
from xkv.analysis import alignment_groups, alignment_matrix, within_group_score
from xkv.cache import effective_config, groups_for
from xkv.config import XKVConfig
from xkv.forms import FactorFormat
from xkv.generation import prefill
from xkv.groups import LayerGroup
from xkv.positions import RotaryAngles, unapply_rope


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
    spec = describe_model(model)  # the model's own RoPE, to take keys back to pre-RoPE
    angles = RotaryAngles(spec.rotary_emb, spec.rotary_layer_type) if spec.rotary_emb is not None else None
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
    alignment (1: the same token subspace), over the sides ``config`` factors (the latent alone for MLA). Only the
    layers ``config`` compresses are grouped (its layer range, minus ``dense_layers`` and sliding-window layers).

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
    spec = describe_model(model)
    base = effective_config(dataclasses.replace(config or XKVConfig(), grouping="contiguous", groups=None), spec)
    contiguous = [list(group.layers) for group in groups_for(base, spec)]
    layers = sorted(layer for group in contiguous for layer in group)
    states = states if states is not None else layer_states(model, input_ids)
    sides = [side for side, on in (("keys", base.compress_keys), ("values", base.compress_values)) if on]
    if not sides:
        raise ValueError("`compress_keys` and `compress_values` are both off: nothing is factored to group")
    for side in sides:
        tokens, dim = states[side][0].shape
        if not 1 <= rank <= min(tokens, dim):
            raise ValueError(f"`rank` must be in [1, {min(tokens, dim)}] for {tokens} tokens of {dim} {side} features")
    # The similarity of two layers: their alignment averaged over the sides that are factored.
    per_side = [alignment_matrix([states[side][layer] for layer in layers], rank) for side in sides]
    similarity = [
        [sum(matrix[i][j] for matrix in per_side) / len(per_side) for j in range(len(layers))]
        for i in range(len(layers))
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


def rank_factor(fmt: FactorFormat, tokens: int, group_size: int, dim: int, rank: int, itemsize: int) -> float:
    """A compression factor that resolves to ``rank`` for a group side of ``tokens`` tokens.

    Halfway (in bytes) between ``rank`` and ``rank + 1`` directions, so six written digits still give ``rank``
    back; at the full rank ``min(tokens, group_size * dim)``, just under its bytes.
    """
    held = fmt.factor_bytes(tokens, group_size, dim, rank, itemsize)
    bound = min(tokens, group_size * dim)
    upper = fmt.factor_bytes(tokens, group_size, dim, rank + 1, itemsize) if rank < bound else held * 1.001
    return tokens * group_size * dim * itemsize / ((held + upper) / 2)


@dataclasses.dataclass
class AllocationResult:
    """What :func:`allocate_ranks` chose.

    Attributes:
        config: the input config with per-group ``rank_k``/``rank_v`` lists of compression factors (they scale with
            the context length the way a single factor does).
        ranks: per group ``(rank_k, rank_v)`` at the calibration length (``None`` for a side kept exact).
        energy: per group the fraction of each side's energy those ranks capture.
        factor: the compression factor of the groups' factors at the calibration length (analytic bytes).
    """

    config: XKVConfig
    ranks: list[tuple[int | None, int | None]]
    energy: list[tuple[float | None, float | None]]
    factor: float


def _energy_shares(
    groups: list[LayerGroup], sides: list[str], states: dict[str, list[torch.Tensor]]
) -> dict[tuple[int, str], list[float]]:
    """Each group side's squared singular values as shares of its energy, largest first."""
    shares: dict[tuple[int, str], list[float]] = {}
    for group in groups:
        for side in sides:
            stacked = torch.cat([states[side][layer] for layer in group.layers], dim=-1).double()
            energy = torch.linalg.svdvals(stacked) ** 2
            shares[group.index, side] = (energy / energy.sum()).tolist()
    return shares


def _water_fill(
    shares: dict[tuple[int, str], list[float]],
    cost: Callable[[tuple[int, str], int], int],
    dense: dict[tuple[int, str], int],
    target: float,
) -> tuple[dict[tuple[int, str], int], int]:
    """Ranks from 1 up, one direction at a time to the side with the most energy share per byte; (ranks, bytes).

    The budget is the ``dense`` bytes over ``target``.

    Raises:
        ValueError: if rank 1 in every side already costs more than the budget.
    """
    budget = sum(dense.values()) / target
    ranks = dict.fromkeys(shares, 1)
    spent = sum(cost(key, 1) for key in shares)
    if spent > budget:
        raise ValueError(
            f"`target` {target} is below what rank 1 in every group side already costs ({spent} of {budget:.0f} bytes)"
        )
    while True:
        best, best_value = None, 0.0
        for key, rank in ranks.items():
            if rank >= len(shares[key]) or cost(key, rank + 1) >= dense[key]:  # a side never costs its dense bytes
                continue
            step = cost(key, rank + 1) - cost(key, rank)
            if spent + step <= budget and shares[key][rank] / step > best_value:
                best, best_value = key, shares[key][rank] / step
        if best is None:
            return ranks, spent
        spent += cost(best, ranks[best] + 1) - cost(best, ranks[best])
        ranks[best] += 1


def allocate_ranks(
    model: nn.Module,
    input_ids: torch.Tensor,
    target: float,
    config: XKVConfig | None = None,
    states: dict[str, list[torch.Tensor]] | None = None,
) -> AllocationResult:
    """Per-group, per-side ranks that capture the most energy for ``target`` times fewer bytes (water-filling).

    Every group side starts at rank 1; then, one direction at a time, the direction with the largest share of its
    side's energy per byte it costs (``config.factor_form``'s bytes) is added while the groups' factors stay within
    ``1 / target`` of their dense bytes. The shares are relative to each side's own energy, so a side whose
    leading directions hold most of it (the pre-RoPE keys' channel offset) gets fewer directions than one with a
    flat spectrum. The ranks are stored as per-group compression factors, so the config serves other lengths too.
    With ``factor_form: int4`` every direction is counted at int4 and the returned config has ``factor_head: 0`` (an
    ``"auto"`` int8 head would take bytes the allocation gave to directions).

    Args:
        model: a supported causal LM.
        input_ids: ``(1, tokens)`` calibration prompt (keep it out of any evaluation).
        target: compression factor of the groups' factors, e.g. ``4.0``.
        config: the layout (group size, grouping, storage form) to allocate for; ``XKVConfig()`` if ``None``.
        states: :func:`layer_states` of ``input_ids`` if already measured.

    Raises:
        ValueError: for ``target <= 1`` or a target the rank-1 factors already exceed.
    """
    if not target > 1:
        raise ValueError(f"`target` must be > 1 but got {target}")
    spec = describe_model(model)
    base = effective_config(config or XKVConfig(), spec)
    if base.factor_form == "int4" and base.factor_head == "auto":
        # The allocation counts every direction at int4; an "auto" head would be paid for out of each side's budget
        # at store time and hold fewer directions than allocated. The allocated config says so (factor_head=0).
        base = dataclasses.replace(base, factor_head=0)
    elif base.factor_form == "int4" and base.factor_head != 0:
        raise ValueError(
            "allocate_ranks counts int4 factors without an int8 head: set factor_head=0 or 'auto' (a fixed head is "
            "paid for out of each side's budget at store time, so the ranks held would be lower than allocated)"
        )
    groups = groups_for(base, spec)
    states = states if states is not None else layer_states(model, input_ids)
    tokens = input_ids.shape[1]
    itemsize = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
    fmt, dim = base.factor_format, spec.kv_dim
    sides = [s for s, wanted in (("keys", base.compress_keys), ("values", base.compress_values)) if wanted]
    shares = _energy_shares(groups, sides, states)
    size = {group.index: group.size for group in groups}

    def cost(key: tuple[int, str], rank: int) -> int:
        return fmt.factor_bytes(tokens, size[key[0]], dim, rank, itemsize)

    dense = {key: tokens * size[key[0]] * dim * itemsize for key in shares}
    ranks, spent = _water_fill(shares, cost, dense, target)
    fields = {}
    for side, name in (("keys", "rank_k"), ("values", "rank_v")):
        if side in sides:
            fields[name] = [
                f"{rank_factor(fmt, tokens, size[g.index], dim, ranks[g.index, side], itemsize):.6g}x" for g in groups
            ]
    allocated = dataclasses.replace(base, **fields)
    return AllocationResult(
        config=allocated,
        ranks=[tuple(ranks.get((g.index, side)) for side in ("keys", "values")) for g in groups],  # type: ignore[misc]
        energy=[
            tuple(  # type: ignore[misc]
                sum(shares[g.index, side][: ranks[g.index, side]]) if side in sides else None
                for side in ("keys", "values")
            )
            for g in groups
        ],
        factor=sum(dense.values()) / spent,
    )
