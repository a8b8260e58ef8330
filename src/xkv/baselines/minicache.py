"""MiniCache baseline: merge adjacent layers' KV states in depth (Liu et al. 2024, arXiv 2405.14366).

MiniCache observes that the KV states of adjacent layers in the middle-to-deep part of an LLM are similar, and
merges each layer pair ``(l, l+1)`` token by token:

* each token's state vector in either layer is split into a magnitude (its L2 norm) and a direction (unit vector);
* the two directions are interpolated with SLERP (spherical linear interpolation, weight ``t``, 0.5 by default) into
  one direction shared by both layers; each layer keeps its own per-token magnitude;
* tokens whose two directions are far apart ("unmergeable") are kept exact for both layers, with their indices
  (the paper's token retention);
* a layer is rebuilt as shared direction times its own magnitude, then its retained tokens are written back.

Choices made here (the paper leaves them open or states them differently):

* **Granularity: per KV head.** A token's state is one ``head_dim`` vector per KV head; norms, angles, SLERP and
  retention are computed per ``(batch, head, token)``, so a head whose two layers agree is not spoiled by one that
  does not.
* **Retention rule: a fixed quantile.** The paper picks the unmergeable tokens by thresholding the angular distance
  between the pair's states with a hyper-parameter gamma (xKV's baseline run uses gamma 0.05, research notes
  section 6), so how many tokens are kept depends on the data. Here, per ``(batch, head)``, the
  ``floor(retain_fraction * tokens)`` tokens with the largest angle are retained (ties broken by ``torch.topk``).
  This keeps the stored tensors rectangular and makes the storage an exact function of the sequence length
  (:func:`predicted_compression_factor`). ``retain_fraction`` is a fraction of tokens, not the paper's gamma.
* **Keys are merged post-RoPE**, as transformers hands them to ``Cache.update`` (the paper merges the cached states
  as they are; no RoPE is undone or re-applied).
* **Storage** (per merged pair and per side, keys or values, per batch row): the shared directions
  ``kv_heads * tokens * head_dim`` in the model dtype, two magnitudes ``2 * kv_heads * tokens`` in the model dtype,
  ``2 * kv_heads * retained * head_dim`` retained states in the model dtype and ``kv_heads * retained`` int32 indices.
  Directions are stored for retained tokens too (the rebuild overwrites them), keeping every tensor rectangular.
  The merge math runs in float32 (float64 stays float64).

Life of a merged pair: at prefill the first layer of the pair holds its exact states until its partner's prefill
arrives (attention gets the exact states, as in xKV's setup); then the pair is merged and the dense tensors are
dropped. Later tokens (decode, later turns) go to an exact tail per layer and are never merged; attention gets the
rebuilt prefix (a transient, never kept) followed by the tail. Layers before ``start_layer``, and a last layer
without a partner, are transformers ``DynamicLayer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xkv.adapters import describe_model, model_dtype
from xkv.cache import CompressedLayer, CompressedStore, GroupedCache
from xkv.compat import UpdateInputs

#: dtype of the stored retention indices (4 bytes each; token counts stay far below 2**31).
INDEX_DTYPE = torch.int32


@dataclass
class MiniCacheConfig:
    """Settings of the MiniCache baseline.

    Attributes:
        start_layer: first layer of the first merged pair; pairs are ``(s, s+1), (s+2, s+3), ...``. ``None`` means
            ``num_layers // 2``: MiniCache merges the middle-to-deep half, and xKV's baseline run merges layers
            16-31 of Llama-3.1-8B's 32 (research notes, section 6).
        t: SLERP weight of the pair's second layer, in (0, 1); 0.5 (the paper's default) weighs both layers equally.
        retain_fraction: fraction of tokens per ``(batch, head)`` kept exact in both layers, in [0, 1): those with
            the largest angle between the pair's directions. 0.05 echoes the gamma 0.05 of xKV's baseline run, but
            is a fraction of tokens, not a threshold on distances (see the module docstring).

    Raises:
        ValueError: for a value out of range; the message names the field, the allowed range and the value.
        TypeError: for a ``start_layer`` that is not an integer.
    """

    start_layer: int | None = None
    t: float = 0.5
    retain_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.start_layer is not None:
            if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int):
                raise TypeError(f"`start_layer` must be an int or None but got {self.start_layer!r}")
            if self.start_layer < 0:
                raise ValueError(f"`start_layer` must be >= 0 but got {self.start_layer}")
        if not 0.0 < self.t < 1.0:
            raise ValueError(f"`t` must be in (0, 1) but got {self.t}")
        if not 0.0 <= self.retain_fraction < 1.0:
            raise ValueError(f"`retain_fraction` must be in [0, 1) but got {self.retain_fraction}")

    def resolve_start_layer(self, num_layers: int) -> int:
        """The first merged layer for a model of ``num_layers`` layers.

        Raises:
            ValueError: if no pair fits, i.e. the start layer is above ``num_layers - 2``.
        """
        start = num_layers // 2 if self.start_layer is None else self.start_layer
        if start > num_layers - 2:
            raise ValueError(
                f"`start_layer` must be in [0, {num_layers - 2}] for a model with {num_layers} layers but got {start}"
            )
        return start


def retained_count(tokens: int, retain_fraction: float) -> int:
    """Tokens kept exact per ``(batch, head)``: ``floor(retain_fraction * tokens)``.

    A tiny slack absorbs float error, so that e.g. ``0.29 * 100`` counts 29 tokens, not 28.
    """
    return min(tokens, math.floor(retain_fraction * tokens + 1e-9))


def predicted_compression_factor(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    tokens: int,
    start_layer: int,
    retain_fraction: float,
    itemsize: int,
) -> float:
    """Dense bytes over held bytes of a MiniCache holding ``tokens`` prefilled tokens (no decode tail).

    Per KV head and per side (keys or values), with ``k = retained_count(tokens, retain_fraction)``, ``s`` the
    model dtype's item size and 4 bytes per index, a merged pair holds
    ``T*hd*s`` (shared directions) ``+ 2*T*s`` (magnitudes) ``+ 2*k*hd*s`` (retained states) ``+ 4*k`` (indices),
    where a dense pair holds ``2*T*hd*s``. Layers outside the pairs hold ``T*hd*s`` each. Batch, heads and the
    two sides scale numerator and denominator alike.

    Args:
        num_layers: decoder layers.
        num_kv_heads: KV heads per layer (cancels out; kept for clarity).
        head_dim: features per head, ``hd``.
        tokens: ``T``, prefilled tokens.
        start_layer: first merged layer.
        retain_fraction: as in :class:`MiniCacheConfig`.
        itemsize: bytes per element of the model dtype, ``s``.

    Returns:
        The predicted ``dense_bytes / held_bytes`` of :meth:`MiniCache.memory_report` right after the prefill.
    """
    pairs = (num_layers - start_layer) // 2
    kept = retained_count(tokens, retain_fraction)
    index_size = torch.empty((), dtype=INDEX_DTYPE).element_size()
    layer = tokens * head_dim * itemsize
    pair = tokens * head_dim * itemsize + 2 * tokens * itemsize + 2 * kept * head_dim * itemsize + kept * index_size
    dense = num_layers * layer * num_kv_heads
    held = ((num_layers - 2 * pairs) * layer + pairs * pair) * num_kv_heads
    return dense / held


# ---------------------------------------------------------------------- pure tensor functions
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 kept (the merge math never runs below float32)."""
    return torch.promote_types(dtype, torch.float32)


def _unit(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(directions, norms)`` along the last dim; a zero vector gets a zero direction (no NaN)."""
    norms = torch.linalg.vector_norm(vectors, dim=-1)
    tiny = torch.finfo(vectors.dtype).tiny
    return vectors / norms.clamp_min(tiny).unsqueeze(-1), norms


def slerp_with_angle(first: torch.Tensor, second: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical interpolation of two directions, plus the angle between them.

    With ``u, v`` the unit directions of ``first`` and ``second`` and ``omega`` their angle, the result is
    ``cos(t*omega) u + sin(t*omega) w``, ``w`` the unit vector of ``v`` orthogonal to ``u``; this equals the usual
    ``sin((1-t)omega)/sin(omega) u + sin(t*omega)/sin(omega) v`` (MiniCache, eq. 3) without dividing by
    ``sin(omega)``. ``omega = atan2(|v - (u.v) u|, u.v)`` stays accurate near 0 and pi. For (anti)parallel vectors
    ``w`` is undefined; any unit vector orthogonal to ``u`` is used (built from the basis vector on which ``u`` is
    smallest), which changes nothing for parallel vectors and picks one of the equally valid great circles for
    antiparallel ones. A zero input contributes the other's direction; two zero inputs give a zero vector.

    Args:
        first: ``(..., dim)`` vectors (any length; normalised here), any float dtype.
        second: ``(..., dim)`` vectors, same shape and dtype.
        t: weight of ``second`` in [0, 1]: 0 gives ``first``'s direction, 1 gives ``second``'s.

    Returns:
        Directions ``(..., dim)`` of unit norm (zero only where both inputs are zero) and angles ``(...)`` in
        ``[0, pi]``, both in the inputs' dtype.
    """
    u, _ = _unit(first)
    v, _ = _unit(second)
    cos_omega = (u * v).sum(dim=-1)
    ortho = v - cos_omega.unsqueeze(-1) * u
    ortho_norm = torch.linalg.vector_norm(ortho, dim=-1)
    omega = torch.atan2(ortho_norm, cos_omega)
    # Fallback w for (anti)parallel pairs: the basis vector on which |u| is smallest, made orthogonal to u (norm at
    # least sqrt(1 - 1/dim)). Always computed and selected with `where`, so no device sync is needed to branch.
    degenerate = ortho_norm <= torch.finfo(first.dtype).eps
    smallest = u.abs().argmin(dim=-1, keepdim=True)
    basis = torch.zeros_like(u).scatter_(-1, smallest, 1.0)
    fallback = basis - u.gather(-1, smallest) * u
    ortho = torch.where(degenerate.unsqueeze(-1), fallback, ortho)
    w, _ = _unit(ortho)
    angle = (t * omega).unsqueeze(-1)
    mixed = torch.cos(angle) * u + torch.sin(angle) * w
    # Renormalise: removes rounding drift, and turns a zero `first` (u = 0) into `second`'s direction.
    direction, _ = _unit(mixed)
    return direction, omega


def slerp(first: torch.Tensor, second: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the directions of ``first`` and ``second`` (see :func:`slerp_with_angle`).

    Args:
        first: ``(..., dim)`` vectors.
        second: ``(..., dim)`` vectors.
        t: weight of ``second`` in [0, 1].

    Returns:
        ``(..., dim)`` unit directions, in the inputs' dtype.
    """
    return slerp_with_angle(first, second, t)[0]


@dataclass
class MergedPair:
    """One side (keys or values) of a merged layer pair: what MiniCache stores instead of two dense layers.

    Attributes:
        directions: ``(batch, kv_heads, tokens, head_dim)`` shared unit directions, model dtype.
        magnitudes: per layer of the pair, ``(batch, kv_heads, tokens)`` norms, model dtype.
        retained_indices: ``(batch, kv_heads, retained)`` int32 token indices kept exact, ascending.
        retained: per layer, ``(batch, kv_heads, retained, head_dim)`` exact states at those indices, model dtype.
    """

    directions: torch.Tensor
    magnitudes: tuple[torch.Tensor, torch.Tensor]
    retained_indices: torch.Tensor
    retained: tuple[torch.Tensor, torch.Tensor]

    @property
    def tokens(self) -> int:
        """Tokens in the merged prefix."""
        return self.directions.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        """Every stored tensor (for byte counts)."""
        return [self.directions, *self.magnitudes, self.retained_indices, *self.retained]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MergedPair:
        """A copy with ``fn`` applied to every tensor (batch-dimension edits: every tensor has batch first)."""
        return MergedPair(
            directions=fn(self.directions),
            magnitudes=(fn(self.magnitudes[0]), fn(self.magnitudes[1])),
            retained_indices=fn(self.retained_indices),
            retained=(fn(self.retained[0]), fn(self.retained[1])),
        )

    def rebuild(self, slot: int) -> torch.Tensor:
        """One layer's states: direction times its magnitude (in float32 or wider), retained tokens written back.

        Args:
            slot: 0 for the pair's first layer, 1 for the second.

        Returns:
            ``(batch, kv_heads, tokens, head_dim)`` in the stored dtype; a new tensor (nothing stored changes).
        """
        dtype = self.directions.dtype
        compute = _compute_dtype(dtype)
        states = (self.directions.to(compute) * self.magnitudes[slot].to(compute).unsqueeze(-1)).to(dtype)
        if self.retained_indices.shape[-1] > 0:
            index = self.retained_indices.long().unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
            states.scatter_(-2, index, self.retained[slot])
        return states


def merge_pair(first: torch.Tensor, second: torch.Tensor, t: float, retain_fraction: float) -> MergedPair:
    """Merge two adjacent layers' states for one side (MiniCache, arXiv 2405.14366).

    Args:
        first: ``(batch, kv_heads, tokens, head_dim)`` states of layer ``l`` (keys post-RoPE).
        second: same shape and dtype, layer ``l + 1``.
        t: SLERP weight of ``second``.
        retain_fraction: per ``(batch, head)``, the ``floor(retain_fraction * tokens)`` tokens with the largest angle
            between the two layers' directions are kept exact in both layers.

    Returns:
        The stored form, in the inputs' dtype (indices int32); the math runs in float32 (float64 stays float64).
        Holds none of the inputs' storage.

    Raises:
        ValueError: if the two layers' states differ in shape.
    """
    if first.shape != second.shape:
        raise ValueError(
            f"layer pair states must have the same shape but got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    dtype = first.dtype
    compute = _compute_dtype(dtype)
    a, b = first.to(compute), second.to(compute)
    direction, omega = slerp_with_angle(a, b, t)
    norm_a = torch.linalg.vector_norm(a, dim=-1)
    norm_b = torch.linalg.vector_norm(b, dim=-1)
    kept = retained_count(first.shape[-2], retain_fraction)
    indices = torch.topk(omega, kept, dim=-1).indices.sort(dim=-1).values  # (batch, kv_heads, kept)
    gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, first.shape[-1])
    return MergedPair(
        directions=direction.to(dtype).contiguous(),
        magnitudes=(norm_a.to(dtype).contiguous(), norm_b.to(dtype).contiguous()),
        retained_indices=indices.to(INDEX_DTYPE),
        retained=(first.gather(-2, gather_index), second.gather(-2, gather_index)),
    )


# ---------------------------------------------------------------------- cache
class MiniCachePairStore(CompressedStore):
    """State shared by the two layers of one merged pair: pending prefill tensors, then the merged prefix.

    Args:
        index: the pair's index in the cache.
        layers: the two model layers ``(l, l + 1)``.
        config: the cache's configuration.
    """

    def __init__(self, index: int, layers: tuple[int, int], config: MiniCacheConfig):
        self.index = index
        self.layers = layers
        self.config = config
        self._reset_state()

    def _reset_state(self) -> None:
        # Prefill: slot -> exact (batch, kv_heads, tokens, head_dim) states until both layers have arrived.
        self.pending_keys: dict[int, torch.Tensor] = {}
        self.pending_values: dict[int, torch.Tensor] = {}
        self.keys: MergedPair | None = None
        self.values: MergedPair | None = None
        self.prefix_len = 0

    @property
    def is_ready(self) -> bool:
        """Whether the pair's prefix has been merged."""
        return self.keys is not None and not self.pending_keys

    def add_prefill(
        self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, inputs: UpdateInputs | None = None
    ) -> None:
        """Hold one layer's prefill states; merge the pair once both layers have arrived.

        Args:
            slot: 0 or 1, the layer's place in the pair.
            key_states: ``(batch, kv_heads, tokens, head_dim)``, post-RoPE.
            value_states: ``(batch, kv_heads, tokens, head_dim)``.
            inputs: RoPE facts of the update (unused: keys are merged post-RoPE).

        Raises:
            RuntimeError: if the two layers prefill different numbers of tokens.
        """
        tokens = key_states.shape[-2]
        if self.pending_keys and tokens != self.prefix_len:
            raise RuntimeError(
                f"layer {self.layers[slot]} prefilled {tokens} tokens, its pair started with {self.prefix_len}"
            )
        self.prefix_len = tokens
        self.pending_keys[slot] = key_states
        self.pending_values[slot] = value_states
        if len(self.pending_keys) == 2:
            self._merge(self.pending_keys[0], self.pending_keys[1], self.pending_values[0], self.pending_values[1])
            self.pending_keys.clear()
            self.pending_values.clear()

    def _merge(self, key0: torch.Tensor, key1: torch.Tensor, value0: torch.Tensor, value1: torch.Tensor) -> None:
        t, fraction = self.config.t, self.config.retain_fraction
        self.keys = merge_pair(key0, key1, t, fraction)
        self.values = merge_pair(value0, value1, t, fraction)
        self.prefix_len = key0.shape[-2]

    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer, rebuilt (a new tensor)."""
        assert self.keys is not None, "rebuild before the pair was merged"
        return self.keys.rebuild(slot)

    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer, rebuilt (a new tensor)."""
        assert self.values is not None, "rebuild before the pair was merged"
        return self.values.rebuild(slot)

    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the merged prefix."""
        return [t for side in (self.keys, self.values) if side is not None for t in side.tensors()]

    def pending_tensors(self) -> list[torch.Tensor]:
        """Prefill tensors held until the partner layer arrives."""
        return list(self.pending_keys.values()) + list(self.pending_values.values())

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every held tensor (batch-dimension edits: beam reorder, select, repeat)."""
        self.keys = self.keys.map(fn) if self.keys is not None else None
        self.values = self.values.map(fn) if self.values is not None else None
        for pending in (self.pending_keys, self.pending_values):
            for slot in pending:
                pending[slot] = fn(pending[slot])

    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens.

        The retained tokens of each head may fall on either side of the cut, so the cropped prefix is merged again
        from the rebuilt states: merged tokens come back unchanged (both layers share their direction) up to
        rounding, and the retained set is chosen again among the kept tokens at the new length.
        """
        if length >= self.prefix_len or self.keys is None or self.values is None:
            return
        if length <= 0:
            self._reset_state()
            return
        keys = [self.keys.rebuild(slot)[:, :, :length] for slot in (0, 1)]
        values = [self.values.rebuild(slot)[:, :, :length] for slot in (0, 1)]
        self._merge(keys[0], keys[1], values[0], values[1])

    def reset(self) -> None:
        """Drop everything held."""
        self._reset_state()


#: Kept for readability in tests and docs: a merged layer is a generic :class:`~xkv.cache.CompressedLayer`.
MiniCacheLayer = CompressedLayer


class MiniCache(GroupedCache):
    """KV-cache that merges adjacent layer pairs by SLERP of their directions (MiniCache, arXiv 2405.14366).

    Use it anywhere a transformers ``Cache`` goes (``model.generate(ids, past_key_values=MiniCache(model))`` or a
    manual forward loop). Data type and device follow the model's activations. :meth:`memory_report` has one
    :class:`~xkv.memory.GroupMemory` per merged pair, with ``rank_k``/``rank_v`` set to ``None`` (MiniCache has no
    rank; both sides are merged, not kept exact).

    Args:
        model: the transformers causal LM whose cache this is (its layer count and KV geometry are read from it).
        config: merge settings; defaults to ``MiniCacheConfig()``.

    Raises:
        NotImplementedError: for an architecture without an adapter (see :mod:`xkv.adapters`).
        ValueError: if ``start_layer`` leaves no pair to merge; the message names the field.
    """

    def __init__(self, model: nn.Module, config: MiniCacheConfig | None = None):
        self.config = config or MiniCacheConfig()
        self.spec = describe_model(model)
        if self.spec.sliding_layers:
            raise NotImplementedError(
                f"MiniCache merges adjacent layer pairs, and {self.spec.model_type} alternates sliding-window layers "
                f"{list(self.spec.sliding_layers)} with full-attention ones: a pair would mix the two kinds"
            )
        if self.spec.latent_attention:
            raise NotImplementedError(
                f"MiniCache interpolates per-head key and value states; {self.spec.model_type} caches one latent "
                "and a RoPE part per layer (Multi-head Latent Attention), which it does not merge"
            )
        num_layers = self.spec.num_layers
        self.start_layer = self.config.resolve_start_layer(num_layers)
        stores = [
            MiniCachePairStore(index, (layer, layer + 1), self.config)
            for index, layer in enumerate(range(self.start_layer, num_layers - 1, 2))
        ]
        super().__init__(self.spec, stores)

    @classmethod
    def from_dense(
        cls,
        model: nn.Module,
        keys_values: list[tuple[torch.Tensor, torch.Tensor]],
        config: MiniCacheConfig | None = None,
    ) -> MiniCache:
        """Compress a finished dense cache; the same stored tensors as merging during the forward pass.

        Args:
            model: the model that produced the cache.
            keys_values: per layer ``(keys, values)``, each ``(batch, kv_heads, tokens, head_dim)``, keys post-RoPE.
            config: merge settings.

        Raises:
            ValueError: if the number of layers does not match the model.
        """
        return cls(model, config).prefill_from(keys_values)

    @classmethod
    def for_compression_factor(
        cls, model: nn.Module, target: float, tokens: int, **config_kwargs: Any
    ) -> MiniCacheConfig | None:
        """The config with the deepest start layer whose predicted compression reaches ``target``.

        The prediction is :func:`predicted_compression_factor` (whole cache, right after a prefill of ``tokens``
        tokens, no decode tail), which :meth:`memory_report` measures exactly. Merging every layer gives at most
        ``2*hd / (hd + 2)`` (under 2x), so e.g. 4x is never reachable.

        Args:
            model: the model the cache is for (layers, KV geometry and dtype are read from it).
            target: wanted ``dense_bytes / held_bytes``, > 0.
            tokens: context length the factor is computed at (it depends on it through the retained count).
            **config_kwargs: other :class:`MiniCacheConfig` fields (``t``, ``retain_fraction``).

        Returns:
            A :class:`MiniCacheConfig` with ``start_layer`` set, or ``None`` if even ``start_layer=0`` falls short.

        Raises:
            ValueError: for ``target <= 0``, ``tokens < 1`` or a ``start_layer`` in ``config_kwargs``.
        """
        if target <= 0:
            raise ValueError(f"`target` must be > 0 but got {target}")
        if tokens < 1:
            raise ValueError(f"`tokens` must be >= 1 but got {tokens}")
        if "start_layer" in config_kwargs:
            raise ValueError("`start_layer` is what for_compression_factor chooses; do not pass it")
        base = MiniCacheConfig(**config_kwargs)
        spec = describe_model(model)
        itemsize = torch.empty((), dtype=model_dtype(model)).element_size()
        for start in range(spec.num_layers - 2, -1, -1):
            factor = predicted_compression_factor(
                spec.num_layers, spec.num_kv_heads, spec.head_dim, tokens, start, base.retain_fraction, itemsize
            )
            if factor >= target:
                return MiniCacheConfig(start_layer=start, t=base.t, retain_fraction=base.retain_fraction)
        return None
