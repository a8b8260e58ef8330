"""Split a model's layers into the groups whose caches share one token basis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LayerGroup:
    """Layers whose caches are factored together.

    Attributes:
        index: position of the group in the cache's list of groups.
        layers: model layer indices, in the order their reconstruction matrices are stored.
    """

    index: int
    layers: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of layers in the group (G)."""
        return len(self.layers)

    @property
    def last_layer(self) -> int:
        """The layer whose prefill completes the group (the highest index, since layers run in order)."""
        return max(self.layers)


def build_groups(
    num_layers: int,
    group_size: int,
    grouping: Literal["contiguous", "stride", "auto"] = "contiguous",
    first_layer: int = 0,
    last_layer: int | None = None,
    dense_layers: tuple[int, ...] | list[int] = (),
    groups: Sequence[Sequence[int]] | None = None,
) -> list[LayerGroup]:
    """Split the compressed layer range into groups.

    Args:
        num_layers: layers of the model.
        group_size: G, at most this many layers per group.
        grouping: ``"contiguous"``: ``[first, first+G)``, ``[first+G, first+2G)``, ..., the last group takes the
            remainder. ``"stride"``: ``n = ceil(N / G)`` groups, group ``j`` holds layers ``first+j, first+j+n, ...``.
        first_layer: first compressed layer.
        last_layer: last compressed layer (inclusive), ``None`` for the model's last layer.
        dense_layers: layers of the range kept out of every group (they keep a dense cache); the groups are formed
            over the remaining layers.
        groups: with ``grouping="auto"``, the groups themselves (e.g. from :func:`xkv.calibration.auto_groups`);
            they must cover exactly the layers left, each group at most ``group_size`` layers.

    Returns:
        Groups in order of their index; every layer of the range not in ``dense_layers`` is in exactly one group.

    Raises:
        ValueError: if the layer range does not fit the model or the group size is below 1.
    """
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be >= 1 but got {num_layers}")
    if group_size < 1:
        raise ValueError(f"`group_size` must be >= 1 but got {group_size}")
    last = num_layers - 1 if last_layer is None else last_layer
    if not 0 <= first_layer < num_layers:
        raise ValueError(f"`first_layer` must be in [0, {num_layers - 1}] for this model but got {first_layer}")
    if not first_layer <= last < num_layers:
        raise ValueError(f"`last_layer` must be in [{first_layer}, {num_layers - 1}] for this model but got {last}")
    for layer in dense_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"`dense_layers` entries must be layers in [0, {num_layers - 1}] but got {layer!r}")
    kept_dense = set(dense_layers)
    layers = [layer for layer in range(first_layer, last + 1) if layer not in kept_dense]
    if not layers:
        raise ValueError(
            f"`dense_layers` {sorted(dense_layers)} leaves no layer of [{first_layer}, {last}] to compress"
        )
    if grouping == "contiguous":
        chunks = [layers[i : i + group_size] for i in range(0, len(layers), group_size)]
    elif grouping == "stride":
        num_groups = math.ceil(len(layers) / group_size)
        chunks = [layers[j::num_groups] for j in range(num_groups)]
    elif grouping == "auto":
        if groups is None:
            raise ValueError("`grouping='auto'` needs `groups` (measured on a calibration prompt)")
        chunks = [sorted(group) for group in groups]
        listed = sorted(layer for group in chunks for layer in group)
        if listed != layers:
            raise ValueError(
                f"`groups` must cover exactly the compressed layers {layers} (the range minus `dense_layers` and "
                f"sliding-window layers) once each, but they hold {listed}"
            )
        if any(len(group) > group_size for group in chunks):
            raise ValueError(f"`groups` has a group larger than `group_size` ({group_size}): {chunks}")
        chunks.sort()
    else:
        raise ValueError(f"`grouping` must be one of ['contiguous', 'stride', 'auto'] but got {grouping!r}")
    return [LayerGroup(index=i, layers=tuple(chunk)) for i, chunk in enumerate(chunks)]


def check_groups_on_one_device(groups: list[LayerGroup], devices: dict[int, str] | None) -> None:
    """Raise if a group's layers sit on more than one device (a shared basis cannot span devices).

    Raises:
        ValueError: naming the group, its layers and their devices.
    """
    if devices is None:
        return
    for group in groups:
        placed = {layer: devices.get(layer) for layer in group.layers}
        if len(set(placed.values())) > 1:
            where = ", ".join(f"layer {layer} on {device}" for layer, device in placed.items())
            raise ValueError(
                f"group {group.index} would span devices ({where}): a group shares one token basis, so its layers "
                "must sit on one device; choose group_size/first_layer so groups end where the device map changes, "
                "or list the boundary layers in dense_layers"
            )
