"""What the ``xkv`` sub-commands share: argument checks made before any model loads, and their common options."""

from __future__ import annotations

import argparse
from pathlib import Path

from xkv.config import XKVConfig


def load_config(path: str | None) -> XKVConfig:
    """The config in the file at ``path`` (YAML/JSON), or the built-in defaults without one.

    Raises:
        ValueError: if there is no file at ``path``, or the file is not a valid config.
    """
    if path and not Path(path).is_file():
        raise ValueError(f"no config file at {path!r}")
    return XKVConfig.load(path) if path else XKVConfig()


def thread_count(text: str) -> int:
    """``--threads``: 0 (torch's choice) or a positive count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer but got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: torch's choice) but got {value}")
    return value


def quiet_library_output(threads: int) -> None:
    """No weight-loading bars or warnings from transformers (rich draws our progress); torch threads if given."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)


def check_model(name: str) -> None:
    """Refuse a ``--model`` path that is not there before anything loads or the hub is asked."""
    from xkv.models import check_model_source

    check_model_source(name)


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or in a folder that is not there."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"`{flag}` {path!r} is a folder: give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"`{flag}` {path!r}: the folder {str(target.parent)!r} does not exist")


def check_output_folder(path: str, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"`{flag}` {path!r} is a file: give a folder (it is created if missing)")


def human_bytes(num: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: bytes in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} GiB"


def add_model_and_runtime(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    """The options every model-running subcommand shares: --model, --threads and (with a display) --quiet."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, model id or path")
    parser.add_argument("--threads", type=thread_count, default=0, help="torch threads (default: torch's choice)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress display")
