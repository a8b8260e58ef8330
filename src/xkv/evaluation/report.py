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


def summarize(rows: list[dict[str, Any]], min_full_score: float = 0.5) -> dict[str, Any]:
    """Aggregate rows per length, method and target ratio.

    Args:
        rows: per-sample rows from ``results.jsonl``.
        min_full_score: tasks where the full cache scores under this are listed as dropped.

    Returns:
        ``{"lengths": {length: {"dropped": {task: full_score}, "dropped_samples": {task: n}, "kept": [tasks],
        "rows": [entry, ...]}}}`` (screening stops early on a task that cannot reach the threshold) where each
        entry holds method, target ratio, per-task mean scores, the average over kept tasks with its standard
        error (over samples), the mean measured ratio, and the sample count; an unreachable ratio is an entry with
        ``"unreachable": true``.
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
        groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for row in length_rows:
            if row["task"] in kept:
                groups[(row["method"], float(row["target_ratio"]))].append(row)
        entries = []
        for (method, ratio), group in sorted(groups.items(), key=lambda item: (item[0][0] != "full", item[0])):
            ok = [r for r in group if r["status"] == "ok"]
            entry: dict[str, Any] = {"method": method, "target_ratio": ratio, "samples": len(group)}
            if not ok:
                entry.update({"unreachable": True, "reason": group[0].get("reason", "")})
                entries.append(entry)
                continue
            per_task: dict[str, list[float]] = defaultdict(list)
            for r in ok:
                per_task[r["task"]].append(r["score"])
            mean, se = _mean_se([r["score"] for r in ok])
            entry.update(
                {
                    "unreachable": False,
                    "tasks": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
                    "average": mean,
                    "standard_error": se,
                    "measured_ratio": sum(r["measured_ratio"] for r in ok) / len(ok),
                }
            )
            entries.append(entry)
        summary["lengths"][str(length)] = {
            "kept": kept,
            "dropped": dropped,
            "dropped_samples": {task: len(full[task]) for task in dropped},
            "rows": entries,
        }
    return summary


def markdown_tables(summary: dict[str, Any]) -> str:
    """One table per length: rows method x target ratio, columns tasks, average +- s.e., measured ratio."""
    parts = []
    for length, data in summary["lengths"].items():
        tasks = data["kept"]
        head = ["method", "target", *tasks, "average +- s.e.", "measured ratio", "n"]
        lines = [f"### {length} tokens", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for entry in data["rows"]:
            target = "1x" if entry["method"] == "full" else f"{entry['target_ratio']:g}x"
            if entry["unreachable"]:
                cells = [entry["method"], target, *["—"] * len(tasks), "unreachable", "—", str(entry["samples"])]
            else:
                cells = [
                    entry["method"],
                    target,
                    *[f"{100 * entry['tasks'].get(t, float('nan')):.0f}" for t in tasks],
                    f"{100 * entry['average']:.1f} +- {100 * entry['standard_error']:.1f}",
                    f"{entry['measured_ratio']:.2f}x",
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
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


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
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
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
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(rows: list[dict[str, Any]], out_dir: Path, min_full_score: float = 0.5) -> dict[str, Any]:
    """Write ``summary.json``, ``results.md`` and ``accuracy_vs_ratio.png`` next to the rows; return the summary."""
    summary = summarize(rows, min_full_score)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_tables(summary))
    plot(summary, out_dir / "accuracy_vs_ratio.png")
    return summary
