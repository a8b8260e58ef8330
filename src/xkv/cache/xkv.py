"""``XKVCache``: a transformers ``Cache`` that stores the cross-layer SVD factors of the context (xKV).

Life of a compressed layer group (G layers):

* **Prefill** (the first ``update`` of each layer): the layer's keys are un-rotated to pre-RoPE and held with its
  values until the last layer of the group has run; the exact states are returned, so the prefill attention itself is
  exact (as in the paper). Then the group is factored (:func:`xkv.factorization.cross_layer_svd`) and the dense
  tensors are dropped: with contiguous groups at most one group is dense at a time.
* **Decode / later turns** (every later ``update``): new tokens go to an exact tail per layer. Attention reads the
  prefix through ``config.decode``'s path (:mod:`xkv.cache.decoding`): ``rebuild`` gives it the prefix rebuilt from
  the factors (RoPE re-applied) followed by the tail, in a workspace reused across layers; ``absorb`` (the default) and
  ``selective`` read the factors inside the ``"xkv"`` attention implementation (:mod:`xkv.attention`).
  Nothing rebuilt is kept between calls. With ``fold_tokens`` set, a group's tails are folded back into its factors
  once they reach that length (incremental SVD), so a long generation or a context fed in chunks keeps a bounded tail.

Layers outside ``[first_layer, last_layer]`` use transformers' ``DynamicLayer``.

The container (:class:`GroupedCache`) and the per-layer view (:class:`CompressedLayer`) know nothing of SVD: they
drive any :class:`CompressedStore`, so cross-layer baselines (``xkv.baselines.minicache``) reuse them.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from xkv import attention
from xkv.adapters import describe_model, layer_devices
from xkv.budget import full_rank
from xkv.cache import io
from xkv.cache.base import CompressedLayer, GroupedCache, held_states
from xkv.cache.runtime import DecodeRuntime, SelectiveCounts
from xkv.cache.store import XKVGroupStore, effective_config, groups_for
from xkv.compat import UpdateInputs
from xkv.config import XKVConfig
from xkv.groups import check_groups_on_one_device
from xkv.memory import tensor_bytes
from xkv.positions import PrefixAngles, RotaryAngles, left_padding

logger = logging.getLogger(__name__)


class XKVCache(GroupedCache):
    """KV-cache that keeps the context as cross-layer SVD factors (xKV, arXiv 2503.18893).

    Use it anywhere a transformers ``Cache`` goes: ``model.generate(ids, past_key_values=XKVCache(model))`` or a
    manual forward loop. Data type and device follow the model's activations.

    What building one does to the model: with a fast decode path (``decode: absorb`` or ``selective``) on an SDPA
    model, the model's attention implementation is switched to ``"xkv"`` (:mod:`xkv.attention`), which computes what
    SDPA computes for every call but this cache's decode steps. :meth:`detach_from` (or leaving a
    ``with XKVCache(model) as cache:`` block) switches it back once no other live cache needs it; the cache then
    decodes with the rebuild path.

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
            and attention.enable(model, self)
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
        self._told_chunks = False  # `warn_if_chunks_stay_exact` warns once per cache
        stores = [
            XKVGroupStore(group, self.config, len(self.groups), spec, self.angles, self.runtime)
            for group in self.groups
        ]
        for store in stores:
            store.check_static_ranks()
        super().__init__(spec, stores)

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
        for store in self.group_stores:
            store.begin_prefill(exact, tokens, key_states.dtype)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_batch(fn)
        if self.runtime.pads is not None:
            pads = fn(self.runtime.pads)
            self.runtime.pads = pads if bool(pads.any()) else None  # e.g. only an unpadded sequence was kept

    def before_update(self, layer_idx: int, tokens: int) -> None:
        """Fold a group's tails into its factors once they reach ``config.fold_tokens`` (checked at its first layer).

        Every layer of the group then holds the same tail (the group's layers took the same tokens), so the fold
        happens before the group's first layer stores the new tokens, and all its layers see the folded prefix.
        A context that arrives in chunks while the cache is kept exact is reported once
        (:func:`warn_if_chunks_stay_exact`).
        """
        if tokens > 1 and not self._told_chunks:
            held = self.layers[layer_idx].get_seq_length()
            self._told_chunks = warn_if_chunks_stay_exact(self.group_stores, held, tokens, self.config.min_tokens)
        layer = self.layers[layer_idx]
        if not self.config.fold_tokens or not isinstance(layer, CompressedLayer) or layer.slot != 0:
            return
        if isinstance(layer.store, XKVGroupStore):
            fold_group(
                self.layers, layer.store, self.config.fold_keep, self.config.fold_tokens, self.config.fold_headroom
            )

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
        folded = max((fold_group(self.layers, store, keep, keep + 1, False) for store in self.group_stores), default=0)
        trimmed = [store.trim() for store in self.group_stores]
        if folded or any(trimmed):  # sized for the old prefix or ranks: rebuilt at the next step
            self.runtime.workspace.reset()
            if self.runtime.table is not None:
                self.runtime.table.reset()
        return folded

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
        # Its own tables and workspace: what a copy holds is counted for that copy alone. It holds the model's "xkv"
        # attention in its own right, so detaching the original leaves the copy's fast path in place.
        model = self._model()
        fast = self.runtime.fast and model is not None and attention.enable(model, new)
        new.runtime = DecodeRuntime(
            fast, PrefixAngles(self.angles) if self.angles is not None else None, pads=self.runtime.pads
        )
        if new.runtime.table is not None and self.runtime.table is not None:  # shared: never written in place
            new.runtime.table.joint = self.runtime.table.joint
            new.runtime.table.halves_equal = self.runtime.table.halves_equal
        new.stores = [store.truncated(config, len(groups), new.runtime) for store in self.group_stores]
        store_of = {layer_idx: store for store in new.group_stores for layer_idx in store.layers}
        layers: list[CacheLayerMixin] = []
        for layer_idx, layer in enumerate(self.layers):
            states = held_states(layer)
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

    def detach_from(self, model: nn.Module) -> None:
        """Give ``model`` back its earlier attention implementation; this cache decodes with the rebuild path after.

        The model is switched back once no other live cache needs ``"xkv"``. The rebuild path computes the same
        attention as the fast paths, without their query-side shortcuts.

        Raises:
            ValueError: if ``model`` is not the model this cache was built for.
        """
        if self._model() is not model:
            raise ValueError("`model` is not the model this cache was built for")
        attention.restore(model, self)
        self.runtime.fast = False

    def __enter__(self) -> XKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        model = self._model()
        if model is not None:
            self.detach_from(model)

    # ------------------------------------------------------------------ prefix files
    def save(
        self,
        path: str | Any,
        prompt_ids: torch.Tensor | None = None,
        tokenizer: Any = None,
        model_name: str | None = None,
    ) -> int:
        """Write this cache to a prefix file (:mod:`xkv.prefix`): every tensor held plus metadata, atomically.

        See :func:`xkv.cache.io.save` for the arguments and errors.

        Returns:
            Bytes written.
        """
        return io.save(self, path, prompt_ids, tokenizer, model_name)

    @classmethod
    def load(
        cls, path: str | Any, model: nn.Module, prompt_ids: torch.Tensor | None = None, tokenizer: Any = None
    ) -> XKVCache:
        """Read a prefix file written by :meth:`save` into a new cache for ``model`` (:func:`xkv.cache.io.load`).

        Raises:
            FileNotFoundError: if there is no such file.
            xkv.prefix.PrefixFileError: (a ``ValueError``) naming the mismatch or damage.
        """
        return io.load(cls, path, model, prompt_ids, tokenizer)

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
        self.runtime.counts = SelectiveCounts()

    @property
    def selective_counts(self) -> SelectiveCounts:
        """Layer steps the selective decode path served since the prefill, and how many widened their budget."""
        return self.runtime.counts

    @property
    def group_stores(self) -> list[XKVGroupStore]:
        """Per group: the token factor, the per-layer reconstruction matrices and the prefix length.

        Exposed for fast decode and analysis, which work on the factors rather than on rebuilt tensors.
        """
        return cast("list[XKVGroupStore]", self.stores)  # built in __init__ and with_ranks

    def full_ranks(self) -> list[int]:
        """Full rank ``min(T, G * D)`` of each factored group at its current prefix length."""
        return [full_rank(s.prefix_len, s.group.size, self.spec.kv_dim) for s in self.group_stores]


def fold_group(layers: list[CacheLayerMixin], store: XKVGroupStore, keep: int, at_least: int, headroom: bool) -> int:
    """Fold all but ``keep`` tail tokens of ``store``'s layers (of the cache's ``layers``) once they hold ``at_least``.

    Returns the tokens folded per layer (0 when the group is not factored or its tails are too short).
    """
    if not store.is_ready or store.exact_prefill:
        return 0
    members = [layers[i] for i in store.layers]
    if not all(isinstance(m, CompressedLayer) and held_states(m) is not None for m in members):
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


def warn_if_chunks_stay_exact(stores: list[XKVGroupStore], held: int, tokens: int, min_tokens: int) -> bool:
    """Warn (and return True) if a context fed in chunks has outgrown ``min_tokens`` while every group is kept exact.

    ``generate(..., prefill_chunk_size=N)`` (transformers >= 5.24) or a forward loop over a long context hands
    the cache its first chunk alone; if that chunk is under ``min_tokens`` the groups are kept exact and the
    later chunks are never factored, so the cache ends larger than a dense one without compressing anything.
    """
    if not stores or not all(store.exact_prefill for store in stores):
        return False
    total = held + tokens
    if total < min_tokens:
        return False
    first = stores[0].prefix_len
    logger.warning(
        "XKVCache: this context arrives in chunks and is kept exact, uncompressed: its first chunk had %d tokens "
        "< min_tokens=%d, and later chunks are never factored (now %d tokens). To compress a chunked prefill, "
        "make the first chunk at least min_tokens (generate(prefill_chunk_size=%d) or more, or a lower "
        "min_tokens) and set XKVConfig(fold_tokens=<chunk size>) so each later chunk is folded into the factors "
        "as it arrives; or prefill the context in one call.",
        first, min_tokens, total, min_tokens,
    )  # fmt: skip
    return True
