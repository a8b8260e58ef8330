"""The transformers ``Cache``/layer contract for layers compressed together: a store, its layers' views, the container.

The container (:class:`GroupedCache`) and the per-layer view (:class:`CompressedLayer`) know nothing of SVD: they
drive any :class:`CompressedStore`, so cross-layer baselines (``xkv.baselines.minicache``) reuse them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Self

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from xkv import attention
from xkv.adapters import ModelSpec
from xkv.compat import UpdateInputs, query_length, read_update_inputs
from xkv.memory import GroupMemory, MemoryReport, dense_kv_bytes, tensor_bytes
from xkv.positions import left_padded_positions

logger = logging.getLogger(__name__)


class NonFiniteStatesError(ValueError):
    """The model produced NaN or infinite keys/values for a layer whose states were about to be factored."""


def check_finite(layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Refuse non-finite keys/values before an SVD sees them (it would fail deep inside LAPACK, or return NaN).

    Args:
        layer_idx: the model layer the states belong to (named in the error).
        key_states: ``(batch, kv_heads, tokens, head_dim)``.
        value_states: ``(batch, kv_heads, tokens, head_dim)``.

    Raises:
        NonFiniteStatesError: (a ``ValueError``) naming the layer and the side.
    """
    for side, states in (("keys", key_states), ("values", value_states)):
        if not bool(torch.isfinite(states).all()):
            raise NonFiniteStatesError(
                f"layer {layer_idx}: the model produced non-finite {side} (NaN or inf) for the context, which "
                "cannot be factored; check the input embeddings, the dtype (fp16 overflow?) and the weights. The "
                "cache was emptied and can be used again."
            )


class CompressedStore(ABC):
    """State shared by the layers compressed together (an xKV group, a MiniCache pair).

    A store holds its layers' prefill states until the last of them has arrived, then the compressed prefix. Its
    layers (:class:`CompressedLayer`) add an exact tail each. Subclasses set ``index``, ``layers`` and
    ``prefix_len`` and implement the abstract methods.

    Attributes:
        index: position of the store in its cache.
        layers: model layer indices, in slot order.
        prefix_len: tokens of the (pending or compressed) prefix.
    """

    index: int
    layers: tuple[int, ...]
    prefix_len: int

    @property
    @abstractmethod
    def is_ready(self) -> bool:
        """Whether the prefix has been compressed (every layer's prefill has arrived)."""

    @abstractmethod
    def add_prefill(
        self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, inputs: UpdateInputs
    ) -> None:
        """Hold one layer's prefill states ``(batch, kv_heads, tokens, head_dim)``; compress when all are in."""

    @abstractmethod
    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer (a transient)."""

    @abstractmethod
    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer (a transient)."""

    @abstractmethod
    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the compressed prefix."""

    @abstractmethod
    def pending_tensors(self) -> list[torch.Tensor]:
        """Prefill tensors held until the store is complete."""

    @abstractmethod
    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every held tensor (batch-dimension edits: beam reorder, select, repeat)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens."""

    @abstractmethod
    def reset(self) -> None:
        """Drop everything held."""

    def ranks(self) -> tuple[int | None, int | None]:
        """``(rank_k, rank_v)`` for the memory report; ``None`` where the notion does not apply."""
        return None, None

    def attention_inputs(
        self, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor, new_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update`` returns at decode: by default the rebuilt prefix followed by the exact tail.

        Args:
            slot: the layer's position in the store.
            layer_idx: the model layer.
            tail_keys: ``(batch, kv_heads, tail_len, head_dim)`` post-RoPE, the new tokens last.
            tail_values: like ``tail_keys``.
            new_tokens: how many of the tail's tokens this update brought (the queries of this step).
        """
        keys = torch.cat([self.rebuild_keys(slot), tail_keys], dim=-2)
        values = torch.cat([self.rebuild_values(slot), tail_values], dim=-2)
        return keys, values


def held_states(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer's ``(keys, values)`` once it holds 4-D tensors, else ``None`` (not initialised yet)."""
    keys, values = layer.keys, layer.values
    if not layer.is_initialized or keys is None or values is None or keys.dim() != 4:
        return None
    return keys, values


def _emptied(tensor: torch.Tensor) -> torch.Tensor:
    """A new zero-length tensor like ``tensor`` along the token axis; a ``[:, :, :0]`` view would keep its storage."""
    return tensor.new_empty((*tensor.shape[:-2], 0, tensor.shape[-1]))


class CompressedLayer(CacheLayerMixin):
    """One compressed layer: a view on its store plus an exact tail.

    ``keys``/``values`` hold the tail only: ``(batch, kv_heads, tail_len, head_dim)``, keys post-RoPE.

    Args:
        store: the shared store of the layer's group.
        slot: position of this layer within the store.
    """

    is_sliding = False

    def __init__(self, store: CompressedStore, slot: int):
        super().__init__()
        self.store = store
        self.slot = slot
        self.cumulative_length = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty tails with the model's dtype and device."""
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self.keys = key_states.new_empty((batch, heads, 0, head_dim))
        self.values = value_states.new_empty((batch, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens and return what attention needs.

        Args:
            key_states: ``(batch, kv_heads, new_tokens, head_dim)``, post-RoPE.
            value_states: ``(batch, kv_heads, new_tokens, head_dim)``.
            cache_kwargs: the update's extra arguments (RoPE angles or positions, by transformers version).

        Returns:
            Keys and values ``(batch, kv_heads, seen_tokens, head_dim)``: on the layer's first call (prefill) the
            exact inputs; later what the store's decode path gives attention (:meth:`CompressedStore.
            attention_inputs`: the rebuilt prefix followed by the exact tail, or on a fast path the tail alone).
        """
        # Inference-only (like the SVD behind it): nothing the cache holds or hands back carries an autograd graph,
        # so a forward pass outside `torch.no_grad()` works too (the rebuild's `out=` matmuls refuse graphs).
        key_states, value_states = key_states.detach(), value_states.detach()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cumulative_length == 0:
            self.cumulative_length = key_states.shape[-2]
            self.store.add_prefill(self.slot, key_states, value_states, read_update_inputs(cache_kwargs, {}))
            return key_states, value_states
        if not self.store.is_ready:
            raise RuntimeError(
                f"layer {self.store.layers[self.slot]} got new tokens before every layer of its group "
                f"{list(self.store.layers)} finished the prefill"
            )
        attention.check_stale(getattr(self.store, "runtime", None))  # before anything of the new tokens is stored
        self.cumulative_length += key_states.shape[-2]
        tail_keys, tail_values = self._append_tail(key_states, value_states)
        return self.store.attention_inputs(
            self.slot, self.store.layers[self.slot], tail_keys, tail_values, key_states.shape[-2]
        )

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens into the tail's buffers, which double when full (as gpt-fast's KV buffers grow).

        ``keys``/``values`` stay views of the buffers' first ``tail_len`` tokens; ``memory_report()`` charges the
        whole buffers. A tail replaced by a batch edit or a crop starts new buffers.
        """
        tail_keys, tail_values = self.tail()
        old, new = tail_keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if (
            buffers is None
            or buffers[0].shape[-2] < old + new
            or buffers[0].shape[:2] != key_states.shape[:2]
            or tail_keys.untyped_storage().data_ptr() != buffers[0].untyped_storage().data_ptr()
        ):
            capacity = max(16, 2 * (old + new))
            grown = []
            for tail, incoming in ((tail_keys, key_states), (tail_values, value_states)):
                buffer = incoming.new_empty((*incoming.shape[:2], capacity, incoming.shape[-1]))
                buffer[:, :, :old] = tail
                grown.append(buffer)
            buffers = self._buffers = (grown[0], grown[1])
        buffers[0][:, :, old : old + new] = key_states
        buffers[1][:, :, old : old + new] = value_states
        self.keys, self.values = buffers[0][:, :, : old + new], buffers[1][:, :, : old + new]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen by this layer (compressed prefix plus tail)."""
        return self.cumulative_length

    def get_mask_sizes(self, cache_position: torch.Tensor | int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask: every seen token plus the query, no offset."""
        return self.cumulative_length + query_length(cache_position), 0

    def get_max_cache_shape(self) -> int:
        """No maximum length."""
        return -1

    def get_max_length(self) -> int:
        """No maximum length (transformers >= 5.23 name)."""
        return -1

    def tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact tail ``(keys, values)``, each ``(batch, kv_heads, tail_len, head_dim)``.

        Raises:
            RuntimeError: before the layer's first update.
        """
        states = held_states(self)
        if states is None:
            raise RuntimeError(f"layer {self.store.layers[self.slot]} has no tail before its first update")
        return states

    def drop_oldest(self, count: int) -> None:
        """Drop the ``count`` oldest tail tokens (folded into the factors); the rest is copied to new buffers."""
        keys, values = self.tail()
        self.keys, self.values = keys[:, :, count:].clone(), values[:, :, count:].clone()
        self._buffers = None

    def crop_tail(self, length: int) -> None:
        """Keep ``length`` tail tokens (copied, so the dropped ones are freed)."""
        states = held_states(self)
        if states is not None and length < states[0].shape[-2]:
            self.keys, self.values = states[0][:, :, :length].clone(), states[1][:, :, :length].clone()
            self._buffers = None

    def reset(self) -> None:
        """Empty the tail (freeing it) and the length counter."""
        states = held_states(self)
        if states is not None:
            self.keys, self.values = _emptied(states[0]), _emptied(states[1])
        self._buffers = None
        self.cumulative_length = 0


#: Name kept for the public API: an xKV-compressed layer is a :class:`CompressedLayer` over an ``XKVGroupStore``.
XKVLayer = CompressedLayer


class GroupedCache(Cache):
    """A transformers ``Cache`` whose compressed layers share stores; the rest stay ``DynamicLayer``.

    Holds everything xKV and the cross-layer baselines have in common: the Cache contract (lengths, masks, beam
    reorder, batch edits, crop, reset), byte accounting and evaluation helpers. Subclasses build the stores.

    Args:
        spec: the model's attention geometry.
        stores: the compressed groups; every layer not in a store keeps a dense cache.
    """

    def __init__(self, spec: ModelSpec, stores: Sequence[CompressedStore]):
        self.spec = spec
        self.stores = list(stores)
        layers: list[CacheLayerMixin] = [self._dense_layer(i) for i in range(spec.num_layers)]
        for store in stores:
            for slot, layer_idx in enumerate(store.layers):
                layers[layer_idx] = CompressedLayer(store, slot)
        super().__init__(layers=layers)

    def _dense_layer(self, layer_idx: int) -> DynamicLayer:
        """A new uncompressed layer: transformers' sliding-window layer for sliding-window attention, else dynamic."""
        if layer_idx in self.spec.sliding_layers:
            assert self.spec.sliding_window is not None
            return DynamicSlidingWindowLayer(self.spec.sliding_window)
        return DynamicLayer()

    def _filled_dense_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> DynamicLayer:
        """An uncompressed layer holding ``keys``/``values`` after ``seen`` tokens (a sliding layer keeps fewer)."""
        layer = self._dense_layer(layer_idx)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = seen
        return layer

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values and return the keys/values attention uses.

        Args:
            key_states: ``(batch, kv_heads, new_tokens, head_dim)``, post-RoPE.
            value_states: ``(batch, kv_heads, new_tokens, head_dim)``.
            layer_idx: the model layer.
            cache_kwargs: transformers 5.2's ``{"sin", "cos", "cache_position"}``.
            **kwargs: later versions' keyword arguments (``kwargs={"position_ids": ...}``).

        Returns:
            Keys and values ``(batch, kv_heads, seen_tokens, head_dim)``.
        """
        merged = dict(cache_kwargs or {})
        inputs = read_update_inputs(cache_kwargs, kwargs)
        if inputs.position_ids is not None:
            merged["position_ids"] = inputs.position_ids
        try:
            if all(layer.get_seq_length() == 0 for layer in self.layers):
                self.begin_prefill(key_states, inputs, layer_idx)  # the first update of the first prefill, any layer
            else:
                self.before_update(layer_idx, key_states.shape[-2])  # may fold a group's tails into its factors
            out = self.layers[layer_idx].update(key_states, value_states, merged)
        except NonFiniteStatesError:
            self.reset()  # earlier layers already hold this context: drop it so the cache stays usable
            raise
        layer = self.layers[layer_idx]
        states = held_states(layer)
        if isinstance(layer, DynamicSlidingWindowLayer) and states is not None:
            keys, values = states
            if keys.untyped_storage().nbytes() > keys.nbytes:
                # transformers keeps a view of the whole update: copy the window so the rest of a prefill is freed.
                layer.keys, layer.values = keys.clone(), values.clone()
        return out

    def begin_prefill(self, key_states: torch.Tensor, inputs: UpdateInputs, layer_idx: int = 0) -> None:
        """Runs before the first prefill's first update (at ``layer_idx``): check all, so nothing is half-written."""

    def before_update(self, layer_idx: int, tokens: int) -> None:
        """Called before every later update of ``layer_idx`` (``tokens`` new), before it stores anything."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by ``layer_idx`` (compressed prefix plus exact tail)."""
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, cache_position: torch.Tensor | int, layer_idx: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for ``layer_idx``; ``cache_position`` or a query length (by version)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return layer.get_mask_sizes(cache_position)
        if isinstance(cache_position, torch.Tensor):
            return layer.get_mask_sizes(cache_position)
        queries, seen = int(cache_position), layer.get_seq_length()
        if isinstance(layer, DynamicSlidingWindowLayer):  # what transformers' own sliding layer reports
            window = layer.sliding_window
            return min(seen, window - 1) + queries, max(seen - window + 1, 0)
        return seen + queries, 0

    def get_max_length(self) -> int:
        """No maximum length (transformers >= 5.23 name)."""
        return -1

    def reset(self) -> None:
        """Drop every stored token; the cache can be reused for a new prompt."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, DynamicLayer):  # a fresh layer: the next prompt may have another batch size
                self.layers[i] = self._dense_layer(i)
            else:
                layer.reset()
        for store in self.stores:
            store.reset()

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many).

        Cropping into the compressed prefix is left to each store (xKV drops rows of the token basis).
        """
        seen = self.get_seq_length()
        if max_length < 0:
            max_length = seen + max_length
        if max_length >= seen:
            return
        for layer_idx, layer in enumerate(self.layers):  # before anything changes: nothing is half-cropped
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.get_seq_length() >= layer.sliding_window:
                raise ValueError(
                    f"cannot crop: sliding-window layer {layer_idx} has seen {layer.get_seq_length()} tokens, more "
                    f"than its window of {layer.sliding_window}, and no longer holds the older ones"
                )
        for store in self.stores:
            store.crop(max_length)
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.crop_tail(max(0, max_length - layer.store.prefix_len))
                layer.cumulative_length = min(layer.cumulative_length, max_length)
            elif isinstance(layer, DynamicSlidingWindowLayer):
                layer.crop(max_length)  # refuses once the window has been passed, as transformers' own cache does
            elif (states := held_states(layer)) is not None and max_length < states[0].shape[-2]:
                # Copies: DynamicLayer.crop's slices would keep the whole storage alive.
                layer.keys, layer.values = states[0][:, :, :max_length].clone(), states[1][:, :, :max_length].clone()

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for store in self.stores:
            store.map_tensors(fn)
        for layer in self.layers:
            if (states := held_states(layer)) is not None:
                layer.keys, layer.values = fn(states[0]), fn(states[1])
            if isinstance(layer, CompressedLayer):
                layer._buffers = None  # the edited tail is a new tensor; the old buffers must not stay alive

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only ``indices`` of the batch."""
        self._map_batch(lambda t: t[indices.to(t.device)].contiguous())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times along the batch."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def memory_report(self) -> MemoryReport:
        """Bytes held, measured from the stored tensors, against a dense cache of the same tokens and dtype.

        Returns:
            A :class:`~xkv.memory.MemoryReport` with one entry per compressed store; exact tails and pending prefill
            tensors as tail bytes; layers outside the stores as dense layer bytes.
        """
        report = MemoryReport()
        dtype, batch = self._dtype_and_batch()
        if dtype is None:
            return report
        dim, value_dim = self.spec.kv_dim, self.spec.value_dim
        tail: list[torch.Tensor] = []
        dense: list[torch.Tensor] = []
        for store in self.stores:
            tail += store.pending_tensors()
            if store.is_ready:
                rank_k, rank_v = store.ranks()
                report.groups.append(
                    GroupMemory(
                        group_idx=store.index,
                        layers=store.layers,
                        tokens=store.prefix_len,
                        rank_k=rank_k,
                        rank_v=rank_v,
                        held_bytes=tensor_bytes(store.prefix_tensors()),
                        dense_bytes=dense_kv_bytes(batch, store.prefix_len, len(store.layers), dim, dtype, value_dim),
                    )
                )
        for layer in self.layers:
            if (states := held_states(layer)) is not None:
                (tail if isinstance(layer, CompressedLayer) else dense).extend(states)
        report.tail_bytes = tensor_bytes(tail)
        report.dense_layer_bytes = tensor_bytes(dense)
        report.table_bytes, report.workspace_bytes = self._decode_bytes()
        report.held_bytes = sum(g.held_bytes for g in report.groups) + report.tail_bytes + report.dense_layer_bytes
        report.held_bytes += report.table_bytes + report.workspace_bytes
        # The model's own cache: a sliding-window layer keeps at most `window - 1` tokens.
        report.dense_bytes = sum(
            dense_kv_bytes(batch, self._own_cache_tokens(layer), 1, dim, dtype, value_dim) for layer in self.layers
        )
        return report

    @staticmethod
    def _own_cache_tokens(layer: CacheLayerMixin) -> int:
        """Tokens the model's own cache would hold for ``layer``."""
        if isinstance(layer, DynamicSlidingWindowLayer):
            return min(layer.get_seq_length(), layer.sliding_window - 1)
        return layer.get_seq_length()

    def _decode_bytes(self) -> tuple[int, int]:
        """``(table bytes, workspace bytes)`` the decode paths hold; none in this base class."""
        return 0, 0

    def _dtype_and_batch(self) -> tuple[torch.dtype | None, int]:
        for layer in self.layers:
            if (states := held_states(layer)) is not None:
                return states[0].dtype, states[0].shape[0]
        return None, 0

    def materialize(self) -> DynamicCache:
        """A ``DynamicCache`` holding exactly the keys/values this cache gives attention (rebuilt prefix + tail).

        For evaluation and debugging: decoding through it equals decoding through this cache, at dense speed, but it
        holds a full-size cache. Take byte figures from :meth:`memory_report`, never from the result.

        Raises:
            RuntimeError: before the prefill has finished.
        """
        layers: list[CacheLayerMixin] = []
        for layer_idx, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                if not layer.store.is_ready:
                    raise RuntimeError("materialize() needs a finished prefill")
                tail_keys, tail_values = layer.tail()
                keys = torch.cat([layer.store.rebuild_keys(layer.slot), tail_keys], dim=-2)
                values = torch.cat([layer.store.rebuild_values(layer.slot), tail_values], dim=-2)
                layers.append(self._filled_dense_layer(layer_idx, keys, values, keys.shape[-2]))
            elif (states := held_states(layer)) is not None:
                layers.append(self._filled_dense_layer(layer_idx, *states, layer.get_seq_length()))
            else:
                raise RuntimeError(f"materialize() needs a finished prefill; layer {layer_idx} holds nothing")
        dense = DynamicCache()
        dense.layers = layers  # sliding-window layers stay sliding-window layers
        return dense

    def prefill_from(
        self, keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None = None
    ) -> Self:
        """Fill this empty cache from a finished dense prefill, as if it had been passed to that forward pass.

        Args:
            keys_values: per layer ``(keys, values)``, each ``(batch, kv_heads, tokens, head_dim)``, keys post-RoPE,
                e.g. ``[(layer.keys, layer.values) for layer in dynamic_cache.layers]``; not modified.
            attention_mask: ``(batch, tokens)``, 0 on left padding, if the prefill was a left-padded batch (its
                sequences then sat at positions ``0, 1, ...`` from their first real token, as ``generate`` puts
                them); ``None``: positions ``0..T-1``.

        Returns:
            ``self``.

        Raises:
            ValueError: if the number of layers does not match the model, or the cache is not empty.
        """
        if len(keys_values) != self.spec.num_layers:
            raise ValueError(f"`keys_values` has {len(keys_values)} layers but the model has {self.spec.num_layers}")
        if any(layer.get_seq_length() for layer in self.layers):
            raise ValueError("prefill_from() needs an empty cache (call reset() first)")
        lengths = sorted({keys.shape[-2] for keys, _ in keys_values})
        if len(lengths) > 1:
            raise ValueError(
                f"every layer of `keys_values` must hold the whole prompt, but they hold {lengths} tokens (a "
                "sliding-window cache keeps only its window: prefill into `DynamicCache()` without a config)"
            )
        extra: dict[str, Any] = {}
        if attention_mask is not None:
            batch, tokens = keys_values[0][0].shape[0], lengths[0]
            if tuple(attention_mask.shape) != (batch, tokens):
                raise ValueError(
                    f"`attention_mask` must have shape (batch, tokens) = {(batch, tokens)} but got "
                    f"{tuple(attention_mask.shape)}"
                )
            extra["position_ids"] = left_padded_positions(attention_mask)
        for layer_idx, (keys, values) in enumerate(keys_values):
            self.update(keys, values, layer_idx, **extra)
        return self
