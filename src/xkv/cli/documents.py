"""``xkv compress`` and ``xkv ask``: a document compressed once into a prefix file, then questions about it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xkv.cli.common import (
    add_model_and_runtime,
    check_model,
    check_output_file,
    load_config,
    quiet_library_output,
    thread_count,
)


def add_compress_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``compress`` and its arguments to the sub-commands; return its parser."""
    compress = commands.add_parser(
        "compress",
        help="compress a document once into a prefix file, to ask about it later (`xkv ask`)",
        description="Prefill a text document (as the start of a user turn) into an XKVCache and write every tensor "
        "it holds, with metadata, to a prefix file; print its size against a dense cache.",
    )
    compress.add_argument("document", help="a text file")
    compress.add_argument("--out", required=True, help="prefix file to write (e.g. doc.xkv)")
    compress.add_argument("--config", help="XKVConfig file (.yaml/.json); default: the built-in defaults")
    add_model_and_runtime(compress)
    return compress


def add_ask_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ask`` and its arguments to the sub-commands; return its parser."""
    ask = commands.add_parser(
        "ask",
        help="answer a question about a document compressed by `xkv compress`",
        description="Load a prefix file (checking model, weights and tokenizer), append the question and answer "
        "greedily.",
    )
    ask.add_argument("prefix", help="prefix file written by `xkv compress`")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", help="model to load (default: the one recorded in the file)")
    ask.add_argument("--threads", type=thread_count, default=0, help="torch threads (default: torch's choice)")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap")
    ask.add_argument("--json", action="store_true", help="print {'answer': ...} as JSON")
    return ask


def read_document(path: str) -> str:
    """The text of a document to compress, refused if it is missing, not UTF-8 text, or empty.

    Raises:
        ValueError: if there is no file at ``path``, it is not UTF-8, or it holds only whitespace.
    """
    document = Path(path)
    if not document.is_file():
        raise ValueError(f"no document at {path!r}")
    try:
        text = document.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ValueError(f"{path!r} is empty (or only whitespace): there is nothing to compress")
    return text


def cmd_compress(args: argparse.Namespace) -> int:
    """Prefill a document into an XKVCache and write it to a prefix file."""
    import torch
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from xkv.cache import XKVCache
    from xkv.generation import prefill
    from xkv.memory import dense_kv_bytes
    from xkv.models import load
    from xkv.prompts import document_ids

    text = read_document(args.document)
    check_output_file(args.out, "--out")
    config = load_config(args.config)
    check_model(args.model)
    console = Console()
    quiet_library_output(args.threads)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=args.quiet) as progress:  # fmt: skip
        task = progress.add_task(f"loading {args.model}")
        model, tokenizer = load(args.model)
        ids = torch.tensor([document_ids(tokenizer, text)], device=model.device)
        progress.update(task, description=f"prefill and compression of {ids.shape[1]} tokens")
        cache = XKVCache(model, config)
        prefill(model, ids, cache)
        progress.update(task, description=f"writing {args.out}")
        size = cache.save(args.out, prompt_ids=ids, tokenizer=tokenizer, model_name=args.model)
    spec = cache.spec
    dense = dense_kv_bytes(
        1, ids.shape[1], spec.num_layers, spec.kv_dim, next(model.parameters()).dtype, spec.value_dim
    )
    console.print(
        f"wrote {args.out}: {size / 2**20:.1f} MiB on disk for {ids.shape[1]} tokens; a dense cache holds "
        f"{dense / 2**20:.1f} MiB ({dense / size:.2f}x)"
    )
    if ids.shape[1] < config.min_tokens:
        console.print(
            f"note: {ids.shape[1]} tokens is under the config's min_tokens ({config.min_tokens}), so the cache is "
            "held exact, not compressed"
        )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer a question about a compressed document (a prefix file), greedily."""
    import torch

    from xkv.cache import XKVCache
    from xkv.generation import greedy_generate
    from xkv.models import load, stop_token_ids
    from xkv.prefix import read
    from xkv.prompts import question_ids

    _, meta = read(args.prefix)  # refuses a file that is not ours before the model loads
    name = args.model or meta.get("model_name")
    if not name:
        raise ValueError(f"{args.prefix} does not say which model wrote it: pass --model")
    try:
        check_model(name)
    except FileNotFoundError as err:
        where = "" if args.model else f" ({args.prefix} was written with it: pass --model to load it from elsewhere)"
        raise FileNotFoundError(f"{err}{where}") from None
    quiet_library_output(args.threads)
    model, tokenizer = load(name)
    cache = XKVCache.load(args.prefix, model, tokenizer=tokenizer)
    ids = torch.tensor([question_ids(tokenizer, args.question)], device=model.device)
    answer = greedy_generate(model, ids, cache, args.max_new_tokens, stop_token_ids(tokenizer, name))
    text = tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()
    print(json.dumps({"answer": text}) if args.json else text)
    return 0
