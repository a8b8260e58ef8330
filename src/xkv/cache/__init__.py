"""``XKVCache``: a transformers ``Cache`` that stores the cross-layer SVD factors of the context (xKV).

Modules, in the order data flows (each imports only earlier ones, ``tests/test_layering.py``):

* :mod:`~xkv.cache.base`: the transformers ``Cache``/layer contract for layers compressed together
  (:class:`CompressedStore`, :class:`CompressedLayer`, :class:`GroupedCache`); it knows nothing of SVD.
* :mod:`~xkv.cache.runtime`: what a cache's groups share at decode (left padding, RoPE tables, workspace).
* :mod:`~xkv.cache.store`: :class:`XKVGroupStore`, one layer group's pending prefill, factors and decode glue.
* :mod:`~xkv.cache.io`: prefix files (save and load).
* :mod:`~xkv.cache.xkv`: :class:`XKVCache`, construction, first-prefill checks, fold, ``with_ranks``.
"""

from xkv.cache.base import (
    CompressedLayer,
    CompressedStore,
    GroupedCache,
    NonFiniteStatesError,
    XKVLayer,
    check_finite,
)
from xkv.cache.runtime import FAST_PATH_MAX_QUERIES, DecodeRuntime, Workspace, left_padding
from xkv.cache.store import XKVGroupStore, effective_config, groups_for
from xkv.cache.xkv import XKVCache

__all__ = [
    "FAST_PATH_MAX_QUERIES",
    "CompressedLayer",
    "CompressedStore",
    "DecodeRuntime",
    "GroupedCache",
    "NonFiniteStatesError",
    "Workspace",
    "XKVCache",
    "XKVGroupStore",
    "XKVLayer",
    "check_finite",
    "effective_config",
    "groups_for",
    "left_padding",
]
