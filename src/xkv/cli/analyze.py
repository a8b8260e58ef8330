"""``xkv analyze``: why a shared basis works, measured on one document's keys and values per layer pair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from xkv.cli.common import add_model_and_runtime, check_model, check_output_folder, quiet_library_output
from xkv.config import XKVConfig

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from transformers import PreTrainedModel


def add_analyze_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``analyze`` and its arguments to the sub-commands; return its parser."""
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
    add_model_and_runtime(analyze)
    return analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    """Token cosine, CKA and subspace alignment per layer pair, and energy against rank per group size."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from xkv.analysis import analyze_layers
    from xkv.calibration import layer_states
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
    check_model(args.model)
    check_output_folder(args.out, "--out")
    out = Path(args.out)
    console = Console()
    quiet_library_output(args.threads)
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
    _print_adjacent_means(console, results, args.rank)
    layout = XKVConfig()
    if args.group_size is not None:
        layout = _write_groups(args, model, ids, sides, out, console)  # the auto groups, used by --allocate
    for target in args.allocate or []:
        _write_allocation(args, target, model, ids, sides, layout, out, console)
    console.print(f"wrote {', '.join(written)} in {out}")
    return 0


def _print_adjacent_means(console: Console, results: dict, rank: int) -> None:
    """Per side, the three measures averaged over pairs of adjacent layers."""
    for side, result in results.items():
        n = len(result.cka)
        adjacent = [(result.cosine[i][i + 1], result.cka[i][i + 1], result.alignment[i][i + 1]) for i in range(n - 1)]
        mean = [sum(v[k] for v in adjacent) / len(adjacent) for k in range(3)] if adjacent else [0, 0, 0]
        console.print(
            f"{side}: adjacent layers: token cosine {mean[0]:.2f}, CKA {mean[1]:.2f}, top-{rank} subspace "
            f"alignment {mean[2]:.2f} (means over {len(adjacent)} pairs)"
        )


def _write_groups(
    args: argparse.Namespace,
    model: PreTrainedModel,
    ids: torch.Tensor,
    sides: dict,
    out: Path,
    console: Console,
) -> XKVConfig:
    """``--group-size``: group the layers by subspace alignment, write groups.yaml; return the grouped config."""
    import yaml

    from xkv.calibration import auto_groups

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
    return config


def _write_allocation(
    args: argparse.Namespace,
    target: float,
    model: PreTrainedModel,
    ids: torch.Tensor,
    sides: dict,
    layout: XKVConfig,
    out: Path,
    console: Console,
) -> None:
    """``--allocate``: per-group ranks for one compression factor by energy per byte, written to alloc-Fx.yaml."""
    import yaml

    from xkv.calibration import allocate_ranks

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
