"""``xkv demo``: one hidden fact in a long haystack, answered with a full cache and with XKVCache."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from xkv.cli.common import (
    check_model,
    check_output_file,
    human_bytes,
    load_config,
    quiet_library_output,
    thread_count,
)
from xkv.config import XKVConfig

if TYPE_CHECKING:
    from rich.console import Console

    from xkv.prompts import NeedleSample


def add_demo_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` and its arguments to the sub-commands; return its parser."""
    demo = commands.add_parser(
        "demo",
        help="answer a question about a long document with a full cache and with xKV; print bytes and times",
        description="Build a ~4k-token haystack with one hidden fact, compress the context with XKVCache, append "
        "the question uncompressed, and compare the answer, KV bytes and wall time with a full cache. "
        "Exit code 1 if either answer is wrong.",
    )
    demo.add_argument("--model", default="smollm2-135m", help="embedded name, model id or path (default: %(default)s)")
    demo.add_argument("--config", help="XKVConfig file (.yaml/.json); default: the built-in defaults")
    demo.add_argument("--context-tokens", type=int, default=4000, help="context length (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="haystack/needle seed (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="answer length cap (default: %(default)s)")
    demo.add_argument("--threads", type=thread_count, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    return demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress a long haystack with one hidden fact; answer with a full cache and with XKVCache."""
    from rich.console import Console

    config = load_config(args.config)
    check_model(args.model)
    if args.json:
        check_output_file(args.json, "--json")
    console = Console()
    quiet_library_output(args.threads)
    sample, rows = _answer_with_both_caches(args, config, console)
    _print_results(console, args.model, config, sample, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"sample_seed": sample.seed, "rows": rows}, indent=2) + "\n")
    return 0 if all(row["correct"] for row in rows) else 1


def _answer_with_both_caches(
    args: argparse.Namespace, config: XKVConfig, console: Console
) -> tuple[NeedleSample, list[dict]]:
    """Load the model, build the haystack, and answer once with a full cache and once with XKVCache.

    Returns:
        The sample, and per cache a row: answer, correctness, context KV bytes and factor, prefill and decode time.
    """
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import DynamicCache

    from xkv.cache import XKVCache
    from xkv.generation import greedy_generate, prefill
    from xkv.memory import tensor_bytes
    from xkv.models import load, stop_token_ids
    from xkv.prompts import is_correct, needle_sample

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=args.quiet) as progress:
        task = progress.add_task(f"loading {args.model} (the first load converts it once)")
        model, tokenizer = load(args.model)
        progress.update(task, description=f"building a {args.context_tokens}-token haystack")
        sample = needle_sample(tokenizer, args.context_tokens, seed=args.seed)
        context = torch.tensor([sample.context_ids], device=model.device)
        question = torch.tensor([sample.question_ids], device=model.device)
        stops = stop_token_ids(tokenizer, args.model)
        rows = []
        for name, cache in (("full cache", DynamicCache()), ("xKV", XKVCache(model, config))):
            progress.update(task, description=f"{name}: prefill of {context.shape[1]} context tokens")
            start = time.perf_counter()
            prefill(model, context, cache)
            prefill_s = time.perf_counter() - start
            if isinstance(cache, XKVCache):
                report = cache.memory_report()
                context_bytes, context_factor = report.held_bytes, report.compression_factor
            else:
                context_bytes = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
                context_factor = 1.0
            progress.update(task, description=f"{name}: question and answer")
            generation = greedy_generate(model, question, cache, args.max_new_tokens, stops)
            answer = tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
            rows.append(
                {
                    "method": name,
                    "answer": answer,
                    "correct": is_correct(answer, sample.answer),
                    "context_kv_bytes": context_bytes,
                    "context_compression_factor": context_factor,
                    "prefill_s": prefill_s,
                    "decode_s": generation.decode_s,
                    "decode_steps": generation.steps,
                }
            )
    return sample, rows


def _print_results(
    console: Console, model_name: str, config: XKVConfig, sample: NeedleSample, rows: list[dict]
) -> None:
    """The needle, both answers with their verdicts, and a table of bytes and times."""
    from rich.table import Table

    console.print(
        f"[bold]Needle[/bold]: the special magic number for {sample.key} is {sample.answer} "
        f"(at {sample.depth:.0%} of a {len(sample.context_ids)}-token context; question of "
        f"{len(sample.question_ids)} tokens appended uncompressed)"
    )
    console.print(f"[bold]xKV config[/bold]: {json.dumps(config.to_dict())}")
    for row in rows:
        verdict = "[green]correct[/green]" if row["correct"] else "[red]WRONG[/red]"
        console.print(f"[bold]{row['method']:>10}[/bold] answered {row['answer']!r}: {verdict}")
    table = Table(title=f"{model_name}, {len(sample.context_ids)}-token context")
    for column in ("method", "context KV bytes", "compression", "prefill s", "decode ms/token"):
        table.add_column(column, justify="right")
    for row in rows:
        per_token = 1000 * row["decode_s"] / max(1, row["decode_steps"])
        table.add_row(
            row["method"],
            human_bytes(row["context_kv_bytes"]),
            f"{row['context_compression_factor']:.2f}x",
            f"{row['prefill_s']:.1f}",
            f"{per_token:.0f}",
        )
    console.print(table)
    saved = rows[0]["context_kv_bytes"] - rows[1]["context_kv_bytes"]
    console.print(
        f"KV bytes measured from the tensors held after the context: {human_bytes(rows[0]['context_kv_bytes'])} "
        f"-> {human_bytes(rows[1]['context_kv_bytes'])} ({human_bytes(saved)} saved, "
        f"{rows[1]['context_compression_factor']:.2f}x)"
    )
