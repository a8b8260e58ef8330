"""``xkv bench``: decode speed, prefill time, KV bytes and peak memory of every cache, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from xkv.cli.common import check_model, check_output_folder, load_config, quiet_library_output, thread_count


def add_bench_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` and its arguments to the sub-commands; return its parser."""
    bench = commands.add_parser(
        "bench",
        help="decode speed, prefill time, KV bytes and peak memory of every cache, side by side",
        description="Prefill one random-token prompt (or the first tokens of --text) per length with every method, "
        "interleave their decode steps, "
        "and write results.json, results.md and decode_ms.png to --out.",
    )
    bench.add_argument("--model", default="smollm2-135m", help="embedded model name, hub id or local path")
    bench.add_argument("--lengths", default="1k,2k,4k,7k", help="context lengths, e.g. 1k,2k,4k,7k")
    bench.add_argument(
        "--methods",
        default="dense,quantized-int4,xkv-rebuild,xkv-absorb,xkv-selective",
        help="comma-separated: dense, quantized-int4, xkv-rebuild, xkv-absorb (the default decode path), "
        "xkv-selective, xkv-shared (selective, one pick of chunks for all KV heads), xkv-exact (exact SVD), "
        "xkv-int4 (int4 factors), xkv-former (the default until 2026-12-03: "
        "factors in the model's dtype, randomized SVD, selective), xkv-chunked (512-token prefill chunks, folded), "
        "dense-chunked (a dense cache fed the same chunks), or label=config.yaml (an xKV config file run as written, "
        "its decode path included; --config does not apply to it)",
    )
    bench.add_argument("--steps", type=int, default=20, help="decode steps timed per method (median reported)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    bench.add_argument(
        "--text",
        help="a text file whose first tokens are each length's prompt, instead of random tokens (attention over "
        "real text differs; it sets how often Selective Reconstruction widens its budget); not with --memory",
    )
    bench.add_argument(
        "--prefill-repeats", type=int, default=3,
        help="prefills per method and length, interleaved in rounds (median reported; not with --memory, which "
        "measures one prefill per fresh process); default %(default)s",
    )  # fmt: skip
    bench.add_argument("--config", help="xKV config file (YAML/JSON) for ranks, groups and SR settings")
    bench.add_argument("--threads", type=thread_count, default=0, help="torch threads (0: torch's default)")
    bench.add_argument(
        "--memory",
        action="store_true",
        help="measure peak resident memory instead, one fresh process per method and length (Linux)",
    )
    bench.add_argument("--out", help="output folder (default: benchmarks/decode, or benchmarks/memory with --memory)")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    return bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Decode ms per step, prefill time, KV bytes and peak memory of every method, side by side in one process."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from xkv.bench import (
        check_methods,
        run_bench,
        run_peak_bench,
        text_prompt,
        write_peak_report,
        write_report,
    )
    from xkv.evaluation.runner import parse_lengths
    from xkv.models import load

    lengths = parse_lengths(args.lengths)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = check_methods(methods)  # names, config files and labels checked before the model loads
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 but got {args.steps}")
    if args.prefill_repeats < 1:
        raise ValueError(f"--prefill-repeats must be >= 1 but got {args.prefill_repeats}")
    config = load_config(args.config)
    if args.text is not None and args.memory:
        raise ValueError("--text applies to the timed bench, not to --memory (its prompts are random tokens)")
    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text: no file at {args.text!r}")
    check_model(args.model)
    if args.out:
        check_output_folder(args.out, "--out")
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if args.memory:  # one fresh process per method and length
        out = args.out or "benchmarks/memory"
        with Progress(*columns, console=console, disable=args.quiet) as progress:
            bar = progress.add_task("peak memory", total=len(methods) * len(lengths))
            peaks = run_peak_bench(
                args.model, lengths, methods, seed=args.seed, config_path=args.config, threads=args.threads,
                on_progress=lambda label: progress.update(bar, advance=1, description=label),
            )  # fmt: skip
        path = write_peak_report(peaks, out, args.command_line)
        console.print(path.read_text())
        console.print(f"wrote results.json, results.md and peak_mb.png in {out}")
        return 0
    quiet_library_output(args.threads)
    model, tokenizer = load(args.model)
    prompt = text_prompt(tokenizer, args.text, max(lengths)) if args.text is not None else None
    per_length = len(methods) * args.prefill_repeats + args.steps + 2
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        bar = progress.add_task("bench", total=per_length * len(lengths))
        rows = run_bench(
            model, lengths, methods, steps=args.steps, seed=args.seed, config=config,
            on_progress=lambda label: progress.update(bar, advance=1, description=label),
            prefill_repeats=args.prefill_repeats, prompt=prompt,
        )  # fmt: skip
    out = args.out or "benchmarks/decode"
    path = write_report(rows, out, args.command_line)
    console.print(path.read_text())
    console.print(f"wrote results.json, results.md and decode_ms.png in {out}")
    return 0
