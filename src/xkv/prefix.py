"""Prefix files: a compressed cache on disk (safetensors for the tensors, JSON metadata), written atomically.

The file holds every tensor the cache keeps (factors in their stored form, scales, exact tokens, tails, dense
layers) and, in the safetensors header, a JSON document under the key ``"xkv"``: the format name and version, the
model type and a fingerprint of its weights, the config, the token count, a hash of the prompt's token ids and of
the tokenizer's vocabulary when they are given, and each group's state. :meth:`xkv.cache.XKVCache.save` and
:meth:`xkv.cache.XKVCache.load` use these helpers; reading checks everything before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Name and version written in every prefix file.
FORMAT = "xkv-prefix"
VERSION = 1


class PrefixFileError(ValueError):
    """A prefix file that cannot be used here: not ours, damaged, another version, model or tokenizer."""


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model's config and a sample of every parameter (shape, dtype, 64 values).

    Cheap enough for every save and load, and different for another checkpoint of the same architecture.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:  # where it was loaded from and the transformers version do not change the weights
        fields = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        sample = param.detach().reshape(-1)[:64].float().cpu()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 (16 hex digits) of the tokenizer's vocabulary (token -> id)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def ids_fingerprint(ids: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of token ids ``(batch, tokens)``."""
    return hashlib.sha256(json.dumps(ids.tolist()).encode()).hexdigest()[:16]


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (a reader never sees half a file); return its size.

    Tensors are written contiguous and each with a storage of its own (safetensors refuses shared storages).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    own = {name: t.detach().contiguous().clone().cpu() for name, t in tensors.items()}
    header = {"xkv": json.dumps({"format": FORMAT, "version": VERSION, **meta})}
    try:
        save_file(own, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a prefix file's tensors (on CPU) and metadata.

    Raises:
        FileNotFoundError: if there is no such file.
        PrefixFileError: if the file is not a safetensors file, is truncated or damaged, holds no xkv metadata (not
            ours), or was written by another format version; the message names the file and the problem.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prefix file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise PrefixFileError(f"{str(path)!r} is not a readable prefix file (truncated or damaged?): {err}") from err
    if "xkv" not in header:
        raise PrefixFileError(f"{str(path)!r} is a safetensors file but not an xkv prefix file (no 'xkv' metadata)")
    try:
        meta = json.loads(header["xkv"])
    except json.JSONDecodeError as err:
        raise PrefixFileError(f"{str(path)!r} has damaged xkv metadata: {err}") from err
    if meta.get("format") != FORMAT:
        raise PrefixFileError(f"{str(path)!r} is not an xkv prefix file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise PrefixFileError(
            f"{str(path)!r} was written in prefix format version {meta.get('version')!r}; this xkv reads version "
            f"{VERSION}: compress the document again"
        )
    return tensors, meta
