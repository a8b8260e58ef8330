"""Prefix files: a compressed cache on disk (safetensors for the tensors, JSON metadata), written atomically.

The file holds every tensor the cache keeps (factors in their stored form, scales, exact tokens, tails, dense
layers) and, in the safetensors header, a JSON document under the key ``"xkv"``: the format name and version, the
model type and a fingerprint of its weights, the config, the token count, a hash of the prompt's token ids and of
the tokenizer's vocabulary when they are given, and each group's state (its layers, ranks, lengths, dtype and
storage forms). :meth:`xkv.cache.XKVCache.save` and :meth:`xkv.cache.XKVCache.load` use these helpers; reading
checks everything before anything is built:

* the digest (:data:`DIGEST_KEY`, in the header beside ``"xkv"``): the SHA-256 of the header and the SHA-256 of the
  tensor data, 64 hex digits each. The header's digest covers every byte before the tensor data (the 8-byte header
  length, the tensor table with its dtypes, shapes and offsets, the metadata, the padding, the data's digest) with its
  own 64 digits read as zeros; the data's covers every byte after the header. Any byte changed anywhere in the file
  is refused (:func:`read`);
* the metadata against the tensors, the model and the config (:func:`check_layout`): ranks and lengths against
  the tensors' shapes, dtypes from an allow-list, the groups against those the config makes, and no tensor that no
  field describes.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from xkv.forms import MODEL_DTYPES, FactorFormat, dtype_named

if TYPE_CHECKING:
    from xkv.adapters import ModelSpec
    from xkv.config import XKVConfig
    from xkv.groups import LayerGroup

#: Name and version written in every prefix file (version 2: digests and each group's layers).
FORMAT = "xkv-prefix"
VERSION = 2
#: Key of the digest in the safetensors metadata: 128 hex digits, the header's SHA-256 then the tensor data's.
DIGEST_KEY = "xkv_sha256"
_BLANK = "0" * 64
_CHUNK = 1 << 24  # bytes hashed per read
_SIDES = {"k": "keys", "v": "values"}


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


def _raise_as_users(path: Path, err: OSError) -> NoReturn:
    """Raise ``err`` again as the same kind of ``OSError``, naming ``path`` (never a temporary file's name)."""
    reason = err.strerror or str(err)
    if err.errno is not None:
        raise OSError(err.errno, f"cannot write the prefix file ({reason})", str(path)) from err
    raise OSError(f"cannot write the prefix file {str(path)!r}: {reason}") from err


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (a reader never sees half a file); return its size.

    Tensors are written contiguous and each with a storage of its own (safetensors refuses shared storages). The
    file is written beside ``path`` under a temporary name, its digests are filled in (see the module's docstring),
    and it is renamed to ``path``; on any error the temporary file is removed.

    Raises:
        IsADirectoryError: if ``path`` is a directory.
        OSError: (its subclass for the cause, e.g. ``PermissionError``, ``FileNotFoundError`` for a missing folder,
            ``NotADirectoryError`` when a parent is a file) if the file cannot be written; the message names
            ``path``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a prefix file cannot be written over a directory", str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove_orphans(path)
    own = {name: t.detach().contiguous().clone().cpu() for name, t in tensors.items()}
    header = {"xkv": json.dumps({"format": FORMAT, "version": VERSION, **meta}), DIGEST_KEY: _BLANK * 2}
    try:
        try:
            save_file(own, str(tmp), metadata=header)
        except SafetensorError as err:  # safetensors reports I/O errors as its own: find the OSError behind it
            with open(tmp, "wb"):  # raises the OSError (missing folder, no permission, ...) if that was the cause
                pass
            raise OSError(str(err)) from err
        _seal(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _raise_as_users(path, err)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of earlier writes to ``path`` whose process is gone (killed mid-write).

    Each writer names its temporary file ``.{name}.{pid}.tmp``; one whose process still runs may be mid-write and is
    left alone.
    """
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = orphan.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: is it alive?
        except ProcessLookupError:
            orphan.unlink(missing_ok=True)
        except OSError:  # alive under another user, or not ours to ask: leave it
            continue


def _seal(path: Path) -> None:
    """Fill in the digests of a file written with a blank :data:`DIGEST_KEY` (the offsets do not move)."""
    with path.open("r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        raw = handle.read(size)
        blank = f'"{_BLANK * 2}"'.encode()
        at = raw.find(blank)
        if at < 0 or raw.find(blank, at + 1) >= 0:
            raise RuntimeError("safetensors wrote the digest placeholder in an unexpected form")
        data = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            data.update(chunk)
        at += 1 + 8  # after the quote, from the start of the file
        handle.seek(at + 64)
        handle.write(data.hexdigest().encode())
        handle.seek(0)
        head = hashlib.sha256(handle.read(8 + size))  # the header with the data's digest and its own still blank
        handle.seek(at)
        handle.write(head.hexdigest().encode())
        handle.flush()
        os.fsync(handle.fileno())


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a prefix file's tensors (on CPU) and metadata, after checking its digests.

    Both digests are checked before the tensors are read; the check hashes the whole file once. On a 4k-token prefix
    file of the embedded model (4025 tokens, default config, 44.2 MiB) this takes 0.11-0.14 s against 0.005-0.010 s
    for safetensors' reader alone, and ``XKVCache.load`` 0.55 s against 0.43 s with the check left out (2 busy CPU
    cores; ``python -c "print('The quick brown fox jumps over the lazy dog. ' * 400)" > doc.txt``,
    ``xkv compress doc.txt --out doc.xkv``, then ``python -m timeit -n 5 -s "from xkv import prefix"
    "prefix.read('doc.xkv')"`` against ``-s "from safetensors.torch import load_file" "load_file('doc.xkv')"``).

    Raises:
        FileNotFoundError: if there is no such file.
        PrefixFileError: if the file is not a safetensors file, is truncated or damaged (a digest does not match),
            holds no xkv metadata (not ours), or was written by another format version; the message names the file
            and the problem.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no prefix file at {name}")
    unreadable = f"{name} is not a readable prefix file (truncated or damaged?)"
    with path.open("rb") as handle:
        before = os.fstat(handle.fileno())
        start = handle.read(8)
        if len(start) < 8:
            raise PrefixFileError(f"{unreadable}: {before.st_size} bytes, shorter than a safetensors header")
        size = int.from_bytes(start, "little")
        if size > before.st_size - 8:
            raise PrefixFileError(f"{unreadable}: its header length ({size} bytes) exceeds the file")
        raw = start + handle.read(size)
        try:
            header = json.loads(raw[8:])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PrefixFileError(f"{unreadable}: its header is not JSON ({err})") from err
        stored = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(stored, dict) or "xkv" not in stored:
            raise PrefixFileError(f"{name} is a safetensors file but not an xkv prefix file (no 'xkv' metadata)")
        digest = stored.get(DIGEST_KEY)
        if digest is None:  # written before digests (version 1), or the digest's key was damaged
            _check_version(name, _meta(name, stored["xkv"]))
            raise PrefixFileError(f"{name} is damaged: its header has no {DIGEST_KEY!r} digest")
        _check_header_digest(name, raw, digest)
        meta = _meta(name, stored["xkv"])
        _check_version(name, meta)
        data = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            data.update(chunk)
        if data.hexdigest() != digest[64:]:
            raise PrefixFileError(
                f"{name} is truncated or damaged: the SHA-256 of its tensor data does not match the digest written "
                "with it"
            )
    try:
        with safe_open(str(path), framework="pt") as opened:
            tensors = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise PrefixFileError(f"{unreadable}: {err}") from err
    after = os.stat(path)
    if (after.st_ino, after.st_size, after.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
        raise PrefixFileError(f"{name} changed while it was being read")
    return tensors, meta


def _meta(name: str, text: object) -> dict[str, Any]:
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as err:
        raise PrefixFileError(f"{name} has damaged xkv metadata: {err}") from err
    if not isinstance(meta, dict):
        raise PrefixFileError(f"{name} has damaged xkv metadata: not a JSON object")
    return meta


def _check_version(name: str, meta: dict[str, Any]) -> None:
    if meta.get("format") != FORMAT:
        raise PrefixFileError(f"{name} is not an xkv prefix file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise PrefixFileError(
            f"{name} was written in prefix format version {meta.get('version')!r}; this xkv reads version "
            f"{VERSION}: compress the document again"
        )


def _check_header_digest(name: str, raw: bytes, digest: object) -> None:
    """Check the header's SHA-256 (``raw``: the file up to the tensor data) against ``digest``'s first half."""
    damaged = f"{name} is damaged: its header (tensor table or metadata) does not match the digest written with it"
    if not isinstance(digest, str) or len(digest) != 128 or digest.strip("0123456789abcdef"):
        raise PrefixFileError(f"{damaged} ({DIGEST_KEY!r} is not 128 hex digits)")
    quoted = f'"{digest}"'.encode()
    if raw.count(quoted) != 1:
        raise PrefixFileError(damaged)
    blanked = raw.replace(quoted, f'"{_BLANK}{digest[64:]}"'.encode())
    if hashlib.sha256(blanked).hexdigest() != digest[:64]:
        raise PrefixFileError(damaged)


# ---------------------------------------------------------------------- metadata against tensors and model
#: One expected dimension of a tensor: its size (``None``: the batch, the same in every tensor) and what says so.
Dim = tuple[int | None, str]
_BATCH: Dim = (None, "the batch (the same in every tensor)")


class _Layout:
    """Checks one file's metadata against its tensors; every failure a :class:`PrefixFileError` naming the field."""

    def __init__(self, where: str, tensors: dict[str, torch.Tensor], spec: ModelSpec):
        self.where = where
        self.tensors = tensors
        self.used: set[str] = set()
        self.batch: int | None = None
        self.heads: Dim = (spec.num_kv_heads, "the model's key/value heads")
        self.sizes = {"k": spec.head_dim, "v": spec.value_head_dim or spec.head_dim}
        self.head_dims: dict[str, Dim] = {
            "k": (self.sizes["k"], "the model's head_dim"),
            "v": (self.sizes["v"], "the model's value head_dim"),
        }

    def fail(self, field: str, problem: str) -> NoReturn:
        raise PrefixFileError(f"{self.where} is inconsistent: `{field}` {problem}")

    def integer(self, value: object, field: str, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            self.fail(field, f"must be an int {span} but is {value!r}")
        return value

    def flag(self, value: object, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false but is {value!r}")
        return value

    def mapping(self, value: object, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object but is {value!r}")
        return value

    def dtype(self, value: object, field: str) -> torch.dtype:
        try:
            return dtype_named(value)
        except ValueError:
            self.fail(field, f"must be one of {list(MODEL_DTYPES)} but is {value!r}")

    def tensor(self, name: str, dims: Sequence[Dim], dtype: tuple[torch.dtype, str], field: str) -> torch.Tensor:
        """The tensor ``name``: each dimension as ``dims`` says, its dtype ``dtype[0]`` (as field ``dtype[1]`` says).

        ``field`` is the entry that needs the tensor (named when it is missing).
        """
        if name not in self.tensors:
            self.fail(field, f"needs the tensor {name!r}, which the file does not hold")
        tensor = self.tensors[name]
        shape = list(tensor.shape)
        if len(shape) != len(dims):
            self.fail(field, f"needs the tensor {name!r} with {len(dims)} dimensions, but its shape is {shape}")
        if self.batch is None and dims and dims[0][0] is None:
            self.batch = shape[0]
        for axis, (size, said_by) in enumerate(dims):
            expected = self.batch if size is None else size
            if shape[axis] != expected:
                self.fail(
                    said_by, f"gives {expected} for dimension {axis} of the tensor {name!r}, whose shape is {shape}"
                )
        if tensor.dtype != dtype[0]:
            self.fail(
                dtype[1], f"gives dtype {_name(dtype[0])} for the tensor {name!r}, which is {_name(tensor.dtype)}"
            )
        self.used.add(name)
        return tensor


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_layout(
    where: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    spec: ModelSpec,
    config: XKVConfig,
    groups: Sequence[LayerGroup],
) -> None:
    """Check a prefix file's metadata against its tensors and the model, before any cache is built.

    Every field :meth:`xkv.cache.XKVCache.save` writes is checked: the groups (their layers equal those ``config``
    makes on this model), each group's prefix length, ranks (within the full rank, equal to the tensors' shapes),
    dtype (from :data:`xkv.forms.MODEL_DTYPES`, the same in every group and tensor that holds the model's keys or
    values), sides' storage forms (factored exactly where ``config`` compresses), band widths and scales, Selective
    Reconstruction's index (chunk indices in range), each layer's kind and length, and the token count; every tensor
    must be described by a field, with the shape and dtype the fields give it.

    Args:
        where: how messages name the file.
        meta: the file's metadata (:func:`read`).
        tensors: the file's tensors.
        spec: the model's attention geometry.
        config: the file's config as this model runs it (``xkv.cache.effective_config``).
        groups: the groups ``config`` makes on this model.

    Raises:
        PrefixFileError: naming the file, the field and the mismatch.
    """
    check = _Layout(where, tensors, spec)
    tokens = check.integer(meta.get("tokens"), "tokens", 1)
    stores, layers = meta.get("stores"), meta.get("layers")
    if not isinstance(stores, list) or len(stores) != len(groups):
        count = len(stores) if isinstance(stores, list) else stores
        check.fail(
            "stores",
            f"holds {count} groups but the file's config (group_size={config.group_size}) makes {len(groups)} on "
            "this model",
        )
    if not isinstance(layers, list) or len(layers) != spec.num_layers:
        count = len(layers) if isinstance(layers, list) else layers
        check.fail("layers", f"describes {count} layers but the model has {spec.num_layers}")
    prefix_of: dict[int, tuple[int, str]] = {}  # compressed layer -> its group's prefix length and field
    dtype: tuple[torch.dtype, str] | None = None
    for group, entry in zip(groups, stores, strict=True):
        field = f"stores[{group.index}]"
        entry = check.mapping(entry, field)
        group_dtype = (check.dtype(entry.get("dtype"), f"{field}.dtype"), f"{field}.dtype")
        if dtype is not None and group_dtype[0] != dtype[0]:
            check.fail(group_dtype[1], f"is {entry.get('dtype')!r} but `{dtype[1]}` is {_name(dtype[0])!r}")
        dtype = dtype or group_dtype
        prefix_len = _check_store(check, group, entry, tokens, spec, config, group_dtype)
        prefix_of.update(dict.fromkeys(group.layers, (prefix_len, f"{field}.prefix_len")))
    assert dtype is not None  # build_groups makes at least one group
    for layer_idx, entry in enumerate(layers):
        _check_layer(check, layer_idx, check.mapping(entry, f"layers[{layer_idx}]"), tokens, prefix_of, spec, dtype)
    unused = sorted(set(tensors) - check.used)
    if unused:
        more = " ..." if len(unused) > 4 else ""
        check.fail("stores", f"describes no tensor {unused[:4]}{more}, but the file holds them")


def _check_store(
    check: _Layout,
    group: LayerGroup,
    entry: dict[str, Any],
    tokens: int,
    spec: ModelSpec,
    config: XKVConfig,
    dtype: tuple[torch.dtype, str],
) -> int:
    """One group's entry and tensors; returns its prefix length."""
    i = group.index
    field = f"stores[{i}]"
    if entry.get("layers") != list(group.layers):
        check.fail(
            f"{field}.layers",
            f"is {entry.get('layers')!r} but the file's config (group_size={config.group_size}, "
            f"grouping={config.grouping!r}) groups these layers as {list(group.layers)} on this model",
        )
    prefix_len = check.integer(entry.get("prefix_len"), f"{field}.prefix_len", 1, tokens)
    rows: Dim = (prefix_len, f"{field}.prefix_len")
    size: Dim = (group.size, f"{field}.layers")
    exact_prefill = check.flag(entry.get("exact_prefill"), f"{field}.exact_prefill")
    for side, compress in (("k", config.compress_keys), ("v", config.compress_values)):
        state = check.mapping(entry.get(side), f"{field}.{side}")
        rank, form = entry.get(f"rank_{side}"), state.get("form")
        if not compress or exact_prefill:
            why = "exact_prefill is true" if exact_prefill else f"the config has compress_{_SIDES[side]}=false"
            if form != "exact":
                check.fail(f"{field}.{side}.form", f"is {form!r} but the side is kept exact ({why})")
            if rank is not None:
                check.fail(f"{field}.rank_{side}", f"is {rank!r} but the side is kept exact ({why})")
            for slot in range(group.size):
                name = f"group{i}.{side}.exact{slot}"
                check.tensor(name, (_BATCH, check.heads, rows, check.head_dims[side]), dtype, f"{field}.{side}")
            continue
        if form == "exact":
            check.fail(f"{field}.{side}.form", f"is 'exact' but the config compresses the {_SIDES[side]}")
        if form in ("int8", "int4") and form != config.factor_form:  # "model" factors may sit under any form (folds)
            check.fail(f"{field}.{side}.form", f"is {form!r} but the config has factor_form={config.factor_form!r}")
        for name in ("group_size", "rotation"):
            if form in ("int8", "int4") and state.get(name) != getattr(config, f"factor_{name}"):
                check.fail(
                    f"{field}.{side}.{name}",
                    f"is {state.get(name)!r} but the config has factor_{name}={getattr(config, f'factor_{name}')!r}",
                )
        dim = check.sizes[side] * spec.num_kv_heads
        rank = check.integer(rank, f"{field}.rank_{side}", 1, min(prefix_len, group.size * dim))
        _check_factors(check, f"group{i}.{side}.", state, f"{field}.{side}", (rank, f"{field}.rank_{side}"), rows,
                       size, dim, dtype)  # fmt: skip
    selective = check.mapping(entry.get("selective"), f"{field}.selective")
    indexed = config.decode == "selective" and config.compress_keys and config.compress_values and not exact_prefill
    if selective and not indexed:
        check.fail(f"{field}.selective", "holds Selective Reconstruction's index, which the config does not build")
    for key, chunk in selective.items():
        sr_field = f"{field}.selective[{key!r}]"
        if key not in {str(slot) for slot in range(group.size)}:
            check.fail(sr_field, f"names no layer of the group (slots 0..{group.size - 1})")
        if chunk != config.sr_chunk_size or isinstance(chunk, bool):
            check.fail(sr_field, f"is {chunk!r} but the config's sr_chunk_size is {config.sr_chunk_size}")
        _check_index(check, f"group{i}.sr{key}.", sr_field, chunk, rows, dtype, config.sr_landmarks == "bounds")
    return prefix_len


def _check_index(
    check: _Layout, head: str, field: str, chunk: int, rows: Dim, dtype: tuple[torch.dtype, str], bounds: bool
) -> None:
    """Selective Reconstruction's index of one layer: landmarks (means or bounds), their scales, the exact chunks."""
    tokens = rows[0]
    assert tokens is not None  # a prefix length, never the batch
    chunks: Dim = (tokens // chunk, f"{rows[1]} // {field} (the chunks)")
    head_dim = check.head_dims["k"]
    landmarks = check.tensors.get(f"{head}landmarks")
    if landmarks is not None and landmarks.dtype == torch.int8:  # indexes saved before int4 landmarks
        check.tensor(f"{head}landmarks", (_BATCH, check.heads, chunks, head_dim), (torch.int8, field), field)
    elif bounds:
        packed: Dim = (2 * ((check.sizes["k"] + 1) // 2), f"{head_dim[1]} (int4 centre and radius, two a byte)")
        check.tensor(f"{head}landmarks", (_BATCH, check.heads, chunks, packed), (torch.uint8, field), field)
    else:
        packed = ((check.sizes["k"] + 1) // 2, f"{head_dim[1]} (two int4 values a byte)")
        check.tensor(f"{head}landmarks", (_BATCH, check.heads, chunks, packed), (torch.uint8, field), field)
    scales: Dim = (2, "the scales of the centre and the radius") if bounds else (1, "one scale per landmark")
    check.tensor(f"{head}landmark_scales", (_BATCH, check.heads, chunks, scales), (torch.float32, field), field)
    exact_chunks = check.tensors.get(f"{head}exact_chunks")
    kept = exact_chunks.shape[-1] if exact_chunks is not None and exact_chunks.dim() == 3 else 0
    index = check.tensor(f"{head}exact_chunks", (_BATCH, check.heads, (kept, field)), (torch.int64, field), field)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= tokens // chunk):
        check.fail(
            field, f"has chunk indices outside [0, {tokens // chunk - 1}] in the tensor {head + 'exact_chunks'!r}"
        )
    exact_rows: Dim = (kept * chunk + tokens % chunk, f"{field} (exact chunks' rows and the last tokens)")
    check.tensor(f"{head}exact_keys", (_BATCH, check.heads, exact_rows, head_dim), dtype, field)
    check.tensor(f"{head}exact_values", (_BATCH, check.heads, exact_rows, check.head_dims["v"]), dtype, field)


def _check_factors(
    check: _Layout,
    head: str,
    state: dict[str, Any],
    field: str,
    rank: Dim,
    rows: Dim,
    size: Dim,
    dim: int,
    dtype: tuple[torch.dtype, str],
) -> None:
    """One factored side: ``"model"`` factors or quantized bands, at ``rank`` over ``rows`` tokens."""
    form = state.get("form")
    features: Dim = (dim, "the model's key/value heads x head_dim")
    if form == "model":
        check.tensor(f"{head}token_basis", (_BATCH, rows, rank), dtype, field)
        check.tensor(f"{head}reconstruction", (_BATCH, size, rank, features), dtype, field)
        return
    if form not in ("int8", "int4"):
        check.fail(f"{field}.form", f"must be 'model', 'int8', 'int4' or 'exact' but is {form!r}")
    try:
        fmt = FactorFormat(form, state.get("group_size"), state.get("rotation"))  # type: ignore[arg-type]
    except ValueError as err:
        check.fail(field, str(err))
    check.integer(state.get("dim"), f"{field}.dim", dim, dim)
    if check.dtype(state.get("dtype"), f"{field}.dtype") != dtype[0]:
        check.fail(f"{field}.dtype", f"is {state.get('dtype')!r} but `{dtype[1]}` is {_name(dtype[0])!r}")
    bands, total = state.get("bands"), rank[0]
    assert total is not None and fmt.bits is not None
    allowed = [[fmt.bits, total]]  # one band; int4 may keep its first directions (or all of them) in int8
    if form == "int4" and bands == [[8, total]]:
        allowed = [[8, total]]
    if form == "int4" and isinstance(bands, list) and len(bands) == 2 and isinstance(bands[0], list):
        first = bands[0][1] if len(bands[0]) == 2 else None
        if isinstance(first, int) and not isinstance(first, bool) and 0 < first < total:
            allowed = [[8, first], [4, total - first]]
    if bands != allowed:
        check.fail(f"{field}.bands", f"is {bands!r} but `{rank[1]}`={total} in {form} is stored as {allowed}")
    g, scales = fmt.group_size, (torch.float32, f"{field}.form")
    for j, (bits, width) in enumerate(allowed):
        band = f"{field}.bands[{j}]"
        values = (torch.int8 if bits == 8 else torch.uint8, band)
        packed: Dim = (width if bits == 8 else (width + 1) // 2, band)
        columns: Dim = (dim if bits == 8 else (dim + 1) // 2, f"{field}.dim")
        check.tensor(f"{head}band{j}.basis_values", (_BATCH, rows, packed), values, field)
        check.tensor(f"{head}band{j}.basis_scales", (_BATCH, rows, (math.ceil(width / g), band)), scales, field)
        check.tensor(f"{head}band{j}.matrix_values", (_BATCH, size, (width, band), columns), values, field)
        matrix_scales: Dim = (math.ceil(dim / g), f"{field}.group_size")
        check.tensor(f"{head}band{j}.matrix_scales", (_BATCH, size, (width, band), matrix_scales), scales, field)
    if torch.empty((), dtype=dtype[0]).element_size() == 2:  # 2-byte models balance the factors (QuantizedFactors)
        check.tensor(f"{head}balance", (_BATCH, rank), scales, field)


def _check_layer(
    check: _Layout,
    layer_idx: int,
    entry: dict[str, Any],
    tokens: int,
    prefix_of: dict[int, tuple[int, str]],
    spec: ModelSpec,
    dtype: tuple[torch.dtype, str],
) -> None:
    """One layer's kind, length and tensors (a compressed layer's tail after its prefix, else its dense cache)."""
    field = f"layers[{layer_idx}]"
    compressed = check.flag(entry.get("compressed"), f"{field}.compressed")
    if compressed != (layer_idx in prefix_of):
        kind = "compressed" if layer_idx in prefix_of else "dense"
        check.fail(f"{field}.compressed", f"is {str(compressed).lower()} but the file's config makes the layer {kind}")
    length = entry.get("length")
    if length != tokens or isinstance(length, bool):
        check.fail(f"{field}.length", f"is {length!r} but `tokens` is {tokens} (every layer has seen every token)")
    keys = check.tensors.get(f"layer{layer_idx}.keys")
    held: Dim
    if compressed:  # the exact tail after the group's prefix
        prefix_len, said_by = prefix_of[layer_idx]
        held = (tokens - prefix_len, f"tokens - {said_by}")
    elif layer_idx in spec.sliding_layers:  # the window's last tokens
        window = min(tokens, spec.sliding_window or tokens)
        count = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
        if not 0 < count <= window:
            check.fail(f"{field}.length", f"leaves {count} tokens in a sliding window of {spec.sliding_window}")
        held = (count, f"{field}.length")
    else:
        held = (tokens, "tokens")
    check.tensor(f"layer{layer_idx}.keys", (_BATCH, check.heads, held, check.head_dims["k"]), dtype, field)
    check.tensor(f"layer{layer_idx}.values", (_BATCH, check.heads, held, check.head_dims["v"]), dtype, field)
