"""The ``xkv`` command line (every subcommand): the only module that prints or draws."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xkv.config import XKVConfig


def _load_config(path: str | None) -> XKVConfig:
    if path and not Path(path).is_file():
        raise ValueError(f"no config file at {path!r}")
    return XKVConfig.load(path) if path else XKVConfig()


def _threads(text: str) -> int:
    """``--threads``: 0 (torch's choice) or a positive count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer but got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: torch's choice) but got {value}")
    return value


def _quiet_library_output(threads: int) -> None:
    """No weight-loading bars or warnings from transformers (rich draws our progress); torch threads if given."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)


def _check_model(name: str) -> None:
    """Refuse a ``--model`` path that is not there before anything loads or the hub is asked."""
    from xkv.models import check_model_source

    check_model_source(name)


def _check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or in a folder that is not there."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"`{flag}` {path!r} is a folder: give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"`{flag}` {path!r}: the folder {str(target.parent)!r} does not exist")


def _check_output_folder(path: str, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"`{flag}` {path!r} is a file: give a folder (it is created if missing)")


def _read_document(path: str) -> str:
    """The text of a document to compress, refused if it is missing, not UTF-8 text, or empty."""
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


def _human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} GiB"


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress a long haystack with one hidden fact; answer with a full cache and with XKVCache."""
    import torch
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from transformers import DynamicCache

    from xkv.cache import XKVCache
    from xkv.generation import greedy_generate, prefill
    from xkv.memory import tensor_bytes
    from xkv.models import load, stop_token_ids
    from xkv.prompts import is_correct, needle_sample

    config = _load_config(args.config)
    _check_model(args.model)
    if args.json:
        _check_output_file(args.json, "--json")
    console = Console()
    _quiet_library_output(args.threads)
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
    console.print(
        f"[bold]Needle[/bold]: the special magic number for {sample.key} is {sample.answer} "
        f"(at {sample.depth:.0%} of a {len(sample.context_ids)}-token context; question of "
        f"{len(sample.question_ids)} tokens appended uncompressed)"
    )
    console.print(f"[bold]xKV config[/bold]: {json.dumps(config.to_dict())}")
    for row in rows:
        verdict = "[green]correct[/green]" if row["correct"] else "[red]WRONG[/red]"
        console.print(f"[bold]{row['method']:>10}[/bold] answered {row['answer']!r}: {verdict}")
    table = Table(title=f"{args.model}, {len(sample.context_ids)}-token context")
    for column in ("method", "context KV bytes", "compression", "prefill s", "decode ms/token"):
        table.add_column(column, justify="right")
    for row in rows:
        per_token = 1000 * row["decode_s"] / max(1, row["decode_steps"])
        table.add_row(
            row["method"],
            _human_bytes(row["context_kv_bytes"]),
            f"{row['context_compression_factor']:.2f}x",
            f"{row['prefill_s']:.1f}",
            f"{per_token:.0f}",
        )
    console.print(table)
    saved = rows[0]["context_kv_bytes"] - rows[1]["context_kv_bytes"]
    console.print(
        f"KV bytes measured from the tensors held after the context: {_human_bytes(rows[0]['context_kv_bytes'])} "
        f"-> {_human_bytes(rows[1]['context_kv_bytes'])} ({_human_bytes(saved)} saved, "
        f"{rows[1]['context_compression_factor']:.2f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"sample_seed": sample.seed, "rows": rows}, indent=2) + "\n")
    return 0 if all(row["correct"] for row in rows) else 1


def cmd_config(args: argparse.Namespace) -> int:
    """Print the default config, or check and print a config file."""
    config = _load_config(args.file)
    if args.write:
        _check_output_file(args.write, "--write")
        config.save(args.write)
        print(f"wrote {args.write}")
    else:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


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


def _eval_plan(args: argparse.Namespace):
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
    _check_model(args.model)
    haystack = load_haystack(args.haystack) if args.haystack else None
    base = _load_config(args.config) if args.config else None
    _check_output_folder(args.out, "--out")
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
    _quiet_library_output(args.threads)
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

    _check_output_folder(args.out, "--out")
    rows = merge_runs(Path(run) for run in args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_reports(rows, out, args.min_full_score, args.complete_only, command=args.command_line)
    print((out / "results.md").read_text())
    print(f"wrote {', '.join(written)} in {out} ({len(rows)} rows)")
    return 0


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

    text = _read_document(args.document)
    _check_output_file(args.out, "--out")
    config = _load_config(args.config)
    _check_model(args.model)
    console = Console()
    _quiet_library_output(args.threads)
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
        _check_model(name)
    except FileNotFoundError as err:
        where = "" if args.model else f" ({args.prefix} was written with it: pass --model to load it from elsewhere)"
        raise FileNotFoundError(f"{err}{where}") from None
    _quiet_library_output(args.threads)
    model, tokenizer = load(name)
    cache = XKVCache.load(args.prefix, model, tokenizer=tokenizer)
    ids = torch.tensor([question_ids(tokenizer, args.question)], device=model.device)
    answer = greedy_generate(model, ids, cache, args.max_new_tokens, stop_token_ids(tokenizer, name))
    text = tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()
    print(json.dumps({"answer": text}) if args.json else text)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Token cosine, CKA and subspace alignment per layer pair, and energy against rank per group size."""
    import torch
    import yaml
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from xkv.analysis import analyze_layers
    from xkv.calibration import allocate_ranks, auto_groups, layer_states
    from xkv.evaluation.runner import parse_lengths
    from xkv.models import load
    from xkv.prompts import needle_sample

    (tokens,) = parse_lengths(args.tokens) if "," not in args.tokens else (None,)
    if tokens is None:
        raise ValueError(f"`--tokens` takes one length but got {args.tokens!r}")
    if args.rank < 1:
        raise ValueError(f"`--rank` must be >= 1 but got {args.rank}")
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"`--group-size` must be >= 1 but got {args.group_size}")
    if any(not target > 1 for target in args.allocate or []):
        raise ValueError(f"`--allocate` takes compression factors > 1 but got {args.allocate}")
    _check_model(args.model)
    _check_output_folder(args.out, "--out")
    out = Path(args.out)
    console = Console()
    _quiet_library_output(args.threads)
    model, tokenizer = load(args.model)
    ids = torch.tensor([needle_sample(tokenizer, tokens, seed=args.seed).context_ids], device=model.device)
    sides = layer_states(model, ids)
    results = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        for side, layers in sides.items():
            bar = progress.add_task(side, total=len(layers) + 4)

            def step(label: str, side: str = side, bar: TaskID = bar) -> None:
                progress.update(bar, advance=1, description=f"{side}: {label}")

            results[side] = analyze_layers(layers, min(args.rank, *layers[0].shape), on_progress=step)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "model": args.model, "tokens": int(ids.shape[1]), "rank": args.rank, "seed": args.seed,
        "command": args.command_line, **{side: vars(result) for side, result in results.items()},
    }  # fmt: skip
    (out / "analysis.json").write_text(json.dumps(data, indent=1) + "\n")
    written = ["analysis.json", *_plot_analysis(results, out, ids.shape[1], args.rank)]
    for side, result in results.items():
        n = len(result.cka)
        adjacent = [(result.cosine[i][i + 1], result.cka[i][i + 1], result.alignment[i][i + 1]) for i in range(n - 1)]
        mean = [sum(v[k] for v in adjacent) / len(adjacent) for k in range(3)] if adjacent else [0, 0, 0]
        console.print(
            f"{side}: adjacent layers: token cosine {mean[0]:.2f}, CKA {mean[1]:.2f}, top-{args.rank} subspace "
            f"alignment {mean[2]:.2f} (means over {len(adjacent)} pairs)"
        )
    if args.group_size is not None:
        found = auto_groups(model, ids, XKVConfig(group_size=args.group_size), args.rank, states=sides)
        config = found.config
        grouping = {"group_size": config.group_size, "grouping": config.grouping, "groups": config.groups}
        header = (
            f"# xkv analyze --group-size {args.group_size}: groups of {args.model}'s layers by the alignment of\n"
            f"# their top-{args.rank} subspaces on a {ids.shape[1]}-token document (seed {args.seed});\n"
            f"# mean within-group alignment {found.score:.3f}, contiguous groups {found.contiguous_score:.3f}.\n"
        )
        (out / "groups.yaml").write_text(header + yaml.safe_dump(grouping, sort_keys=False, default_flow_style=None))
        console.print(
            f"groups of {args.group_size} by alignment: {config.groups} (mean within-group alignment "
            f"{found.score:.3f}; contiguous {found.contiguous_score:.3f}); wrote {out / 'groups.yaml'}"
        )
    layout = found.config if args.group_size is not None else XKVConfig()  # the auto groups, if formed above
    for target in args.allocate or []:
        allocated = allocate_ranks(model, ids, target, layout, states=sides)
        keys = ("group_size", "grouping", "groups", "rank_k", "rank_v")
        fields = {key: value for key, value in allocated.config.to_dict().items() if key in keys}
        name = f"alloc-{target:g}x.yaml"
        kept = [tuple(round(e, 3) for e in group if e is not None) for group in allocated.energy]
        header = (
            f"# xkv analyze --allocate {target:g}: per-group ranks of {args.model} by water-filling the keys' and\n"
            f"# values' energy per byte on a {ids.shape[1]}-token document (seed {args.seed}). At that length:\n"
            f"# ranks (k, v) {allocated.ranks}, energy kept {kept}\n"
        )
        (out / name).write_text(header + yaml.safe_dump(fields, sort_keys=False, default_flow_style=None))
        console.print(f"{target:g}x by energy per byte: ranks (k, v) {allocated.ranks}; wrote {out / name}")
    console.print(f"wrote {', '.join(written)} in {out}")
    return 0


def _plot_analysis(results: dict, out: Path, tokens: int, rank: int) -> list[str]:
    """Heat maps (2 sides x 3 measures) and energy curves; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    titles = {"cosine": "token cosine", "cka": "linear CKA", "alignment": f"top-{rank} subspace alignment"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for row, (side, result) in enumerate(results.items()):
        for col, (name, title) in enumerate(titles.items()):
            ax = axes[row][col]
            image = ax.imshow(getattr(result, name), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{side}: {title}")
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"layer pairs on one {tokens}-token prompt (keys before RoPE)")
    fig.tight_layout()
    fig.savefig(out / "similarity.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (side, result) in zip(axes, results.items(), strict=True):
        for size, curve in sorted(result.energy.items()):
            ax.plot([(r + 1) / size for r in range(len(curve))], curve, label=f"groups of {size}")
        ax.set_xlabel("rank per layer of the group (r / G)")
        ax.set_ylabel("energy captured")
        ax.set_xlim(0, 192)
        ax.set_title(side)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "energy.png", dpi=110)
    plt.close(fig)
    return ["similarity.png", "energy.png"]


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
        base=_load_config(args.config),
        tasks=parse_tasks(args.tasks),
        length=lengths[0],
        samples=args.samples,
        first_seed=args.first_seed,
        out_dir=Path(args.out),
        max_new_tokens=args.max_new_tokens,
    )
    _check_model(args.model)
    _check_output_folder(args.out, "--out")
    console = Console()
    _quiet_library_output(args.threads)
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Decode ms per step, prefill time, KV bytes and peak memory of every method, side by side in one process."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from xkv.bench import BENCH_METHODS, run_bench, run_peak_bench, write_peak_report, write_report
    from xkv.evaluation.runner import parse_lengths
    from xkv.models import load

    lengths = parse_lengths(args.lengths)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; known: {list(BENCH_METHODS)}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 but got {args.steps}")
    if args.prefill_repeats < 1:
        raise ValueError(f"--prefill-repeats must be >= 1 but got {args.prefill_repeats}")
    config = _load_config(args.config)
    _check_model(args.model)
    if args.out:
        _check_output_folder(args.out, "--out")
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if args.memory:  # one fresh process per method and length
        out = args.out or "benchmarks/memory"
        with Progress(*columns, console=console, disable=args.quiet) as progress:
            bar = progress.add_task("peak memory", total=len(set(methods) | {"dense"}) * len(lengths))
            peaks = run_peak_bench(
                args.model, lengths, methods, seed=args.seed, config_path=args.config, threads=args.threads,
                on_progress=lambda label: progress.update(bar, advance=1, description=label),
            )  # fmt: skip
        path = write_peak_report(peaks, out, args.command_line)
        console.print(path.read_text())
        console.print(f"wrote results.json, results.md and peak_mb.png in {out}")
        return 0
    _quiet_library_output(args.threads)
    model, _ = load(args.model)
    per_length = len(set(methods) | {"dense"}) * args.prefill_repeats + args.steps + 2
    with Progress(*columns, console=console, disable=args.quiet) as progress:
        bar = progress.add_task("bench", total=per_length * len(lengths))
        rows = run_bench(
            model, lengths, methods, steps=args.steps, seed=args.seed, config=config,
            on_progress=lambda label: progress.update(bar, advance=1, description=label),
            prefill_repeats=args.prefill_repeats,
        )  # fmt: skip
    out = args.out or "benchmarks/decode"
    path = write_report(rows, out, args.command_line)
    console.print(path.read_text())
    console.print(f"wrote results.json, results.md and decode_ms.png in {out}")
    return 0


def _model_and_runtime(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    """The options every model-running subcommand shares: --model, --threads and (with a display) --quiet."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, model id or path")
    parser.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    """The ``xkv`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="xkv", description="Cross-layer SVD KV-cache compression (xKV) for Hugging Face transformers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    demo.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=cmd_demo)

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
    evaluate.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress display")
    evaluate.set_defaults(func=cmd_eval)

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
    report.set_defaults(func=cmd_report)

    compress = commands.add_parser(
        "compress",
        help="compress a document once into a prefix file, to ask about it later (`xkv ask`)",
        description="Prefill a text document (as the start of a user turn) into an XKVCache and write every tensor "
        "it holds, with metadata, to a prefix file; print its size against a dense cache.",
    )
    compress.add_argument("document", help="a text file")
    compress.add_argument("--out", required=True, help="prefix file to write (e.g. doc.xkv)")
    compress.add_argument("--config", help="XKVConfig file (.yaml/.json); default: the built-in defaults")
    _model_and_runtime(compress)
    compress.set_defaults(func=cmd_compress)

    ask = commands.add_parser(
        "ask",
        help="answer a question about a document compressed by `xkv compress`",
        description="Load a prefix file (checking model, weights and tokenizer), append the question and answer "
        "greedily.",
    )
    ask.add_argument("prefix", help="prefix file written by `xkv compress`")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", help="model to load (default: the one recorded in the file)")
    ask.add_argument("--threads", type=_threads, default=0, help="torch threads (default: torch's choice)")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap")
    ask.add_argument("--json", action="store_true", help="print {'answer': ...} as JSON")
    ask.set_defaults(func=cmd_ask)

    analyze = commands.add_parser(
        "analyze",
        help="why a shared basis works: similarity, CKA and subspace alignment per layer pair, energy per group size",
        description="Prefill one generated document, then for pre-RoPE keys and for values compute per layer pair "
        "the token-wise cosine, linear CKA and top-r subspace alignment, and the energy captured against rank for "
        "groups of 1, 2, 4 and 8 layers. Writes analysis.json, similarity.png and energy.png.",
    )
    analyze.add_argument("--tokens", default="2k", help="document length in tokens")
    analyze.add_argument("--rank", type=int, default=32, help="r of the subspace alignment")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the generated document")
    analyze.add_argument(
        "--group-size", type=int, default=None,
        help="also form groups of this many layers by alignment and write them as groups.yaml (grouping: auto)",
    )  # fmt: skip
    analyze.add_argument(
        "--allocate", type=lambda text: [float(x) for x in text.split(",")], default=None, metavar="F[,F...]",
        help="also allocate per-group ranks for these compression factors and write alloc-Fx.yaml each",
    )  # fmt: skip
    analyze.add_argument("--out", default="benchmarks/analysis", help="output folder")
    _model_and_runtime(analyze)
    analyze.set_defaults(func=cmd_analyze)

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
    _model_and_runtime(tune)
    tune.set_defaults(func=cmd_tune)

    bench = commands.add_parser(
        "bench",
        help="decode speed, prefill time, KV bytes and peak memory of every cache, side by side",
        description="Prefill one random-token prompt per length with every method, interleave their decode steps, "
        "and write results.json, results.md and decode_ms.png to --out.",
    )
    bench.add_argument("--model", default="smollm2-135m", help="embedded model name, hub id or local path")
    bench.add_argument("--lengths", default="1k,2k,4k,7k", help="context lengths, e.g. 1k,2k,4k,7k")
    bench.add_argument(
        "--methods",
        default="dense,quantized-int4,xkv-rebuild,xkv-absorb,xkv-selective",
        help="comma-separated: dense, quantized-int4, xkv-rebuild, xkv-absorb, xkv-selective, xkv-exact (exact "
        "SVD; the default is randomized), xkv-int4 (int4 factors), xkv-chunked (512-token prefill chunks, folded), "
        "dense-chunked (a dense cache fed the same chunks)",
    )
    bench.add_argument("--steps", type=int, default=20, help="decode steps timed per method (median reported)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    bench.add_argument(
        "--prefill-repeats", type=int, default=3,
        help="prefills per method and length, interleaved in rounds (median reported; not with --memory, which "
        "measures one prefill per fresh process); default %(default)s",
    )  # fmt: skip
    bench.add_argument("--config", help="xKV config file (YAML/JSON) for ranks, groups and SR settings")
    bench.add_argument("--threads", type=_threads, default=0, help="torch threads (0: torch's default)")
    bench.add_argument(
        "--memory",
        action="store_true",
        help="measure peak resident memory instead, one fresh process per method and length (Linux)",
    )
    bench.add_argument("--out", help="output folder (default: benchmarks/decode, or benchmarks/memory with --memory)")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    bench.set_defaults(func=cmd_bench)

    config = commands.add_parser(
        "config",
        help="print the default config, or validate a config file",
        description="Print the default XKVConfig as JSON, or load FILE (YAML/JSON), validate it and print it.",
    )
    config.add_argument("file", nargs="?", help="config file to check")
    config.add_argument("--write", metavar="PATH", help="write the config to PATH (.yaml/.yml/.json)")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xkv`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "xkv " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except (ValueError, OSError, NotImplementedError) as err:  # bad arguments or files, the hub's answer
        print(f"xkv {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xkv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
