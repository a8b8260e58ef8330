"""Prefix files of an :class:`~xkv.cache.XKVCache`: save and load (format and checks: :mod:`xkv.prefix`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xkv import prefix
from xkv.adapters import describe_model
from xkv.cache.base import CompressedLayer, held_states
from xkv.cache.store import effective_config, groups_for
from xkv.config import XKVConfig

if TYPE_CHECKING:
    from xkv.cache.xkv import XKVCache

logger = logging.getLogger(__name__)


def save(
    cache: XKVCache,
    path: str | Any,
    prompt_ids: torch.Tensor | None = None,
    tokenizer: Any = None,
    model_name: str | None = None,
) -> int:
    """Write this cache to a prefix file (:mod:`xkv.prefix`): every tensor held plus metadata, atomically.

    Args:
        cache: the cache to write; its prefill has finished.
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
    model = cache._model()
    if model is None:
        raise RuntimeError("save() needs the model this cache was built for, which no longer exists")
    if not all(store.is_ready for store in cache.group_stores) or any(s.pending_keys for s in cache.group_stores):
        raise RuntimeError("save() needs a finished prefill (every group factored)")
    if cache.runtime.pads is not None:
        raise ValueError("save() writes unpadded prefixes; this cache holds a left-padded batch")
    tensors: dict[str, torch.Tensor] = {}
    stores = []
    for i, store in enumerate(cache.group_stores):
        named, entry = store.state()
        tensors.update({f"group{i}.{name}": t for name, t in named.items()})
        stores.append(entry)
    layers = []
    for layer_idx, layer in enumerate(cache.layers):
        states = held_states(layer)
        layers.append({"compressed": isinstance(layer, CompressedLayer), "length": layer.get_seq_length()})
        if states is not None:
            tensors[f"layer{layer_idx}.keys"], tensors[f"layer{layer_idx}.values"] = states
    meta = {
        "model_name": model_name,
        "model_type": getattr(model.config, "model_type", None),
        "num_layers": cache.spec.num_layers,
        "weights": prefix.weights_fingerprint(model),
        "tokenizer": prefix.tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "prompt": prefix.ids_fingerprint(prompt_ids) if prompt_ids is not None else None,
        "tokens": cache.get_seq_length(),
        "config": cache.config.to_dict(),
        "stores": stores,
        "layers": layers,
    }
    return prefix.write(path, tensors, meta)


def load(
    cls: type[XKVCache],
    path: str | Any,
    model: nn.Module,
    prompt_ids: torch.Tensor | None = None,
    tokenizer: Any = None,
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
        return _from_prefix(cls, model, tensors, meta, config)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, prefix.PrefixFileError):
            raise
        raise prefix.PrefixFileError(f"{where} is damaged: {err!r}") from err


def _from_prefix(
    cls: type[XKVCache], model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], config: XKVConfig
) -> XKVCache:
    """A cache for ``model`` from a prefix file's tensors and metadata, checked by :func:`prefix.check_layout`."""
    cache = cls(model, config)
    device = next(model.parameters()).device
    stored = {name: t.to(device) for name, t in tensors.items()}
    if len(meta["stores"]) != len(cache.group_stores) or len(meta["layers"]) != len(cache.layers):
        raise ValueError("the groups or layers in the file do not match its config")
    for i, (store, entry) in enumerate(zip(cache.group_stores, meta["stores"], strict=True)):
        head = f"group{i}."
        store.load_state({name[len(head) :]: t for name, t in stored.items() if name.startswith(head)}, entry)
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
