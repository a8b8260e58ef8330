"""Summaries of evaluation rows: a JSON summary, Markdown tables (one per length) and a PNG plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


#: Methods listed first, in this order (the rest follow alphabetically).
_LEADING_METHODS = ("full", "xkv", "svd")


def _method_rank(method: str) -> tuple[int, str]:
    return (_LEADING_METHODS.index(method) if method in _LEADING_METHODS else len(_LEADING_METHODS), method)


def _task_mean_se(per_task: dict[str, list[float]]) -> tuple[float, float]:
    """Mean of the per-task means and its standard error (tasks weigh the same whatever their sample counts)."""
    means = [sum(v) / len(v) for v in per_task.values()]
    variance = sum(_mean_se(v)[1] ** 2 for v in per_task.values()) / len(means) ** 2
    return sum(means) / len(means), math.sqrt(variance)


def summarize(rows: list[dict[str, Any]], min_full_score: float = 0.5, complete_only: bool = False) -> dict[str, Any]:
    """Aggregate rows per length, method and target ratio.

    Args:
        rows: per-sample rows from ``results.jsonl``.
        min_full_score: tasks where the full cache scores under this are listed as dropped.
        complete_only: leave out (and list as ``left_out``) kept tasks where some method and ratio of that length
            has fewer rows than the full cache, e.g. a run stopped before it reached them.

    Returns:
        ``{"lengths": {length: {"dropped": {task: full_score}, "dropped_samples": {task: n}, "kept": [tasks],
        "rows": [entry, ...]}}}`` (screening stops early on a task that cannot reach the threshold) where each
        entry holds method, target ratio, per-task mean scores, the average over kept tasks (mean of the per-task
        means, as RULER averages) with its standard error, the mean measured ratio, and the sample count. An
        unreachable ratio is an entry with ``"unreachable": true``. Flags that make an average not comparable:
        ``missing_tasks`` (kept tasks without a row for this method, e.g. a run stopped early),
        ``unreachable_samples`` (samples where the ratio was out of reach, left out of the average) and
        ``below_target`` (the measured ratio is more than 1% under the target).
    """
    by_length: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_length[int(row["length"])].append(row)
    summary: dict[str, Any] = {"lengths": {}}
    for length, length_rows in sorted(by_length.items()):
        full: dict[str, list[float]] = defaultdict(list)
        for row in length_rows:
            if row["method"] == "full" and row["status"] == "ok":
                full[row["task"]].append(row["score"])
        full_scores = {task: sum(v) / len(v) for task, v in full.items()}
        kept = sorted(task for task, score in full_scores.items() if score >= min_full_score)
        dropped = {task: score for task, score in sorted(full_scores.items()) if score < min_full_score}
        left_out = {}
        if complete_only:
            jobs = {(r["method"], float(r["target_ratio"])) for r in length_rows}
            counts: dict[tuple[str, str, float], int] = defaultdict(int)
            for r in length_rows:
                counts[(r["task"], r["method"], float(r["target_ratio"]))] += 1
            for task in kept:
                if any(counts[(task, *job)] < len(full[task]) for job in jobs):
                    left_out[task] = full_scores[task]
            kept = [task for task in kept if task not in left_out]
        groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for row in length_rows:
            if row["task"] in kept:
                groups[(row["method"], float(row["target_ratio"]))].append(row)
        entries = []
        for (method, ratio), group in sorted(groups.items(), key=lambda item: (_method_rank(item[0][0]), item[0])):
            ok = [r for r in group if r["status"] == "ok"]
            entry: dict[str, Any] = {"method": method, "target_ratio": ratio, "samples": len(group)}
            if not ok:
                entry.update({"unreachable": True, "reason": group[0].get("reason", "")})
                entries.append(entry)
                continue
            per_task: dict[str, list[float]] = defaultdict(list)
            for r in ok:
                per_task[r["task"]].append(r["score"])
            mean, se = _task_mean_se(per_task)
            measured = sum(r["measured_ratio"] for r in ok) / len(ok)
            entry.update(
                {
                    "unreachable": False,
                    "tasks": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
                    "average": mean,
                    "standard_error": se,
                    "measured_ratio": measured,
                    "missing_tasks": sorted(set(kept) - set(per_task)),
                    "unreachable_samples": len(group) - len(ok),
                    "below_target": method != "full" and measured < 0.99 * ratio,
                }
            )
            entries.append(entry)
        summary["lengths"][str(length)] = {
            "kept": kept,
            "dropped": dropped,
            "dropped_samples": {task: len(full[task]) for task in dropped},
            "left_out": left_out,
            "rows": entries,
        }
    return summary


def _overview(data: dict[str, Any]) -> list[str]:
    """Methods x target ratios, each cell the average and the measured ratio: equal memory side by side."""
    targets = sorted({e["target_ratio"] for e in data["rows"] if e["method"] != "full"})
    cells: dict[str, dict[float, str]] = {}
    for entry in data["rows"]:
        if entry["unreachable"]:
            text = "unreachable"
        else:
            text = f"{100 * entry['average']:.1f} ({entry['measured_ratio']:.2f}x)" + _flags(entry)
        cells.setdefault(entry["method"], {})[entry["target_ratio"]] = text
    head = ["method", *(f"{t:g}x" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in cells.items():
        # The full cache is the same at every target: its one result is repeated for reading across.
        values = [row[1.0]] * len(targets) if method == "full" else [row.get(t, "—") for t in targets]
        lines.append("| " + " | ".join([method, *values]) + " |")
    return lines


def markdown_tables(summary: dict[str, Any]) -> str:
    """Per length: an overview, then the table per task.

    The overview has methods x target ratios, each cell the average and the measured ratio; the table per task has
    rows method x target ratio and columns tasks, average +- s.e., measured ratio and samples.
    """
    parts = []
    for length, data in summary["lengths"].items():
        tasks = data["kept"]
        head = ["method", "target", *tasks, "average +- s.e.", "measured ratio", "n"]
        lines = [
            f"### {length} tokens",
            "",
            "Average accuracy (%) over the kept tasks, and the measured compression ratio:",
        ]
        lines += ["", *_overview(data), "", "Per task:", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for entry in data["rows"]:
            target = "1x" if entry["method"] == "full" else f"{entry['target_ratio']:g}x"
            if entry["unreachable"]:
                cells = [entry["method"], target, *["—"] * len(tasks), "unreachable", "—", str(entry["samples"])]
            else:
                cells = [
                    entry["method"],
                    target,
                    *[f"{100 * entry['tasks'][t]:.0f}" if t in entry["tasks"] else "—" for t in tasks],
                    f"{100 * entry['average']:.1f} +- {100 * entry['standard_error']:.1f}" + _flags(entry),
                    f"{entry['measured_ratio']:.2f}x" + (" (below target)" if entry.get("below_target") else ""),
                    str(entry["samples"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        if data["dropped"]:
            counts = data.get("dropped_samples", {})
            dropped = ", ".join(
                f"{task} ({100 * score:.0f}%" + (f", n={counts[task]})" if task in counts else ")")
                for task, score in data["dropped"].items()
            )
            lines += ["", f"Dropped (full cache under the threshold): {dropped}"]
        if data.get("left_out"):
            left = ", ".join(f"{task} ({100 * score:.0f}%)" for task, score in data["left_out"].items())
            lines += ["", f"Left out (kept, but not run with every method; full-cache score): {left}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _flags(entry: dict[str, Any]) -> str:
    """Why an average is not comparable with the others, if it is not."""
    notes = []
    if entry.get("missing_tasks"):
        notes.append(f"{len(entry['missing_tasks'])} tasks missing")
    if entry.get("unreachable_samples"):
        notes.append(f"{entry['unreachable_samples']} samples unreachable")
    return f" ({'; '.join(notes)})" if notes else ""


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Accuracy versus measured compression factor, one line per method, one panel per length.

    Returns:
        ``False`` (and writes nothing) if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    lengths = list(summary["lengths"])
    if not lengths:
        return False
    fig, axes = plt.subplots(1, len(lengths), figsize=(7.0 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        by_method: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for entry in summary["lengths"][length]["rows"]:
            if not entry["unreachable"]:
                point = (entry["measured_ratio"], 100 * entry["average"], 100 * entry["standard_error"])
                by_method[entry["method"]].append(point)
        for method, points in sorted(by_method.items()):
            points.sort()
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.set_xlabel("measured compression factor (dense bytes / held)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{length} tokens")
        ax.grid(alpha=0.3)
        if by_method:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a line
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(
    rows: list[dict[str, Any]],
    out_dir: Path,
    min_full_score: float = 0.5,
    complete_only: bool = False,
    command: str | None = None,
) -> list[str]:
    """Write ``summary.json``, ``results.md`` and (with matplotlib) ``accuracy_vs_ratio.png``; return their names.

    ``command``, the command line that made them, ends ``results.md`` so every figure there names its source.
    """
    summary = summarize(rows, min_full_score, complete_only)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    footer = f"\nWritten by `{command}`\n" if command else ""
    (out_dir / "results.md").write_text(markdown_tables(summary) + footer)
    written = ["summary.json", "results.md"]
    if plot(summary, out_dir / "accuracy_vs_ratio.png"):
        written.append("accuracy_vs_ratio.png")
    return written
