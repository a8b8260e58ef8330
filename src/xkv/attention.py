"""The ``"xkv"`` attention implementation: how the fast decode paths see the query, through public extension points.

``Cache.update`` never sees the query, but Selective Reconstruction scores it against the landmarks and value
absorption multiplies the attention weights into the factors. So a compressed layer in a fast decode mode returns
only its exact tail from ``update`` and leaves a :class:`PendingAttention` for the attention function, which
transformers calls right after ``update`` in the same layer. That function is registered with transformers'
``AttentionInterface`` (and its mask with ``AttentionMaskInterface``) under the name ``"xkv"``; every call that
carries no pending request (prefills, dense layers, other caches) goes to transformers' own SDPA function, so a model
set to ``"xkv"`` computes exactly what it computes with ``"sdpa"`` everywhere else.

Nothing is registered at import: :func:`enable` registers (once) and switches one model with
``model.set_attn_implementation`` (a public API); :func:`restore` switches it back once the last cache that asked for
it lets go (``XKVCache.detach_from``, or leaving a ``with XKVCache(...)`` block). No function of transformers is
patched.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Name of the attention implementation registered by :func:`enable`.
IMPLEMENTATION = "xkv"
#: Implementations a model may have before :func:`enable`: ``"xkv"`` falls back to SDPA, so only an SDPA model is
#: switched (an eager model would lose ``output_attentions``; it keeps the rebuild path).
REPLACEABLE = ("sdpa", IMPLEMENTATION)


@dataclass
class PendingAttention:
    """Left by a compressed layer's ``update`` for the attention call that follows it.

    Attributes:
        layer_idx: the model layer.
        keys: the tensor ``update`` returned as keys (the attention call must receive this very tensor).
        attend: ``(query (b, Hq, q, hd), attention_mask, scaling) -> (b, q, Hq, hd)``.
        owner: the cache (or its shared decode state) that left the request.
    """

    layer_idx: int
    keys: torch.Tensor
    attend: Callable[[torch.Tensor, torch.Tensor | None, float], torch.Tensor]
    owner: object = None


_local = threading.local()


def check_stale(owner: object) -> None:
    """Call before a cache changes any state for a new token: fail if its own last request was never taken.

    A request left by another cache (e.g. one whose forward pass raised) is dropped with a warning.

    Raises:
        RuntimeError: if ``owner``'s request of an earlier layer was never taken: the model did not run attention
            through ``"xkv"`` (its implementation was changed after the cache was built), so that layer saw only
            the exact tail. Nothing of the new token has been stored yet.
    """
    stale = getattr(_local, "pending", None)
    if stale is None:
        return
    _local.pending = None
    if stale.owner is not owner:
        logger.warning("dropped a fast-decode request of layer %d that another cache left untaken", stale.layer_idx)
        return
    raise RuntimeError(
        f"layer {stale.layer_idx}'s attention did not run through the {IMPLEMENTATION!r} implementation, so it "
        "saw only the exact tail of an XKVCache in a fast decode mode; keep "
        f"model.set_attn_implementation({IMPLEMENTATION!r}) or use XKVConfig(decode='rebuild')"
    )


def leave(request: PendingAttention) -> None:
    """Hand ``request`` to the next attention call of this thread (after :func:`check_stale`)."""
    check_stale(request.owner)
    _local.pending = request


def discard() -> None:
    """Drop a request nobody took (e.g. after an exception inside the layer)."""
    _local.pending = None


def xkv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function: the pending fast path if one is waiting for this layer, else SDPA.

    Args:
        module: the attention module (its ``layer_idx`` matches the request).
        query: ``(b, Hq, q, hd)``.
        key: ``(b, H, kv, hd)`` as ``Cache.update`` returned it.
        value: like ``key``.
        attention_mask: the model's mask for this layer, or ``None``.
        dropout: must be 0 on a fast path (inference only).
        scaling: score scale; ``1/sqrt(hd)`` if ``None``.
        **kwargs: passed to SDPA on the fallback (arguments in SDPA's order).

    Returns:
        ``(b, q, Hq, hd)`` and no attention weights.
    """
    request = getattr(_local, "pending", None)
    if request is not None and request.keys is key and request.layer_idx == getattr(module, "layer_idx", None):
        _local.pending = None
        if dropout:
            raise ValueError("XKVCache's fast decode paths are for inference: attention dropout must be 0")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return request.attend(query, attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


#: Per model switched by :func:`enable`: the implementation it had before, and the holders that still need "xkv".
_SWITCHED: weakref.WeakKeyDictionary[nn.Module, tuple[str, weakref.WeakSet[Any]]] = weakref.WeakKeyDictionary()


def enable(model: nn.Module, holder: Any = None) -> bool:
    """Register ``"xkv"`` (once) and switch ``model`` to it, on behalf of ``holder`` (e.g. a cache).

    Args:
        model: the model whose attention the fast decode paths run through.
        holder: the object that needs ``"xkv"`` until it calls :func:`restore` (kept by weak reference).

    Returns:
        ``True`` if the model now runs attention through ``"xkv"``; ``False`` (with a log line saying why) if its
        implementation is one ``"xkv"`` cannot stand in for (e.g. FlashAttention), so the caller keeps the rebuild
        path.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in REPLACEABLE:
        logger.info(
            "attention implementation %r is kept: XKVCache's fast decode paths stand in for 'sdpa' only; "
            "decoding with the lean rebuild",
            current,
        )
        return False
    if IMPLEMENTATION not in AttentionInterface():
        AttentionInterface.register(IMPLEMENTATION, xkv_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    if current != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)  # type: ignore[operator]  # a PreTrainedModel method
        logger.info("attention implementation %r -> %r for XKVCache's fast decode", current, IMPLEMENTATION)
    previous, holders = _SWITCHED.get(model, (current, weakref.WeakSet()))
    if holder is not None:
        holders.add(holder)
    _SWITCHED[model] = (previous, holders)
    return True


def restore(model: nn.Module, holder: Any = None) -> bool:
    """``holder`` no longer needs ``"xkv"``: once no live holder does, ``model`` gets back its earlier implementation.

    A model that :func:`enable` never switched, or that still has other holders, is left as it is. Holders that were
    garbage-collected without calling this count as gone; until some holder restores, a model left on ``"xkv"``
    computes what ``"sdpa"`` computes (every call without a pending request goes to SDPA).

    Returns:
        ``True`` if the model was switched back.
    """
    entry = _SWITCHED.get(model)
    if entry is None:
        return False
    previous, holders = entry
    holders.discard(holder)
    if len(holders) > 0:
        return False
    del _SWITCHED[model]
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == IMPLEMENTATION:
        model.set_attn_implementation(previous)  # type: ignore[operator]  # a PreTrainedModel method
        logger.info("attention implementation %r -> %r: no cache needs it any more", IMPLEMENTATION, previous)
    return True
