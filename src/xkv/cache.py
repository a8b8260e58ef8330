"""``XKVCache``: a transformers ``Cache`` that stores the cross-layer SVD factors of the context (xKV).

Life of a compressed layer group (G layers):

* **Prefill** (the first ``update`` of each layer): the layer's keys are un-rotated to pre-RoPE and held with its
  values until the last layer of the group has run; the exact states are returned, so the prefill attention itself is
  exact (as in the paper). Then the group is factored (:func:`xkv.factorization.cross_layer_svd`) and the dense
  tensors are dropped: with contiguous groups at most one group is dense at a time.
* **Decode / later turns** (every later ``update``): new tokens go to an exact tail per layer; attention gets the
  prefix rebuilt from the factors (RoPE re-applied) followed by the tail. The rebuilt prefix is a transient of one
  layer, never kept between calls. With ``fold_tokens`` set, a group's tails are folded back into its factors once
  they reach that length (incremental SVD), so a long generation or a context fed in chunks keeps a bounded tail.

Layers outside ``[first_layer, last_layer]`` use transformers' ``DynamicLayer``.

The container (:class:`GroupedCache`) and the per-layer view (:class:`CompressedLayer`) know nothing of SVD: they
drive any :class:`CompressedStore`, so cross-layer baselines (``xkv.baselines.minicache``) reuse them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from xkv import attention, prefix
from xkv.adapters import ModelSpec, describe_model, layer_devices
from xkv.compat import UpdateInputs, query_length, read_update_inputs
from xkv.config import ResolvedRank, XKVConfig
from xkv.decode import (
    SelectiveIndex,
    attend_absorbed,
    attend_selective,
    build_selective_index,
    check_prefix_visible,
    group_queries,
    prefix_mask,
    selective_index_bytes,
    tail_mask,
    ungroup_output,
)
from xkv.factorization import (
    LowRankFactors,
    UnreachableRatioError,
    append_rows,
    as_float,
    cross_layer_svd,
    from_state,
    full_rank,
    resolve_rank,
)
from xkv.forms import StoredFactors, choose_head, dtype_named
from xkv.groups import LayerGroup, build_groups, check_groups_on_one_device
from xkv.memory import GroupMemory, MemoryReport, dense_kv_bytes, tensor_bytes
from xkv.rope import PrefixAngles, RotaryAngles, apply_rope, apply_rope_, left_padded_positions, unapply_rope

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


def _states(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor] | None:
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
        states = _states(self)
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
        states = _states(self)
        if states is not None and length < states[0].shape[-2]:
            self.keys, self.values = states[0][:, :, :length].clone(), states[1][:, :, :length].clone()
            self._buffers = None

    def reset(self) -> None:
        """Empty the tail (freeing it) and the length counter."""
        states = _states(self)
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
        states = _states(layer)
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
            elif (states := _states(layer)) is not None and max_length < states[0].shape[-2]:
                # Copies: DynamicLayer.crop's slices would keep the whole storage alive.
                layer.keys, layer.values = states[0][:, :, :max_length].clone(), states[1][:, :, :max_length].clone()

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for store in self.stores:
            store.map_tensors(fn)
        for layer in self.layers:
            if (states := _states(layer)) is not None:
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
            if (states := _states(layer)) is not None:
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
            if (states := _states(layer)) is not None:
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
            elif (states := _states(layer)) is not None:
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


#: Updates of up to this many tokens use the configured fast decode path; longer ones (prefill chunks, questions)
#: the rebuild path. A 512-token chunk on the absorb path held ~75 MB of scores per layer at 4k (benchmarks/memory).
FAST_PATH_MAX_QUERIES = 16
#: Settings the Selective Reconstruction index is built with: a copy at other settings cannot reuse it.
_INDEX_FIELDS = ("sr_chunk_size", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks")


class Workspace:
    """Buffers reused by every layer's rebuild (one layer is rebuilt at a time), with 1/16 headroom for the tail.

    The rebuild path returns views of these buffers from ``update``; attention reads them before the next layer
    overwrites them. They live as long as the cache: ``memory_report()`` counts them in ``held_bytes`` (and shows
    them as ``workspace_bytes``) from the first decode step on.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` backed by the buffer ``name`` (contents undefined)."""
        need = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < need or buffer.dtype != dtype or buffer.device != device:
            size = need + need // 16  # headroom for the tail: a new buffer every ~T/16 decode steps, not each one
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:need].view(shape)

    def tensors(self) -> list[torch.Tensor]:
        """The buffers held."""
        return list(self.buffers.values())

    def reset(self) -> None:
        """Free the buffers."""
        self.buffers.clear()


@dataclass
class DecodeRuntime:
    """What the groups of one cache share at decode.

    Attributes:
        fast: whether the model runs attention through ``"xkv"`` (:mod:`xkv.attention`), so the absorb and selective
            paths can see the query; if ``False`` every layer uses the rebuild path.
        table: RoPE angles of the prefix positions (``None`` for a model without RoPE).
        workspace: the rebuild path's buffers.
        pads: ``(batch,)`` left-padding tokens per sequence of a padded batch, else ``None``: sequence ``b``'s token
            at index ``i`` sits at RoPE position ``i - pads[b]``, and its first ``pads[b]`` rows are zero in the
            factors (padding never enters a basis).
    """

    fast: bool
    table: PrefixAngles | None
    workspace: Workspace = field(default_factory=Workspace)
    pads: torch.Tensor | None = None
    # The prefix's per-sequence cos/sin for ``pads``, built at the first decode step, not at every one:
    # (pads it was built for, tokens, cos, sin). Counted with the RoPE table.
    _padded: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def positions(self, start: int, stop: int, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, stop - start)`` RoPE positions of token indices ``start .. stop-1`` (padding rows: 0)."""
        index = torch.arange(start, stop, device=device).unsqueeze(0)
        if self.pads is None:
            return index.expand(batch, -1)
        return (index - self.pads.to(device).unsqueeze(1)).clamp(min=0)

    def padded_angles(self, tokens: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, tokens, rot_dim)`` float32 cos and sin of the prefix rows, each sequence at its own positions."""
        assert self.table is not None
        cos, sin = self.table.get(tokens, device)
        if self.pads is None:
            return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        held = self._padded
        if held is None or held[0] is not self.pads or held[1] != tokens or held[2].device != device:
            index = self.positions(0, tokens, batch, device)
            held = self._padded = (self.pads, tokens, cos[index], sin[index])
        return held[2], held[3]

    def padded_tensors(self) -> list[torch.Tensor]:
        """The per-sequence cos/sin tables held for a padded batch (empty otherwise)."""
        held = self._padded
        return [held[2], held[3]] if held is not None and held[0] is self.pads else []

    def real_rows(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """``(batch, tokens)`` bool, ``False`` on left padding; ``None`` for an unpadded batch."""
        if self.pads is None:
            return None
        return torch.arange(tokens, device=device).unsqueeze(0) >= self.pads.to(device).unsqueeze(1)


class XKVGroupStore(CompressedStore):
    """State shared by the layers of one group: pending prefill tensors, then the factors of the prefix.

    Args:
        group: the layers of the group.
        config: the cache's configuration.
        num_groups: groups in the cache (to resolve per-group rank lists).
        spec: the model's attention geometry.
        angles: RoPE cos/sin at given positions (``None`` for a model without RoPE).
        runtime: decode state shared by the cache's groups; a private one (rebuild path only) if ``None``.
    """

    def __init__(
        self,
        group: LayerGroup,
        config: XKVConfig,
        num_groups: int,
        spec: ModelSpec,
        angles: RotaryAngles | None,
        runtime: DecodeRuntime | None = None,
    ):
        self.group = group
        self.runtime = runtime or DecodeRuntime(False, PrefixAngles(angles) if angles is not None else None)
        self._fallbacks_logged: set[str] = set()
        self.index = group.index
        self.layers = group.layers
        self.config = config
        self.spec = spec
        self.angles = angles
        self.setting_k = config.rank_setting("k", group.index, num_groups)
        self.setting_v = config.rank_setting("v", group.index, num_groups)
        self._reset_state()

    def _reset_state(self) -> None:
        # Prefill: slot -> (batch, tokens, D) pre-RoPE keys / values when compressed, else exact (batch, H, T, hd).
        self.pending_keys: dict[int, torch.Tensor] = {}
        self.pending_values: dict[int, torch.Tensor] = {}
        self.key_factors: StoredFactors | None = None
        self.value_factors: StoredFactors | None = None
        self.dtype: torch.dtype | None = None  # the model's, set at the first prefill
        # Exact prefix per slot, when a side is not compressed: (batch, H, T, hd), keys post-RoPE.
        self.exact_keys: list[torch.Tensor] | None = None
        self.exact_values: list[torch.Tensor] | None = None
        self.prefix_len = 0
        self.rank_k: int | None = None
        self.rank_v: int | None = None
        # Set by the cache for a prefill shorter than `config.min_tokens`: the group keeps it exact.
        self.exact_prefill = False
        # Selective Reconstruction: landmarks and exact chunks per slot (built at prefill when decode="selective").
        self.selective: dict[int, SelectiveIndex] = {}
        # False when the index's bytes would leave a side no rank at the target (`plan_index`).
        self.index_fits = True

    # ------------------------------------------------------------------ prefill
    def headroom_ranks(self, tokens: int) -> tuple[int | None, int | None]:
        """Ranks a prefix of unbounded length would get, capped by what ``tokens`` tokens allow (``fold_headroom``)."""
        assert self.dtype is not None
        bound = min(tokens, self.group.size * self.spec.kv_dim)
        now, long = self.check_ranks(tokens, self.dtype), self.check_ranks(1 << 40, self.dtype)
        return tuple(  # type: ignore[return-value]
            None if r is None or big is None else max(r, min(big, bound)) for r, big in zip(now, long, strict=True)
        )

    def check_ranks(self, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None]:
        """Resolve both ranks for a prefill of ``tokens`` tokens in ``dtype`` without changing any state.

        A compression factor counts the bytes of ``config.factor_form`` against a dense cache in ``dtype``.

        Raises:
            ValueError: if a rank does not fit the data; the message names the field and the group.
        """
        if self.exact_prefill:
            return None, None
        fmt, itemsize = self.config.factor_format, torch.empty((), dtype=dtype).element_size()
        sides = (
            ("k", self.setting_k, self.config.compress_keys),
            ("v", self.setting_v, self.config.compress_values),
        )
        reserved = self._index_reservations(tokens, itemsize, [setting for _, setting, _ in sides])
        ranks: list[int | None] = []
        for (side, setting, wanted), extra in zip(sides, reserved, strict=True):
            field_name = f"rank_{side} for group {self.group.index}"
            ranks.append(
                resolve_rank(setting, tokens, self.group.size, self.spec.kv_dim, field_name=field_name, fmt=fmt,
                             itemsize=itemsize, reserved_bytes=extra)
                if wanted else None
            )  # fmt: skip
        return ranks[0], ranks[1]

    def plan_index(self, tokens: int, dtype: torch.dtype) -> None:
        """Check the ranks of a first prefill; drop Selective Reconstruction's index where it does not fit.

        A short prefix at a high factor may not afford the landmarks and exact chunks on top of rank 1, and at a
        high factor they may take more than ``sr_max_share`` of the bytes: the group then decodes with ``"absorb"``
        (logged) instead of failing or starving its factors.

        Raises:
            UnreachableRatioError: if a rank does not fit even without the index.
        """
        self.index_fits = True
        if self.affordable_ranks(tokens, dtype) is None:
            self.index_fits = False
            self.check_ranks(tokens, dtype)
            logger.info(
                "group %d: Selective Reconstruction's landmarks and exact chunks do not fit the target at %d tokens "
                "(more than sr_max_share=%g of its bytes); it decodes with 'absorb'",
                self.group.index, tokens, self.config.sr_max_share,
            )  # fmt: skip

    def affordable_ranks(self, tokens: int, dtype: torch.dtype) -> tuple[int | None, int | None] | None:
        """The ranks with the index paid for, or ``None`` where the index does not fit.

        It does not fit when it would leave a side no rank or take more than ``sr_max_share`` of the budget.

        Raises:
            UnreachableRatioError: if a rank does not fit and no index is reserved for.
        """
        try:
            ranks = self.check_ranks(tokens, dtype)
        except UnreachableRatioError:
            if not self._holds_index(tokens):
                raise
            return None
        return ranks if self.index_share(tokens, dtype) <= self.config.sr_max_share else None

    def index_share(self, tokens: int, dtype: torch.dtype) -> float:
        """The fraction of this group's byte budget Selective Reconstruction's index would take (0 without one)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        settings = [self.setting_k, self.setting_v]
        budget = sum(self._factor_budgets(tokens, itemsize, settings))
        return sum(self._index_reservations(tokens, itemsize, settings)) / budget if budget else 0.0

    def builds_index(self, tokens: int) -> bool:
        """Whether a prefill of ``tokens`` tokens holds a Selective Reconstruction index (landmarks, exact chunks)."""
        config = self.config
        return (
            self.index_fits
            and config.decode == "selective"
            and self.runtime.fast
            and self.runtime.pads is None
            and config.compress_keys
            and config.compress_values
            and not self.exact_prefill
            and tokens >= config.sr_min_tokens
        )

    def _holds_index(self, tokens: int) -> bool:
        """Whether ranks resolved now pay for an index.

        Once factored, the one held (folds and crops drop it); before, the one a prefill of ``tokens`` tokens builds.
        """
        return bool(self.selective) if self.is_ready else self.builds_index(tokens)

    def _factor_budgets(self, tokens: int, itemsize: int, settings: list[ResolvedRank]) -> list[float]:
        """Bytes each side's compression factor allows for ``tokens`` tokens (0 for an explicit rank or fraction)."""
        dense_side = self.group.size * tokens * self.spec.kv_dim * itemsize
        return [dense_side / s.value if s.kind == "factor" else 0.0 for s in settings]

    def _index_reservations(self, tokens: int, itemsize: int, settings: list[ResolvedRank]) -> list[float]:
        """Bytes of the Selective Reconstruction index each side's compression factor must also pay for.

        The index's bytes (:func:`xkv.decode.selective_index_bytes`, ``G`` layers) are shared between the sides
        set by a compression factor, in proportion to their budgets, so each side's factors plus its share meet
        its factor: ``"4x"`` measures 4x with the landmarks and exact chunks counted. Nothing is reserved without
        an index, or for a side set by an explicit rank or fraction.
        """
        budgets = self._factor_budgets(tokens, itemsize, settings)
        total = sum(budgets)
        if not self._holds_index(tokens) or total == 0:
            return [0.0 for _ in settings]
        config = self.config
        per_layer = sum(selective_index_bytes(
            tokens, self.spec.num_kv_heads, self.spec.head_dim, itemsize, config.sr_chunk_size,
            config.sr_sink_chunks, config.sr_local_chunks, config.sr_outlier_chunks,
        ))  # fmt: skip
        return [self.group.size * per_layer * b / total for b in budgets]

    @property
    def is_ready(self) -> bool:
        """Whether the group's prefix has been factored."""
        return self.prefix_len > 0 and not self.pending_keys

    def ranks(self) -> tuple[int | None, int | None]:
        """``(rank_k, rank_v)`` of the factors (``None`` for a side kept exact)."""
        return self.rank_k, self.rank_v

    def add_prefill(self, slot: int, key_states: torch.Tensor, value_states: torch.Tensor, inputs: UpdateInputs):
        """Hold one layer's prefill states; factor the group once its last layer has arrived.

        Args:
            slot: position of the layer in the group.
            key_states: ``(batch, kv_heads, tokens, head_dim)``, post-RoPE (as attention hands them over).
            value_states: ``(batch, kv_heads, tokens, head_dim)``.
            inputs: RoPE angles the model used, when the transformers version passes them.
        """
        batch, heads, tokens, head_dim = key_states.shape
        if self.pending_keys and tokens != self.prefix_len:
            raise RuntimeError(
                f"layer {self.group.layers[slot]} prefilled {tokens} tokens, its group started with {self.prefix_len}"
            )
        if not self.exact_prefill and (self.config.compress_keys or self.config.compress_values):
            check_finite(self.group.layers[slot], key_states, value_states)  # before anything of it is held
        self.prefix_len = tokens
        self.dtype = key_states.dtype
        # Sides kept exact are cloned: the caller (e.g. `from_dense` with a DynamicCache) may reuse its tensors.
        if self.config.compress_keys and not self.exact_prefill:
            keys = key_states
            if self.angles is not None:
                cos, sin = inputs.cos, inputs.sin
                if cos is None or sin is None:
                    cos, sin = self.angles(self.positions(batch, key_states.device))
                keys = unapply_rope(key_states, cos, sin)
            self.pending_keys[slot] = self._without_padding(keys.transpose(1, 2).reshape(batch, tokens, -1))
        else:
            self.pending_keys[slot] = key_states.clone()
        if self.config.compress_values and not self.exact_prefill:
            self.pending_values[slot] = self._without_padding(value_states.transpose(1, 2).reshape(batch, tokens, -1))
        else:
            self.pending_values[slot] = value_states.clone()
        config = self.config
        if self.builds_index(tokens):
            self.selective[slot] = build_selective_index(
                key_states, value_states, config.sr_chunk_size, config.sr_sink_chunks, config.sr_local_chunks,
                config.sr_outlier_chunks,
            )  # fmt: skip
        if len(self.pending_keys) == self.group.size:
            self._factor()

    def _without_padding(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` ``(batch, tokens, D)`` with the rows of left padding zeroed (a copy), so no basis sees them."""
        real = self.runtime.real_rows(flat.shape[1], flat.device)
        return flat if real is None else flat * real.unsqueeze(-1).to(flat.dtype)

    def _factor(self) -> None:
        assert self.dtype is not None
        self.rank_k, self.rank_v = self.check_ranks(self.prefix_len, self.dtype)
        keys = [self.pending_keys[s] for s in range(self.group.size)]
        values = [self.pending_values[s] for s in range(self.group.size)]
        # With folding and headroom, later chunks will be folded in: keep room for directions they will need.
        headroom = self.config.fold_headroom and self.config.fold_tokens > 0
        room_k, room_v = self.headroom_ranks(self.prefix_len) if headroom else (self.rank_k, self.rank_v)
        # With headroom the factors stay in the model's dtype until `XKVCache.fold()` stores them in their form:
        # quantizing at every fold would add a rounding error per chunk.
        store = (lambda factors, setting, rank: factors) if headroom else self._store
        if room_k is not None:
            self.key_factors = store(self._svd(keys, room_k), self.setting_k, room_k)
        else:
            self.exact_keys = keys
        if room_v is not None:
            self.value_factors = store(self._svd(values, room_v), self.setting_v, room_v)
        else:
            self.exact_values = values
        self.pending_keys.clear()
        self.pending_values.clear()
        # An int4 form with an int8 head may keep fewer directions than the resolved (all-int4) rank.
        self.rank_k = self.key_factors.rank if self.key_factors is not None else None
        self.rank_v = self.value_factors.rank if self.value_factors is not None else None

    def fold(self, tails: list[tuple[torch.Tensor, torch.Tensor]], count: int, headroom: bool = False) -> None:
        """Fold the ``count`` oldest tail tokens of every layer into the prefix (the caller drops them from the tails).

        Keys are un-rotated at their positions ``prefix_len .. prefix_len + count - 1``; each factored side gets
        the new rows by an incremental SVD (:func:`xkv.factorization.append_rows`) at the ranks resolved for the new
        length (at most ``rank + count``); a quantized side is dequantized, folded and quantized again. A side kept
        exact gets the tokens appended. Selective Reconstruction's index no longer covers the prefix and is dropped
        (decode falls back to ``"absorb"``).

        Args:
            tails: per slot, the layer's exact tail ``(keys, values)``, each ``(b, H, L, hd)``, keys post-RoPE.
            count: tokens to fold, ``1 <= count <= L``.
            headroom: keep up to :meth:`headroom_ranks` directions instead of the new length's ranks (:meth:`trim`
                cuts back).
        """
        assert self.is_ready and self.dtype is not None
        for slot, (keys, values) in enumerate(tails):
            check_finite(self.group.layers[slot], keys[:, :, :count], values[:, :, :count])
        keys0 = tails[0][0]
        batch, heads, _, head_dim = keys0.shape
        start, tokens = self.prefix_len, self.prefix_len + count
        self.selective = {}  # its chunks describe the old prefix; no bytes are reserved for it from here on
        rank_k, rank_v = self.headroom_ranks(tokens) if headroom else self.check_ranks(tokens, self.dtype)
        cos = sin = None
        if self.angles is not None:
            cos, sin = self.angles(self.runtime.positions(start, tokens, batch, keys0.device))

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, count, heads * head_dim)

        for side, rank in (("k", rank_k), ("v", rank_v)):
            held = self.key_factors if side == "k" else self.value_factors
            new = [(k if side == "k" else v)[:, :, :count] for k, v in tails]
            if held is None:
                exact = self.exact_keys if side == "k" else self.exact_values
                assert exact is not None
                exact[:] = [torch.cat([old, part], dim=-2) for old, part in zip(exact, new, strict=True)]
                continue
            if side == "k" and cos is not None and sin is not None:
                new = [unapply_rope(part, cos, sin) for part in new]
            floating = as_float(held)  # quantized forms: float32 (folded and quantized again without rounding)
            assert rank is not None
            grown = append_rows(floating, [flat(part) for part in new], min(rank, floating.rank + count))
            if isinstance(held, LowRankFactors) or headroom:  # headroom: the model's dtype until `trim`
                grown = self._in_model_dtype(grown)
            self.prefix_len = tokens  # `_store` sizes an int4 budget by the new length
            setting = self.setting_k if side == "k" else self.setting_v
            self._set_side(side, grown if headroom else self._store(grown, setting, budget_rank=rank))
        self.prefix_len = tokens
        self.selective = {}

    def trim(self) -> bool:
        """Bring factors to the ranks resolved at the prefix's length and to their storage form; whether any changed.

        Folds with ``fold_headroom`` leave more directions, in the model's dtype; a quantized side holding too many
        is dequantized, cut and quantized again.
        """
        if not self.is_ready or self.exact_prefill:
            return False
        assert self.dtype is not None
        rank_k, rank_v = self.check_ranks(self.prefix_len, self.dtype)
        quantized = self.config.factor_form != "model"
        cut = False
        for side, rank in (("k", rank_k), ("v", rank_v)):
            held = self.key_factors if side == "k" else self.value_factors
            if held is None or rank is None:
                continue
            if held.rank <= rank and not (quantized and isinstance(held, LowRankFactors)):
                continue
            # Not `truncate`: a Hadamard rotation or a quantization round trip leaves the columns out of order.
            floating = as_float(held)
            if floating.rank > rank:
                floating = floating.recompressed(rank)
            if isinstance(held, LowRankFactors):
                floating = self._in_model_dtype(floating)
            setting = self.setting_k if side == "k" else self.setting_v
            self._set_side(side, self._store(floating, setting, budget_rank=rank))
            cut = True
        return cut

    def _in_model_dtype(self, factors: LowRankFactors) -> LowRankFactors:
        """``factors`` cast to the cache's dtype (folds and recompressions compute in float32)."""
        return LowRankFactors(factors.token_basis.to(self.dtype), factors.reconstruction.to(self.dtype))

    def _set_side(self, side: str, stored: StoredFactors) -> None:
        """Hold ``stored`` as the keys' (``"k"``) or values' factors, with its rank."""
        if side == "k":
            self.key_factors, self.rank_k = stored, stored.rank
        else:
            self.value_factors, self.rank_v = stored, stored.rank

    def truncated(self, config: XKVConfig, num_groups: int, runtime: DecodeRuntime | None = None) -> XKVGroupStore:
        """A copy of this factored store keeping the first ``r`` singular directions of each side.

        With exact SVD factors this equals factoring the same prefix at rank ``r`` (singular values are sorted), so
        one full-rank factorization serves every lower rank (e.g. several target factors in an evaluation).

        Args:
            config: settings whose ranks are resolved for this group and its prefix length.
            num_groups: groups in the cache (for per-group rank lists).
            runtime: decode state of the copy's cache (this store's if ``None``).

        Raises:
            ValueError: if the store is not factored, a side asked for is not factored here, or a rank exceeds the
                rank held.
        """
        if not self.is_ready or self.exact_prefill:
            raise ValueError(f"group {self.index} holds no factors to truncate")
        new = XKVGroupStore(self.group, config, num_groups, self.spec, self.angles, runtime or self.runtime)
        if (
            config.decode == "selective"
            and self.prefix_len >= config.sr_min_tokens
            and all(getattr(config, name) == getattr(self.config, name) for name in _INDEX_FIELDS)
        ):
            new.selective = dict(self.selective)  # rank-independent, never edited in place
        new.prefix_len = self.prefix_len
        new.dtype = self.dtype
        assert self.dtype is not None
        ranks = new.affordable_ranks(self.prefix_len, self.dtype)
        if ranks is None:  # the index does not fit these ranks' budget: decode with "absorb"
            new.selective = {}
            ranks = new.check_ranks(self.prefix_len, self.dtype)
        new.rank_k, new.rank_v = ranks
        for side, rank, held, exact in (
            ("k", new.rank_k, self.key_factors, self.exact_keys),
            ("v", new.rank_v, self.value_factors, self.exact_values),
        ):
            if rank is None:
                if exact is None:
                    raise ValueError(f"`compress_{'keys' if side == 'k' else 'values'}`=False needs the exact side")
                kept = [t.clone() for t in exact]
                if side == "k":
                    new.exact_keys = kept
                else:
                    new.exact_values = kept
                continue
            if held is None or rank > held.rank:
                have = None if held is None else held.rank
                raise ValueError(f"`rank_{side}` for group {self.index} is {rank} but only rank {have} is held")
            if not isinstance(held, LowRankFactors):
                raise ValueError(
                    f"group {self.index} holds {self.config.factor_form} factors: truncating them would quantize "
                    "twice; lower ranks from factors in the model's dtype (factor_form='model')"
                )
            factors = new._store(held.truncate(rank), new.setting_k if side == "k" else new.setting_v)
            if side == "k":
                new.key_factors, new.rank_k = factors, factors.rank
            else:
                new.value_factors, new.rank_v = factors, factors.rank
        return new

    def _svd(self, layers: list[torch.Tensor], rank: int) -> LowRankFactors:
        config = self.config
        factors = cross_layer_svd(
            layers, rank, method=config.svd, oversample=config.svd_oversample, niter=config.svd_niter,
            seed=config.svd_seed,
        )  # fmt: skip
        real = self.runtime.real_rows(self.prefix_len, factors.token_basis.device)
        if real is None:
            return factors
        # The padding rows came in as zeros; the SVD leaves rounding noise there: make them exactly zero.
        basis = factors.token_basis
        return LowRankFactors(basis * real.unsqueeze(-1).to(basis.dtype), factors.reconstruction)

    def _store(self, factors: LowRankFactors, setting: ResolvedRank, budget_rank: int | None = None) -> StoredFactors:
        """``factors`` in the configured storage form.

        For ``"int4"`` with a compression-factor rank, the byte budget is that of ``budget_rank`` directions at int4
        alone (default: the rank of ``factors``, which then hold that many); the int8 head (``factor_head``) is paid
        for out of it, so the kept rank may be lower.
        """
        fmt, head = self.config.factor_format, self.config.factor_head
        if fmt.form != "int4":
            return factors.stored(fmt)
        if setting.kind == "factor":
            assert self.dtype is not None
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            rank = budget_rank or factors.rank
            budget = fmt.factor_bytes(self.prefix_len, self.group.size, self.spec.kv_dim, rank, itemsize)
            heads = None if head == "auto" else [int(head)]
            extra = 4 if itemsize == 2 else 0  # QuantizedFactors.balance
            chosen, rank = choose_head(factors.token_basis, factors.reconstruction, fmt, budget, heads, extra)
            return (factors.truncate(rank) if rank < factors.rank else factors).stored(fmt, chosen)
        return factors.stored(fmt, 0 if head == "auto" else min(int(head), factors.rank))

    # ------------------------------------------------------------------ rebuild
    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, prefix_len)`` RoPE positions of the prefix: ``0..T-1``, or after each sequence's left padding."""
        return self.runtime.positions(0, self.prefix_len, batch, device)

    def rebuild_keys(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` post-RoPE keys of one layer, rebuilt from the factors."""
        if self.key_factors is None:
            assert self.exact_keys is not None, "rebuild before the group was factored"
            return self.exact_keys[slot]
        flat = self.key_factors.layer(slot)  # (batch, T, D), pre-RoPE
        batch, tokens, _ = flat.shape
        keys = flat.view(batch, tokens, self.spec.num_kv_heads, self.spec.head_dim).transpose(1, 2)
        if self.runtime.table is None:
            return keys
        return apply_rope(keys, *self.runtime.padded_angles(tokens, batch, keys.device))

    def rebuild_values(self, slot: int) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len, head_dim)`` values of one layer, rebuilt from the factors."""
        if self.value_factors is None:
            assert self.exact_values is not None, "rebuild before the group was factored"
            return self.exact_values[slot]
        flat = self.value_factors.layer(slot)
        batch, tokens, _ = flat.shape
        return flat.view(batch, tokens, self.spec.num_kv_heads, self.spec.head_dim).transpose(1, 2)

    # ------------------------------------------------------------------ decode
    def decode_path(self, slot: int) -> str:
        """The path this group's layer at ``slot`` decodes with.

        ``config.decode`` where it can serve, else a fallback, logged once per reason.
        """
        wanted = self.config.decode
        reason = None
        if wanted == "rebuild":
            return wanted
        if not self.runtime.fast:
            reason = "the model does not run attention through 'xkv'"
        elif self.key_factors is None or self.value_factors is None:
            reason = "a side of the prefix is kept exact (compress_keys/compress_values=false or a short prefill)"
        elif wanted == "selective" and slot not in self.selective:
            reason = (
                "the prefix is shorter than sr_min_tokens, was cropped or folded, the batch is left-padded, or the "
                "landmarks did not fit the target ratio: no Selective Reconstruction index"
            )
            if reason not in self._fallbacks_logged:
                self._fallbacks_logged.add(reason)
                logger.info("group %d decodes with 'absorb' instead of 'selective': %s", self.index, reason)
            return "absorb"
        if reason is not None:
            if reason not in self._fallbacks_logged:
                self._fallbacks_logged.add(reason)
                logger.info("group %d decodes with 'rebuild' instead of %r: %s", self.index, wanted, reason)
            return "rebuild"
        return wanted

    def attention_inputs(
        self, slot: int, layer_idx: int, tail_keys: torch.Tensor, tail_values: torch.Tensor, new_tokens: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild path: prefix and tail in one reused workspace. Fast paths: the tail, plus a pending request.

        On the fast paths attention itself (:func:`xkv.attention.xkv_attention_forward`) reads the factors; the
        tensors returned here are the exact tail only. Updates of more than :data:`FAST_PATH_MAX_QUERIES` tokens
        (a prefill chunk, a long question) take the rebuild path: it is exact, and SDPA over the rebuilt prefix
        needs neither the fast paths' ``(queries, prefix)`` float32 score matrices nor their time.
        """
        path = self.decode_path(slot) if new_tokens <= FAST_PATH_MAX_QUERIES else "rebuild"
        if path == "rebuild":
            return self._rebuilt("k", slot, tail_keys), self._rebuilt("v", slot, tail_values)
        attend = functools.partial(self._attend, slot, path, tail_keys, tail_values)
        attention.leave(attention.PendingAttention(layer_idx, tail_keys, attend, self.runtime))
        return tail_keys, tail_values

    def _rebuilt(self, side: str, slot: int, tail: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, prefix_len + tail_len, head_dim)``: a view of the workspace (keys post-RoPE)."""
        factors = self.key_factors if side == "k" else self.value_factors
        if factors is None:
            exact = self.exact_keys if side == "k" else self.exact_values
            assert exact is not None, "rebuild before the group was factored"
            return torch.cat([exact[slot], tail], dim=-2)
        basis, matrix = factors.basis(), factors.matrix(slot)
        batch, tokens, _ = basis.shape
        heads, head_dim, length = self.spec.num_kv_heads, self.spec.head_dim, tail.shape[-2]
        flat = self.runtime.workspace.get(side, (batch, tokens + length, heads * head_dim), basis.dtype, basis.device)
        for i in range(batch):  # `out=` needs a contiguous target: one (T, D) block per sequence
            torch.matmul(basis[i], matrix[i], out=flat[i, :tokens])
        view = flat.view(batch, tokens + length, heads, head_dim)
        if side == "k" and self.runtime.table is not None:
            prefix = view[:, :tokens]
            if (
                self.runtime.table.halves_equal
                and basis.dtype in (torch.float32, torch.float64)
                and self.runtime.pads is None
            ):
                apply_rope_(prefix, *self.runtime.table.get(tokens, basis.device))
            else:
                rotated = apply_rope(prefix.transpose(1, 2), *self.runtime.padded_angles(tokens, batch, basis.device))
                prefix.copy_(rotated.transpose(1, 2))
        if length:
            view[:, tokens:] = tail.transpose(1, 2)
        return view.transpose(1, 2)

    def _attend(
        self,
        slot: int,
        path: str,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of ``query`` ``(b, Hq, q, hd)`` over this layer's prefix and tail: ``(b, q, Hq, hd)``."""
        assert self.key_factors is not None and self.value_factors is not None
        tokens, heads = self.prefix_len, self.spec.num_kv_heads
        num_heads, length = query.shape[1], query.shape[2]
        hidden = None
        if path == "absorb":  # follows the model's mask over the prefix (left padding), or the padding it saw
            hidden = prefix_mask(attention_mask, self.runtime.real_rows(tokens, query.device), tokens, length,
                                 num_heads // heads)  # fmt: skip
        else:  # Selective Reconstruction's index is built for unpadded prefixes only
            check_prefix_visible(attention_mask, tokens)
        grouped = group_queries(query, heads)
        mask = tail_mask(attention_mask, tokens, tail_keys.shape[-2], length, num_heads // heads, query.device)
        if path == "absorb":
            keys = self._rebuilt("k", slot, tail_keys[:, :, :0])
            out = attend_absorbed(
                grouped, keys, self.value_factors, slot, tail_keys, tail_values, scaling, mask, hidden
            )  # fmt: skip
        else:
            table = self.runtime.table
            angles = table.joint_table(tokens, query.device) if table is not None else None
            out = attend_selective(
                grouped, self.selective[slot], self.key_factors, self.value_factors, slot, angles,
                self.config.budget_chunks(tokens, self.selective[slot].chunk_size), tail_keys, tail_values, scaling,
                mask,
            )  # fmt: skip
        return ungroup_output(out.to(query.dtype), num_heads, length)

    # ------------------------------------------------------------------ bookkeeping
    def prefix_tensors(self) -> list[torch.Tensor]:
        """Every tensor held for the factored prefix.

        The factors (or exact sides), and Selective Reconstruction's landmarks and exact chunks.
        """
        tensors: list[torch.Tensor] = [t for index in self.selective.values() for t in index.tensors()]
        for factors in (self.key_factors, self.value_factors):
            if factors is not None:
                tensors += factors.tensors()
        for exact in (self.exact_keys, self.exact_values):
            if exact is not None:
                tensors += exact
        return tensors

    def pending_tensors(self) -> list[torch.Tensor]:
        """Prefill tensors held until the group is complete."""
        return list(self.pending_keys.values()) + list(self.pending_values.values())

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every held tensor (batch-dimension edits: beam reorder, select, repeat)."""
        if self.key_factors is not None:
            self.key_factors = self.key_factors.map(fn)
        if self.value_factors is not None:
            self.value_factors = self.value_factors.map(fn)
        for name in ("exact_keys", "exact_values"):
            exact = getattr(self, name)
            if exact is not None:
                setattr(self, name, [fn(t) for t in exact])
        for pending in (self.pending_keys, self.pending_values):
            for slot in pending:
                pending[slot] = fn(pending[slot])
        self.selective = {slot: index.map(fn) for slot, index in self.selective.items()}

    def crop(self, length: int) -> None:
        """Keep the first ``length`` prefix tokens (rows of the token basis; the reconstruction is unchanged)."""
        if length >= self.prefix_len:
            return
        if length <= 0:
            self._reset_state()
            return
        self.selective = {}  # its chunks described the whole prefix: decode falls back to "absorb"
        if self.key_factors is not None:
            self.key_factors = self.key_factors.crop(length)
        if self.value_factors is not None:
            self.value_factors = self.value_factors.crop(length)
        for name in ("exact_keys", "exact_values"):
            exact = getattr(self, name)
            if exact is not None:
                setattr(self, name, [t[:, :, :length].clone() for t in exact])
        self.prefix_len = length

    def reset(self) -> None:
        """Drop everything held."""
        self._reset_state()


def left_padding(
    inputs: UpdateInputs, angles: RotaryAngles | None, batch: int, tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Left padding per sequence of a first prefill, read from its RoPE positions; ``None`` if there is none.

    Each sequence must sit at positions ``0..n-1`` after its ``T - n`` padding tokens (what ``generate`` gives a
    left-padded batch); padding rows may carry any position. Positions come from ``position_ids`` (5.24) or are
    matched from the cos/sin the model applied (5.2); without either, ``0..T-1`` is assumed.

    Returns:
        ``(batch,)`` int64 padding counts, or ``None`` if every sequence starts at position 0 at index 0.

    Raises:
        ValueError: for positions of any other pattern (custom ``position_ids``, a shifted start).
    """
    index = torch.arange(tokens, device=device).unsqueeze(0)
    if inputs.position_ids is not None:
        positions = inputs.position_ids.to(device).expand(batch, tokens)
        pads = tokens - 1 - positions[:, -1]
        valid = bool(((pads >= 0) & (pads < tokens)).all())
        if valid:
            real = index >= pads.unsqueeze(1)
            valid = bool(torch.equal(positions[real], (index - pads.unsqueeze(1))[real]))
    elif inputs.cos is not None and inputs.sin is not None and angles is not None:
        cos, sin = angles(index)  # (1, T, rot)
        given_cos, given_sin = inputs.cos.float().to(device), inputs.sin.float().to(device)
        if given_cos.shape[-1] != cos.shape[-1] or given_cos.shape[-2] != tokens:
            valid, pads = False, torch.zeros(batch, dtype=torch.long, device=device)
        else:
            given_cos, given_sin = given_cos.expand(batch, -1, -1), given_sin.expand(batch, -1, -1)
            # the last token's angles name its position: the nearest row of the table (RoPE's slowest frequency
            # turns by far less than a full circle over T tokens, so rows are distinct)
            gap = (given_cos[:, -1:] - cos).square().sum(-1) + (given_sin[:, -1:] - sin).square().sum(-1)
            pads = tokens - 1 - gap.argmin(-1)
            rows = (index - pads.unsqueeze(1)).clamp(min=0)
            real = (index >= pads.unsqueeze(1)).unsqueeze(-1)
            tol = 1e-4 if inputs.cos.dtype in (torch.float32, torch.float64) else 2e-2
            valid = bool(
                ((given_cos - cos[0][rows]).abs().le(tol) | ~real).all()
                and ((given_sin - sin[0][rows]).abs().le(tol) | ~real).all()
            )
    else:
        return None
    if not valid:
        # Positions are known from position_ids; from cos/sin only their match against 0..T-1, which failed.
        seen = f" (the last of {tokens} at {int(positions[:, -1].max())})" if inputs.position_ids is not None else ""
        raise ValueError(
            "XKVCache needs each sequence of the first prefill at RoPE positions 0..n-1 after its left padding "
            f"(as generate() gives a left-padded batch); the model used other positions{seen}. Custom position_ids "
            "are not supported, and transformers 5.2's generate(prefill_chunk_size=...) "
            "gives a first chunk the positions of the prompt's last tokens: prefill the context in one call, in "
            "chunks with xkv.generation.chunked_prefill, or use generate's chunked prefill on transformers >= 5.24."
        )
    return pads.long() if bool(pads.any()) else None


def _kept_dense(config: XKVConfig, spec: ModelSpec) -> tuple[int, ...]:
    """Layers outside every group: ``config.dense_layers`` and the model's sliding-window layers."""
    return tuple(sorted(set(config.dense_layers) | set(spec.sliding_layers)))


def effective_config(config: XKVConfig, spec: ModelSpec) -> XKVConfig:
    """``config`` as a model of ``spec`` runs it: for MLA the values (the RoPE part ``k_pe``) are kept exact."""
    if spec.latent_attention and config.compress_values:
        # MLA: the cache's values are the rotated shared key part k_pe, which the paper keeps exact.
        logger.info("%s: factoring the MLA latent; its RoPE part (k_pe) is kept exact", spec.model_type)
        return dataclasses.replace(config, compress_values=False)
    return config


def groups_for(config: XKVConfig, spec: ModelSpec) -> list[LayerGroup]:
    """The layer groups ``config`` asks for on a model of ``spec`` (sliding-window layers never join one)."""
    return build_groups(
        spec.num_layers, config.group_size, config.grouping, config.first_layer, config.last_layer,
        _kept_dense(config, spec), config.groups,
    )  # fmt: skip


class XKVCache(GroupedCache):
    """KV-cache that keeps the context as cross-layer SVD factors (xKV, arXiv 2503.18893).

    Use it anywhere a transformers ``Cache`` goes: ``model.generate(ids, past_key_values=XKVCache(model))`` or a
    manual forward loop. Data type and device follow the model's activations.

    Args:
        model: the transformers causal LM whose cache this is (its geometry and RoPE module are read from it).
        config: compression settings; defaults to ``XKVConfig()``.

    Raises:
        NotImplementedError: for an architecture without an adapter (see :mod:`xkv.adapters`).
        ValueError: for a config that does not fit the model (layer range, rank larger than ``G * D``, per-group list
            of the wrong length); the message names the field.
    """

    def __init__(self, model: nn.Module, config: XKVConfig | None = None):
        self._model = weakref.ref(model)  # for the weights' fingerprint of a prefix file; never kept alive
        spec = describe_model(model)
        self.config = effective_config(config or XKVConfig(), spec)
        self.groups = groups_for(self.config, spec)
        check_groups_on_one_device(self.groups, layer_devices(model))
        self.angles = RotaryAngles(spec.rotary_emb, spec.rotary_layer_type) if spec.rotary_emb is not None else None
        # The fast paths need the query: they run through the "xkv" attention implementation (xkv.attention).
        fast = (
            self.config.decode != "rebuild"
            and spec.attention_softcap is None
            and not spec.latent_attention
            and attention.enable(model)
        )
        if self.config.decode != "rebuild" and spec.latent_attention:
            logger.info(
                "%s expands its latent into per-head keys and values after the cache, where the fast paths cannot "
                "see them: decoding with the lean rebuild of the latent", spec.model_type,
            )  # fmt: skip
        if self.config.decode != "rebuild" and spec.attention_softcap is not None:
            logger.info(
                "%s caps attention logits (attn_logit_softcapping=%s), which the fast paths do not: decoding with "
                "the lean rebuild", spec.model_type, spec.attention_softcap,
            )  # fmt: skip
        self.runtime = DecodeRuntime(fast, PrefixAngles(self.angles) if self.angles is not None else None)
        self._told_chunks = False  # `_note_chunks` warns once per cache
        self.xkv_stores = [
            XKVGroupStore(group, self.config, len(self.groups), spec, self.angles, self.runtime)
            for group in self.groups
        ]
        for store in self.xkv_stores:
            self._check_static_ranks(store, spec)
        super().__init__(spec, self.xkv_stores)

    @classmethod
    def from_dense(
        cls,
        model: nn.Module,
        keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]],
        config: XKVConfig | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> XKVCache:
        """Compress a finished dense cache, e.g. a ``DynamicCache`` after the context's forward pass.

        Gives the same factors as compressing during that forward pass (keys are un-rotated with the model's own
        RoPE at positions ``0..T-1``), so one prefill can serve several configurations.

        Args:
            model: the model that produced the cache.
            keys_values: per layer ``(keys, values)``, each ``(batch, kv_heads, tokens, head_dim)``, keys post-RoPE,
                e.g. ``[(layer.keys, layer.values) for layer in dynamic_cache.layers]``; not modified.
            config: compression settings.
            attention_mask: ``(batch, tokens)``, 0 on left padding, for a left-padded prefill.

        Raises:
            ValueError: if the number of layers does not match the model, or a rank does not fit.
        """
        return cls(model, config).prefill_from(keys_values, attention_mask)

    def _check_static_ranks(self, store: XKVGroupStore, spec: ModelSpec) -> None:
        # Integer ranks can be checked against G*D now; the token bound is checked at the first prefill.
        bound = spec.kv_dim * store.group.size
        for side, setting, wanted in (
            ("k", store.setting_k, self.config.compress_keys),
            ("v", store.setting_v, self.config.compress_values),
        ):
            if wanted and setting.kind == "rank" and setting.value > bound:
                raise ValueError(
                    f"`rank_{side}` for group {store.group.index} must be in [1, {bound}] "
                    f"(group_size * kv_heads * head_dim) but got {int(setting.value)}"
                )

    def begin_prefill(self, key_states: torch.Tensor, inputs: UpdateInputs, layer_idx: int = 0) -> None:
        """Check ranks and RoPE positions before anything is stored (nothing is half-written on error).

        Raises:
            UnreachableRatioError: (a ``ValueError``) if a rank does not fit the number of tokens.
            ValueError: if a sequence's RoPE positions are not ``0..n-1`` after its left padding (custom
                ``position_ids`` are not supported).
        """
        batch, _, tokens, _ = key_states.shape
        exact = tokens < self.config.min_tokens
        if exact and self.config.fold_tokens:
            logger.warning(
                "first prefill of %d tokens < min_tokens=%d: kept exact, and later chunks are never folded into "
                "factors (feed a first chunk of at least min_tokens to compress a chunked prefill)",
                tokens, self.config.min_tokens,
            )  # fmt: skip
        elif exact:
            logger.info("prefill of %d tokens < min_tokens=%d: kept exact", tokens, self.config.min_tokens)
        angles = self.angles
        if angles is not None and self.spec.rotary_layer_type and layer_idx in self.spec.sliding_layers:
            angles = RotaryAngles(angles.rotary_emb, "sliding_attention")  # that layer's own RoPE base (Gemma 3)
        # Before the ranks: a padded batch holds no Selective Reconstruction index.
        self.runtime.pads = left_padding(inputs, angles, batch, tokens, key_states.device)
        for store in self.xkv_stores:
            store.exact_prefill = exact
            store.plan_index(tokens, key_states.dtype)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_batch(fn)
        if self.runtime.pads is not None:
            pads = fn(self.runtime.pads)
            self.runtime.pads = pads if bool(pads.any()) else None  # e.g. only an unpadded sequence was kept

    def before_update(self, layer_idx: int, tokens: int) -> None:
        """Fold a group's tails into its factors once they reach ``config.fold_tokens`` (checked at its first layer).

        Every layer of the group then holds the same tail (the group's layers took the same tokens), so the fold
        happens before the group's first layer stores the new tokens, and all its layers see the folded prefix.
        A context that arrives in chunks while the cache is kept exact is reported once (:meth:`_note_chunks`).
        """
        if tokens > 1 and not self._told_chunks:
            self._note_chunks(layer_idx, tokens)
        layer = self.layers[layer_idx]
        if not self.config.fold_tokens or not isinstance(layer, CompressedLayer) or layer.slot != 0:
            return
        if isinstance(layer.store, XKVGroupStore):
            self._fold_group(layer.store, self.config.fold_keep, self.config.fold_tokens, self.config.fold_headroom)

    def _note_chunks(self, layer_idx: int, tokens: int) -> None:
        """Warn once if a context fed in chunks has outgrown ``min_tokens`` while every group is kept exact.

        ``generate(..., prefill_chunk_size=N)`` (transformers >= 5.24) or a forward loop over a long context hands
        the cache its first chunk alone; if that chunk is under ``min_tokens`` the groups are kept exact and the
        later chunks are never factored, so the cache ends larger than a dense one without compressing anything.
        """
        stores = self.xkv_stores
        if not stores or not all(store.exact_prefill for store in stores):
            return
        total = self.layers[layer_idx].get_seq_length() + tokens
        if total < self.config.min_tokens:
            return
        self._told_chunks = True
        first = stores[0].prefix_len
        logger.warning(
            "XKVCache: this context arrives in chunks and is kept exact, uncompressed: its first chunk had %d tokens "
            "< min_tokens=%d, and later chunks are never factored (now %d tokens). To compress a chunked prefill, "
            "make the first chunk at least min_tokens (generate(prefill_chunk_size=%d) or more, or a lower "
            "min_tokens) and set XKVConfig(fold_tokens=<chunk size>) so each later chunk is folded into the factors "
            "as it arrives; or prefill the context in one call.",
            first, self.config.min_tokens, total, self.config.min_tokens,
        )  # fmt: skip

    def fold(self, keep: int | None = None) -> int:
        """Fold every factored group's exact tail into its factors now, keeping the newest ``keep`` tokens exact.

        For example after a context fed in chunks (the last chunk is still exact), or before saving a long
        conversation. Works whatever ``fold_tokens`` is; groups kept exact (a first prefill under ``min_tokens``)
        and dense layers are left as they are. The decode scratch sized for the old prefix (RoPE table, rebuild
        workspace) is freed; the next step builds it at the new length.

        Folds here go straight to the target ranks, and factors that automatic folds left above them
        (``fold_headroom``) are trimmed to them.

        Args:
            keep: tail tokens left exact per layer; defaults to ``config.fold_keep``.

        Returns:
            Tokens folded per layer (0 when every tail already had at most ``keep`` tokens).

        Raises:
            ValueError: for ``keep < 0``.
        """
        keep = self.config.fold_keep if keep is None else keep
        if keep < 0:
            raise ValueError(f"`keep` must be >= 0 but got {keep}")
        folded = max((self._fold_group(store, keep, keep + 1, False) for store in self.xkv_stores), default=0)
        trimmed = [store.trim() for store in self.xkv_stores]
        if folded or any(trimmed):  # sized for the old prefix or ranks: rebuilt at the next step
            self.runtime.workspace.reset()
            if self.runtime.table is not None:
                self.runtime.table.reset()
        return folded

    def _fold_group(self, store: XKVGroupStore, keep: int, at_least: int, headroom: bool) -> int:
        """Fold all but ``keep`` tail tokens of ``store``'s layers once they hold ``at_least``; tokens folded."""
        if not store.is_ready or store.exact_prefill:
            return 0
        members = [self.layers[i] for i in store.layers]
        if not all(isinstance(m, CompressedLayer) and _states(m) is not None for m in members):
            return 0
        tails = [m.tail() for m in members if isinstance(m, CompressedLayer)]
        lengths = {keys.shape[-2] for keys, _ in tails}
        if len(lengths) != 1 or (length := lengths.pop()) < at_least or length <= keep:
            return 0
        store.fold(tails, length - keep, headroom)
        for member in members:
            if isinstance(member, CompressedLayer):
                member.drop_oldest(length - keep)
        return length - keep

    def with_ranks(self, config: XKVConfig) -> XKVCache:
        """A copy of this factored cache at lower ranks, without another SVD.

        Keeps the first ``r`` directions of every group's factors (ranks resolved from ``config`` at the prefix
        length) and copies the exact tails and dense layers. With exact SVD factors (e.g. this cache at full rank,
        ``rank_k=1.0, rank_v=1.0``) the copy equals compressing the same prefill with ``config`` (tested).

        Raises:
            ValueError: if ``config`` groups the layers differently or asks for more rank than is held.
        """
        config = effective_config(config, self.spec)
        groups = groups_for(config, self.spec)
        if [g.layers for g in groups] != [g.layers for g in self.groups]:
            raise ValueError("`config` groups the layers differently from this cache; with_ranks only lowers ranks")
        new = copy.copy(self)
        new.config = config
        # Its own tables and workspace: what a copy holds is counted for that copy alone.
        new.runtime = DecodeRuntime(
            self.runtime.fast, PrefixAngles(self.angles) if self.angles is not None else None, pads=self.runtime.pads
        )
        if new.runtime.table is not None and self.runtime.table is not None:  # shared: never written in place
            new.runtime.table.joint = self.runtime.table.joint
            new.runtime.table.halves_equal = self.runtime.table.halves_equal
        new.xkv_stores = [store.truncated(config, len(groups), new.runtime) for store in self.xkv_stores]
        new.stores = list(new.xkv_stores)
        store_of = {layer_idx: store for store in new.xkv_stores for layer_idx in store.layers}
        layers: list[CacheLayerMixin] = []
        for layer_idx, layer in enumerate(self.layers):
            states = _states(layer)
            if isinstance(layer, CompressedLayer):
                compressed = CompressedLayer(store_of[layer_idx], layer.slot)
                compressed.cumulative_length = layer.cumulative_length
                if states is not None:
                    compressed.lazy_initialization(*states)
                    compressed.keys, compressed.values = states[0].clone(), states[1].clone()
                layers.append(compressed)
            elif states is not None:
                layers.append(
                    self._filled_dense_layer(layer_idx, states[0].clone(), states[1].clone(), layer.get_seq_length())
                )
            else:
                layers.append(self._dense_layer(layer_idx))
        new.layers = layers
        return new

    # ------------------------------------------------------------------ prefix files
    def save(
        self,
        path: str | Any,
        prompt_ids: torch.Tensor | None = None,
        tokenizer: Any = None,
        model_name: str | None = None,
    ) -> int:
        """Write this cache to a prefix file (:mod:`xkv.prefix`): every tensor held plus metadata, atomically.

        Args:
            path: the file to write (conventionally ``*.xkv``).
            prompt_ids: ``(batch, tokens)`` ids the cache holds, so :meth:`load` can check them (hashed, not stored).
            tokenizer: the tokenizer that made them (its vocabulary is fingerprinted).
            model_name: how to load the model again (e.g. ``"smollm2-135m"``), recorded for ``xkv ask``.

        Returns:
            Bytes written.

        Raises:
            RuntimeError: before the prefill has finished, or if the model the cache was built for is gone.
            ValueError: for a cache holding a left-padded batch.
            OSError: (``IsADirectoryError``, ``PermissionError``, ...) if ``path`` cannot be written; the message
                names ``path``, and nothing is left behind.
        """
        model = self._model()
        if model is None:
            raise RuntimeError("save() needs the model this cache was built for, which no longer exists")
        if not all(store.is_ready for store in self.xkv_stores) or any(s.pending_keys for s in self.xkv_stores):
            raise RuntimeError("save() needs a finished prefill (every group factored)")
        if self.runtime.pads is not None:
            raise ValueError("save() writes unpadded prefixes; this cache holds a left-padded batch")
        tensors: dict[str, torch.Tensor] = {}
        stores = []
        for i, store in enumerate(self.xkv_stores):
            entry: dict[str, Any] = {
                "layers": list(store.layers), "prefix_len": store.prefix_len,
                "rank_k": store.rank_k, "rank_v": store.rank_v,
                "exact_prefill": store.exact_prefill, "dtype": str(store.dtype).removeprefix("torch."),
                "selective": {str(slot): index.chunk_size for slot, index in store.selective.items()},
            }  # fmt: skip
            for side, factors, exact in (
                ("k", store.key_factors, store.exact_keys), ("v", store.value_factors, store.exact_values)
            ):  # fmt: skip
                if factors is not None:
                    named, entry[side] = factors.state()
                    tensors.update({f"group{i}.{side}.{name}": t for name, t in named.items()})
                else:
                    assert exact is not None
                    entry[side] = {"form": "exact"}
                    tensors.update({f"group{i}.{side}.exact{slot}": t for slot, t in enumerate(exact)})
            for slot, index in store.selective.items():
                names = ("landmarks", "landmark_scales", "exact_chunks", "exact_keys", "exact_values")
                tensors.update({f"group{i}.sr{slot}.{n}": t for n, t in zip(names, index.tensors(), strict=True)})
            stores.append(entry)
        layers = []
        for layer_idx, layer in enumerate(self.layers):
            states = _states(layer)
            layers.append({"compressed": isinstance(layer, CompressedLayer), "length": layer.get_seq_length()})
            if states is not None:
                tensors[f"layer{layer_idx}.keys"], tensors[f"layer{layer_idx}.values"] = states
        meta = {
            "model_name": model_name,
            "model_type": getattr(model.config, "model_type", None),
            "num_layers": self.spec.num_layers,
            "weights": prefix.weights_fingerprint(model),
            "tokenizer": prefix.tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            "prompt": prefix.ids_fingerprint(prompt_ids) if prompt_ids is not None else None,
            "tokens": self.get_seq_length(),
            "config": self.config.to_dict(),
            "stores": stores,
            "layers": layers,
        }
        return prefix.write(path, tensors, meta)

    @classmethod
    def load(
        cls, path: str | Any, model: nn.Module, prompt_ids: torch.Tensor | None = None, tokenizer: Any = None
    ) -> XKVCache:
        """Read a prefix file written by :meth:`save` into a new cache for ``model``.

        Everything is checked before the cache is built: the file (ours, this format version, intact: its digests),
        the model (type, layers, weights' fingerprint), when given the tokenizer's vocabulary and the prompt's ids,
        and the metadata against the tensors and the config (:func:`xkv.prefix.check_layout`). Tensors go to the
        model's device.

        Raises:
            FileNotFoundError: if there is no such file.
            xkv.prefix.PrefixFileError: (a ``ValueError``) naming the mismatch or damage.
        """
        tensors, meta = prefix.read(path)
        where = f"prefix file {str(path)!r}"
        model_type = getattr(model.config, "model_type", None)
        if meta.get("model_type") != model_type or meta.get("num_layers") != describe_model(model).num_layers:
            raise prefix.PrefixFileError(
                f"{where} was written for a {meta.get('model_type')} model with {meta.get('num_layers')} layers, "
                f"not this {model_type} model"
            )
        if meta.get("weights") != prefix.weights_fingerprint(model):
            raise prefix.PrefixFileError(f"{where} was written with other weights (a different checkpoint)")
        if tokenizer is not None and meta.get("tokenizer") not in (None, prefix.tokenizer_fingerprint(tokenizer)):
            raise prefix.PrefixFileError(f"{where} was written with a different tokenizer (another vocabulary)")
        if prompt_ids is not None and meta.get("prompt") not in (None, prefix.ids_fingerprint(prompt_ids)):
            raise prefix.PrefixFileError(f"{where} holds another prompt than the token ids given")
        spec = describe_model(model)
        try:
            config = XKVConfig.from_dict(meta.get("config"))  # type: ignore[arg-type]  # a non-mapping is refused
            groups = groups_for(effective_config(config, spec), spec)
        except (TypeError, ValueError) as err:
            raise prefix.PrefixFileError(f"{where} is inconsistent: `config` does not fit this model: {err}") from err
        prefix.check_layout(where, meta, tensors, spec, effective_config(config, spec), groups)
        try:
            return cls._from_prefix(model, tensors, meta, config)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, prefix.PrefixFileError):
                raise
            raise prefix.PrefixFileError(f"{where} is damaged: {err!r}") from err

    @classmethod
    def _from_prefix(
        cls, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], config: XKVConfig
    ) -> XKVCache:
        """A cache for ``model`` from a prefix file's tensors and metadata, checked by :func:`prefix.check_layout`."""
        cache = cls(model, config)
        device = next(model.parameters()).device
        stored = {name: t.to(device) for name, t in tensors.items()}
        if len(meta["stores"]) != len(cache.xkv_stores) or len(meta["layers"]) != len(cache.layers):
            raise ValueError("the groups or layers in the file do not match its config")
        for i, (store, entry) in enumerate(zip(cache.xkv_stores, meta["stores"], strict=True)):
            store.prefix_len, store.rank_k, store.rank_v = entry["prefix_len"], entry["rank_k"], entry["rank_v"]
            store.exact_prefill, store.dtype = entry["exact_prefill"], dtype_named(entry["dtype"])
            for side in ("k", "v"):
                head = f"group{i}.{side}."
                if entry[side]["form"] == "exact":
                    exact = [stored[f"{head}exact{slot}"] for slot in range(store.group.size)]
                    if side == "k":
                        store.exact_keys = exact
                    else:
                        store.exact_values = exact
                    continue
                named = {name[len(head) :]: t for name, t in stored.items() if name.startswith(head)}
                if side == "k":
                    store.key_factors = from_state(named, entry[side])
                else:
                    store.value_factors = from_state(named, entry[side])
            for slot, chunk in entry["selective"].items():
                fields_ = ("landmarks", "landmark_scales", "exact_chunks", "exact_keys", "exact_values")
                parts = [stored[f"group{i}.sr{slot}.{n}"] for n in fields_]
                store.selective[int(slot)] = SelectiveIndex(int(chunk), *parts)
        for layer_idx, (layer, entry) in enumerate(zip(cache.layers, meta["layers"], strict=True)):
            if entry["compressed"] != isinstance(layer, CompressedLayer):
                raise ValueError(f"layer {layer_idx} is stored as {'compressed' if entry['compressed'] else 'dense'}")
            if f"layer{layer_idx}.keys" not in stored:
                continue
            keys, values = stored[f"layer{layer_idx}.keys"], stored[f"layer{layer_idx}.values"]
            if isinstance(layer, CompressedLayer):
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
                layer.cumulative_length = int(entry["length"])
            else:
                cache.layers[layer_idx] = cache._filled_dense_layer(layer_idx, keys, values, int(entry["length"]))
        return cache

    def _decode_bytes(self) -> tuple[int, int]:
        table = self.runtime.table.tensors() if self.runtime.table is not None else []
        table += self.runtime.padded_tensors()
        return tensor_bytes(table), tensor_bytes(self.runtime.workspace.tensors())

    def reset(self) -> None:
        """Drop every stored token, the decode tables and workspaces; the cache can be reused for a new prompt."""
        super().reset()
        self._told_chunks = False
        attention.discard()
        self.runtime.pads = None
        self.runtime._padded = None
        if self.runtime.table is not None:
            self.runtime.table.reset()
        self.runtime.workspace.reset()

    @property
    def group_stores(self) -> list[XKVGroupStore]:
        """Per group: the token factor, the per-layer reconstruction matrices and the prefix length.

        Exposed for fast decode and analysis, which work on the factors rather than on rebuilt tensors.
        """
        return self.xkv_stores

    def full_ranks(self) -> list[int]:
        """Full rank ``min(T, G * D)`` of each factored group at its current prefix length."""
        return [full_rank(s.prefix_len, s.group.size, self.spec.kv_dim) for s in self.xkv_stores]
