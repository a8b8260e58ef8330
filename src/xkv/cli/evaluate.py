"""``xkv eval`` and ``xkv report``: accuracy of every method at equal measured KV bytes, and merged reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from xkv.cli.common import check_model, check_output_folder, load_config, quiet_library_output, thread_count

if TYPE_CHECKING:
    from xkv.evaluation.runner import EvalPlan


def add_eval_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` and its arguments to the sub-commands; return its parser."""
    evaluate = commands.add_parser(
        "eval",
        help="RULER-style accuracy of every method at equal measured KV bytes",
        description="Generate RULER-style tasks offline, compress each context with every method at each target "
        "compression factor (dense bytes / held bytes, measured from the tensors), append the question, answer "
        "greedily and score. Writes results.jsonl (a rerun resumes), summary.json, results.md and "
        "accuracy_vs_ratio.png to --out.",
    )
    evaluate.add_argument("--model", default="smollm2-135m", help="embedded name, model id or path")
    evaluate.add_argument("--tasks", default="ruler-lite", help="'ruler-lite' or a comma list of task names")
    evaluate.add_argument("--lengths", default="2k", help="total prompt lengths in tokens, e.g. 2k,4k")
    evaluate.add_argument(
        "--methods", default="full,xkv,svd", help="comma list of methods; label=config.yaml runs an xKV config file"
    )
    evaluate.add_argument("--ratios", default="2,4,8", help="target compression factors, e.g. 2,4,8")
    evaluate.add_argument("--samples", type=int, default=20, help="samples per task and length")
    evaluate.add_argument("--first-seed", type=int, default=0, help="seed of the first sample")
    evaluate.add_argument("--sample", help="replay one sample id (task-length-seed) only")
    evaluate.add_argument("--haystack", help="natural-text haystack: plain text, or JSON list of documents")
    evaluate.add_argument("--config", help="base XKVConfig file for xkv/svd (ranks come from each ratio)")
    evaluate.add_argument(
        "--quantized-axes",
        default="0,0",
        help="quanto axes of keys,values for `quantized`: 0 groups per token, -1 per channel "
        "(KIVI: --quantized-axes=-1,0); default %(default)s, picked on calibration samples (benchmarks/ruler_lite)",
    )
    evaluate.add_argument("--question-in-context", action="store_true", help="compress the question too")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, help="answer length cap")
    evaluate.add_argument("--min-full-score", type=float, default=0.5, help="drop tasks where full scores less")
    evaluate.add_argument(
        "--no-screen",
        action="store_true",
        help="run every method in one pass per sample instead of the full cache on every task first (one prefill "
        "per sample; weak tasks are still dropped from the report)",
    )
    evaluate.add_argument("--out", default="eval-results", help="output directory (default: %(default)s)")
    evaluate.add_argument("--threads", type=thread_count, default=0, help="torch threads (default: torch's choice)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress display")
    return evaluate


def add_report_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report`` and its arguments to the sub-commands; return its parser."""
    report = commands.add_parser(
        "report",
        help="merge `xkv eval` output folders (e.g. one per length) into one report",
        description="Read the results.jsonl of each RUN folder (runs must share model, question placement, answer "
        "cap and haystack, and hold different samples) and write summary.json, results.md and "
        "accuracy_vs_ratio.png for all of them to --out.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="`xkv eval` output folders")
    report.add_argument("--out", required=True, help="folder for the merged report")
    report.add_argument("--min-full-score", type=float, default=0.5, help="drop tasks where full scores less")
    report.add_argument(
        "--complete-only",
        action="store_true",
        help="leave out (and list) kept tasks that some method has not run on every sample, e.g. a stopped run",
    )
    return report


def _quantized_axes(spec: str) -> dict[str, int]:
    """``"-1,0"`` -> ``{"axis_key": -1, "axis_value": 0}`` (quanto axes: 0 per token, -1 per channel)."""
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) != 2 or any(part not in ("0", "-1") for part in parts):
        raise ValueError(f"`--quantized-axes` must be KEY,VALUE with each 0 or -1 (e.g. -1,0) but got {spec!r}")
    return {"axis_key": int(parts[0]), "axis_value": int(parts[1])}


def _replayed_sample(sample_id: str, samples: int, first_seed: int) -> tuple[list[str], list[int]]:
    """Check a ``--sample`` id (``task-length-seed``) against the run's seeds; return its task and length."""
    from xkv.evaluation.tasks import TASK_NAMES

    parts = sample_id.rsplit("-", 2)
    if len(parts) != 3 or parts[0] not in TASK_NAMES or not parts[1].isdigit() or not parts[2].lstrip("-").isdigit():
        raise ValueError(
            f"`--sample` must be a sample id TASK-LENGTH-SEED such as niah_single_1-2048-3 but got {sample_id!r}"
        )
    seed = int(parts[2])
    if not first_seed <= seed < first_seed + samples:
        raise ValueError(
            f"`--sample` {sample_id!r}: seed {seed} is not among this run's samples (seeds {first_seed}.."
            f"{first_seed + samples - 1}); pass the --samples and --first-seed of the run that made it, since the "
            "needle depth depends on them"
        )
    return [parts[0]], [int(parts[1])]


#: Methods and the optional packages they need besides kvpress for its presses (the ``eval`` extra installs all).
_METHOD_PACKAGES = {"quantized": "optimum.quanto"}


def _check_packages(methods: list[str]) -> None:
    """Refuse, before the model loads, a method whose package is missing (and the task generator's)."""
    from importlib.util import find_spec

    from xkv.baselines.presses import PRESSES

    needed = {"wonderwords": "tasks"}
    for name in methods:
        package = "kvpress" if name in PRESSES else _METHOD_PACKAGES.get(name)
        if package:
            needed[package] = name
    for package, user in needed.items():
        if find_spec(package.split(".")[0]) is None or find_spec(package) is None:
            raise ValueError(f"{user} needs the package {package!r}, which is not installed: pip install 'xkv[eval]'")


def _eval_plan(args: argparse.Namespace) -> EvalPlan:
    """Check every eval argument before any model is loaded; return the plan."""
    from xkv.evaluation.methods import METHODS
    from xkv.evaluation.runner import EvalPlan, parse_lengths, parse_method_files, parse_ratios
    from xkv.evaluation.tasks import load_haystack, parse_tasks

    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    methods, method_configs = parse_method_files(args.methods, METHODS)
    ratios = parse_ratios(args.ratios)
    if args.samples < 1:
        raise ValueError(f"`--samples` must be >= 1 but got {args.samples}")
    if args.max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` must be >= 1 but got {args.max_new_tokens}")
    if not 0.0 <= args.min_full_score <= 1.0:
        raise ValueError(f"`--min-full-score` must be in [0, 1] (a fraction of samples) but got {args.min_full_score}")
    if args.sample:
        tasks, lengths = _replayed_sample(args.sample, args.samples, args.first_seed)
    _check_packages(methods)
    check_model(args.model)
    haystack = load_haystack(args.haystack) if args.haystack else None
    base = load_config(args.config) if args.config else None
    check_output_folder(args.out, "--out")
    xkv_names = [name for name in METHODS if name.startswith("xkv") or name == "svd"]
    options: dict[str, dict] = {name: {"config": base} for name in xkv_names if base is not None}
    options.update({label: {"config": config} for label, config in method_configs.items()})
    options["quantized"] = _quantized_axes(args.quantized_axes)
    return EvalPlan(
        tasks=tasks,
        lengths=lengths,
        methods=methods,
        ratios=ratios,
        samples=args.samples,
        out_dir=Path(args.out),
        haystack=haystack,
        question_in_context=args.question_in_context,
        max_new_tokens=args.max_new_tokens,
        min_full_score=args.min_full_score,
        method_options=options,
        first_seed=args.first_seed,
        screen=not args.no_screen and not args.sample,  # a replay runs every method on its sample
        only_sample=args.sample,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the RULER-style suite for every method at every target ratio; write JSONL, JSON, Markdown and a plot."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from xkv.evaluation.report import write_reports
    from xkv.evaluation.runner import Runner, Shard
    from xkv.models import load, stop_token_ids

    plan = _eval_plan(args)  # every argument is checked before the model loads
    shard = Shard.from_env()  # under torchrun / accelerate launch: this process's share of the samples
    console = Console()
    quiet_library_output(args.threads)
    model, tokenizer = load(args.model)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=args.quiet or shard.rank != 0) as progress:
        bar = progress.add_task("evaluating", total=None)

        def on_row(row: dict) -> None:
            score = "unreachable" if row["score"] is None else f"{row['score']:.2f}"
            progress.update(
                bar, advance=1, description=f"{row['sample_id']} {row['method']}@{row['target_ratio']:g}x {score}"
            )

        stops = stop_token_ids(tokenizer, args.model)
        runner = Runner(plan, model, tokenizer, stops, progress=on_row, model_name=args.model, shard=shard)
        progress.update(bar, total=runner.total_jobs() // shard.world, completed=len(runner.done) // shard.world)
        rows = runner.run()
    if shard.rank != 0:
        return 0  # rank 0 merged the rows and writes the report
    if not rows:
        raise ValueError(f"nothing was run: no sample matched --sample {args.sample!r}")
    written = write_reports(rows, plan.out_dir, plan.min_full_score, command=args.command_line)
    console.print((plan.out_dir / "results.md").read_text())
    merged = f" (the rows of {shard.world} processes, merged)" if shard.world > 1 else ""
    console.print(f"wrote {plan.results_path}{merged}, {', '.join(written)} in {plan.out_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Merge ``xkv eval`` output folders into one summary, Markdown table set and plot."""
    from xkv.evaluation.report import write_reports
    from xkv.evaluation.runner import merge_runs

    check_output_folder(args.out, "--out")
    rows = merge_runs(Path(run) for run in args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_reports(rows, out, args.min_full_score, args.complete_only, command=args.command_line)
    print((out / "results.md").read_text())
    print(f"wrote {', '.join(written)} in {out} ({len(rows)} rows)")
    return 0
