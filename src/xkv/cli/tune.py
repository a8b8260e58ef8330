"""``xkv tune``: a greedy search of xKV settings for one target compression factor, on calibration samples."""

from __future__ import annotations

import argparse
from pathlib import Path

from xkv.cli.common import add_model_and_runtime, check_model, check_output_folder, load_config, quiet_library_output


def add_tune_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``tune`` and its arguments to the sub-commands; return its parser."""
    tune = commands.add_parser(
        "tune",
        help="search group size, K/V split, factor bits, scale group and rotation for one target factor",
        description="Greedy search, one axis at a time, of xKV settings at a target compression factor (bytes "
        "measured), scored on RULER-lite calibration samples (seeds the reports never use). Each step is an "
        "`xkv eval` folder under --out (a rerun resumes); writes tune.json, tune.md and best.yaml.",
    )
    tune.add_argument("--target", type=float, required=True, help="compression factor to reach, e.g. 8")
    tune.add_argument(
        "--tasks",
        default="niah_single_2,niah_single_1,niah_multikey_1,niah_single_3,niah_multivalue",
        help="comma list of calibration tasks (default: the 5 RULER-lite tasks the 2k report keeps)",
    )
    tune.add_argument("--length", default="2k", help="prompt length in tokens")
    tune.add_argument("--samples", type=int, default=2, help="samples per task")
    tune.add_argument("--first-seed", type=int, default=1000, help="first seed (the reports use 0-19)")
    tune.add_argument(
        "--axes",
        help="axes in search order, e.g. 'factor_form=int4/int8,key_share=1/2/3,group_size=4/8' (default: "
        "factor_form, key_share, group_size, factor_group_size, factor_rotation with their default values)",
    )
    tune.add_argument("--config", help="base XKVConfig file (fields outside the axes are kept)")
    tune.add_argument("--max-new-tokens", type=int, default=48, help="answer length cap")
    tune.add_argument("--out", required=True, help="output folder")
    add_model_and_runtime(tune)
    return tune


def cmd_tune(args: argparse.Namespace) -> int:
    """Search an xKV configuration for one target factor on calibration samples; write best.yaml."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from xkv.evaluation.runner import parse_lengths
    from xkv.evaluation.tasks import parse_tasks
    from xkv.evaluation.tune import TunePlan, parse_axes, run_tune
    from xkv.models import load, stop_token_ids

    lengths = parse_lengths(args.length)
    if len(lengths) != 1:
        raise ValueError(f"`--length` takes one length but got {args.length!r}")
    if args.target <= 1:
        raise ValueError(f"`--target` must be a compression factor > 1 but got {args.target}")
    if args.samples < 1:
        raise ValueError(f"`--samples` must be >= 1 but got {args.samples}")
    if args.max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` must be >= 1 but got {args.max_new_tokens}")
    plan = TunePlan(
        target=args.target,
        axes=parse_axes(args.axes),
        base=load_config(args.config),
        tasks=parse_tasks(args.tasks),
        length=lengths[0],
        samples=args.samples,
        first_seed=args.first_seed,
        out_dir=Path(args.out),
        max_new_tokens=args.max_new_tokens,
    )
    check_model(args.model)
    check_output_folder(args.out, "--out")
    console = Console()
    quiet_library_output(args.threads)
    model, tokenizer = load(args.model)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        bar = progress.add_task("tuning", total=None)

        def on_step(axis: str, jobs: int) -> None:
            progress.reset(bar, total=jobs, description=f"axis {axis}")

        def on_row(row: dict) -> None:
            progress.update(bar, advance=1, description=f"{row['method']} {row['sample_id']}")

        result = run_tune(
            plan, model, tokenizer, stop_token_ids(tokenizer, args.model), args.model, progress=on_row,
            on_step=on_step, command=args.command_line,
        )  # fmt: skip
    console.print((plan.out_dir / "tune.md").read_text())
    assert result.best is not None
    console.print(f"best: {result.best.label}; wrote {plan.out_dir / 'best.yaml'}")
    return 0
