"""``XKVCache``: a transformers ``Cache`` that stores the cross-layer SVD factors of the context (xKV).

Modules, in the order data flows (each imports only earlier ones, ``tests/test_layering.py``):

* :mod:`~xkv.cache.base`: the transformers ``Cache``/layer contract for layers compressed together
  (:class:`CompressedStore`, :class:`CompressedLayer`, :class:`GroupedCache`); it knows nothing of SVD.
* :mod:`~xkv.cache.runtime`: what a cache's groups share at decode (left padding, RoPE tables, workspace).
* :mod:`~xkv.cache.side`: one side of a group (keys or values): :class:`~xkv.cache.side.StoredSide` (factors) or
  :class:`~xkv.cache.side.ExactSide`, with prefill, factor, fold, trim, truncate, crop, map, rebuild and state;
  keys carry their RoPE (:class:`~xkv.cache.side.RopeRotation`).
* :mod:`~xkv.cache.ranks`: a group's rank budget (settings to ranks, Selective Reconstruction's index paid for).
* :mod:`~xkv.cache.decoding`: a group's decode paths (rebuild, absorb, selective) and their fallbacks.
* :mod:`~xkv.cache.store`: :class:`XKVGroupStore`, one layer group: two sides, the SR index, the prefix length,
  and its state for prefix files (``state()``/``load_state()``).
* :mod:`~xkv.cache.io`: prefix files (save and load, through the stores' state).
* :mod:`~xkv.cache.xkv`: :class:`XKVCache`, construction, first-prefill checks, fold, ``with_ranks``.

Life of a compressed layer group (G layers): at the prefill (each layer's first ``update``) the keys are un-rotated to
pre-RoPE and held with the values until the group's last layer has run, and the exact states are returned (the prefill
attention is exact, as in the paper); then each side is factored (:func:`xkv.factorization.cross_layer_svd`) and the
dense tensors dropped. Later updates go to an exact tail per layer; attention gets the prefix through the configured
decode path (``"absorb"`` by default; ``"rebuild"`` rebuilds the prefix, RoPE re-applied, as a transient). With
``fold_tokens`` set, a group's tails are folded back into its factors (incremental SVD).
"""

from xkv.cache.base import (
    CompressedLayer,
    CompressedStore,
    GroupedCache,
    NonFiniteStatesError,
    XKVLayer,
    check_finite,
)
from xkv.cache.runtime import FAST_PATH_MAX_QUERIES, DecodeRuntime, SelectiveCounts, Workspace
from xkv.cache.store import XKVGroupStore, effective_config, groups_for
from xkv.cache.xkv import XKVCache

__all__ = [
    "FAST_PATH_MAX_QUERIES",
    "CompressedLayer",
    "CompressedStore",
    "DecodeRuntime",
    "GroupedCache",
    "NonFiniteStatesError",
    "SelectiveCounts",
    "Workspace",
    "XKVCache",
    "XKVGroupStore",
    "XKVLayer",
    "check_finite",
    "effective_config",
    "groups_for",
]
