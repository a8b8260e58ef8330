"""``xkv tune``: search an xKV configuration for a target compression factor on calibration samples.

The search is greedy, one axis at a time (coordinate descent): starting from a base configuration, every value of
the first axis is scored, the best is kept, then the next axis is searched around it. A score is the mean RULER-lite
score of the candidate at the target factor (ranks from :func:`xkv.evaluation.methods.xkv_config_for`, which counts
the bytes of the storage form), on samples whose seeds the reports never use. Each axis runs as one ``xkv eval`` in a
folder of its own (``<out>/<step>-<axis>``), so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xkv.config import XKVConfig
from xkv.evaluation.methods import key_share_of, without_measured_layout, xkv_config_for
from xkv.evaluation.protocol import CALIBRATION_FIRST_SEED, seed_split
from xkv.evaluation.runner import EvalPlan, Runner

#: Axes ``xkv tune`` can search, and the values tried by default (in order; the first is the starting value unless
#: the base config says otherwise).
DEFAULT_AXES: dict[str, list[Any]] = {
    "factor_form": ["int4", "int8", "model"],
    "key_share": [2.0, 1.0, 3.0],
    "group_size": [8, 4],
    "factor_group_size": [64, 32, 128],
    "factor_rotation": ["none", "hadamard"],
}


def parse_axes(spec: str | None) -> dict[str, list[Any]]:
    """``"factor_form=int4/int8,key_share=1/2"`` (or axis names alone, for their default values) to axes.

    Raises:
        ValueError: for an unknown axis or a value that does not parse; the message names it.
    """
    if not spec:
        return dict(DEFAULT_AXES)
    axes: dict[str, list[Any]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_AXES:
            raise ValueError(f"unknown tune axis {name!r}; known axes: {sorted(DEFAULT_AXES)}")
        if not values:
            axes[name] = list(DEFAULT_AXES[name])
            continue
        kind = type(DEFAULT_AXES[name][0])
        try:
            axes[name] = [kind(v.strip()) for v in values.split("/") if v.strip()]
        except ValueError as err:
            raise ValueError(f"tune axis {name!r}: cannot read {values!r} as {kind.__name__} values") from err
        if not axes[name]:
            raise ValueError(f"tune axis {name!r} lists no values")
        for value in axes[name]:  # each value must make a valid config on its own
            field = {"key_share": None}.get(name, name)
            if field is None:
                if value <= 0:
                    raise ValueError(f"tune axis 'key_share' values must be > 0 but got {value}")
                continue
            try:
                XKVConfig.from_dict({field: value})
            except ValueError as err:
                raise ValueError(f"tune axis {name!r}: {err}") from err
    if not axes:
        raise ValueError("`--axes` must name at least one axis")
    return axes


def candidate(base: XKVConfig, target: float, choice: dict[str, Any]) -> XKVConfig:
    """The configuration ``choice`` (axis values) over ``base``, with ranks for ``target``.

    Raises:
        ValueError: if the combination is not a valid config (e.g. a Hadamard rotation over a group that is not a
            power of two).
    """
    fields = {name: value for name, value in choice.items() if name != "key_share"}
    if "group_size" in fields and fields["group_size"] != base.group_size:
        fields = {**without_measured_layout(base), **fields}  # measured groups/ranks fit the base's group size only
    config = XKVConfig.from_dict({**base.to_dict(), **fields})
    listed = isinstance(config.rank_k, list) or isinstance(config.rank_v, list)
    if listed and "key_share" in choice:
        raise ValueError("the key_share axis does not apply to a base config with per-group rank lists")
    return xkv_config_for(target, config, None if listed else float(choice.get("key_share", key_share_of(base))))


def label(choice: dict[str, Any]) -> str:
    """A short method name for a choice, e.g. ``G8-int4-s64-none-k2``."""
    return (
        f"G{choice['group_size']}-{choice['factor_form']}-s{choice['factor_group_size']}-"
        f"{choice['factor_rotation']}-k{float(choice['key_share']):g}"
    )


@dataclass
class TunePlan:
    """One search.

    Attributes:
        target: compression factor to reach (dense bytes / bytes held, the model's dtype).
        axes: axis name -> values, searched in this order.
        base: starting configuration (its fields outside the axes are kept).
        tasks: calibration tasks.
        length: prompt length in tokens.
        samples: samples per task.
        first_seed: seed of the first sample (keep it away from the report's seeds 0-19).
        out_dir: where each step's eval folder, ``tune.json``, ``tune.md`` and ``best.yaml`` go.
        max_new_tokens: answer length cap.
    """

    target: float
    axes: dict[str, list[Any]]
    base: XKVConfig
    tasks: list[str]
    length: int
    samples: int
    first_seed: int
    out_dir: Path
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        """Refuse a search whose samples reach into the report seeds (``xkv.evaluation.protocol``)."""
        seeds = range(self.first_seed, self.first_seed + max(self.samples, 1))
        if seed_split(seeds) != "calibration":
            raise ValueError(
                f"`first_seed` {self.first_seed} with {self.samples} samples uses seeds {seeds.start}-"
                f"{seeds.stop - 1}, but a search may choose only on calibration seeds ({CALIBRATION_FIRST_SEED} and "
                "up): seeds 0-19 are what the reports are scored on (benchmarks/README.md, 'Choose on calibration, "
                "report on held-out')"
            )


@dataclass
class Scored:
    """A candidate's calibration result."""

    label: str
    choice: dict[str, Any]
    config: XKVConfig
    score: float | None
    measured_ratio: float | None
    step: int


@dataclass
class TuneResult:
    """All candidates scored and the best one."""

    plan: TunePlan
    candidates: list[Scored] = field(default_factory=list)
    best: Scored | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``tune.json``."""

        def entry(s: Scored) -> dict[str, Any]:
            return {
                "label": s.label, "step": s.step, "choice": s.choice, "score": s.score,
                "measured_ratio": s.measured_ratio, "config": s.config.to_dict(),
            }  # fmt: skip

        return {
            "target": self.plan.target,
            "tasks": self.plan.tasks,
            "length": self.plan.length,
            "samples_per_task": self.plan.samples,
            "seeds": [self.plan.first_seed, self.plan.first_seed + self.plan.samples - 1],
            "candidates": [entry(s) for s in self.candidates],
            "best": entry(self.best) if self.best else None,
        }


def _better(a: Scored, b: Scored | None, target: float) -> bool:
    """Whether ``a`` beats ``b``: it reaches the target (2% slack) and scores higher, or ties at a higher factor."""
    if a.score is None or a.measured_ratio is None or a.measured_ratio < target * 0.98:
        return False
    if b is None or b.score is None or b.measured_ratio is None:
        return True
    return (a.score, a.measured_ratio) > (b.score, b.measured_ratio)


Candidates = dict[str, tuple[dict[str, Any], XKVConfig]]


def _step_candidates(
    plan: TunePlan, current: dict[str, Any], axis: str, values: list[Any], scored: dict[str, Scored]
) -> Candidates:
    """The configs of one step: ``current`` with ``axis`` set to each value, by label; scored and invalid ones out."""
    configs: Candidates = {}
    for value in values:
        choice = {**current, axis: value}
        name = label(choice)
        if name in scored or name in configs:
            continue
        try:
            configs[name] = (choice, candidate(plan.base, plan.target, choice))
        except ValueError:
            continue  # an invalid combination (e.g. Hadamard over a group that is not a power of two)
    return configs


def _step_plan(plan: TunePlan, configs: Candidates, step: int, axis: str) -> EvalPlan:
    """The evaluation of one step's candidates on the calibration samples, in its own folder (resumable)."""
    return EvalPlan(
        tasks=plan.tasks,
        lengths=[plan.length],
        methods=list(configs),
        ratios=[plan.target],
        samples=plan.samples,
        out_dir=plan.out_dir / f"{step}-{axis}",
        max_new_tokens=plan.max_new_tokens,
        min_full_score=0.0,
        method_options={name: {"config": config} for name, (_, config) in configs.items()},
        first_seed=plan.first_seed,
        screen=False,
    )


def run_tune(
    plan: TunePlan,
    model: Any,
    tokenizer: Any,
    stop_ids: list[int],
    model_name: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[str, int], None] | None = None,
    command: str | None = None,
) -> TuneResult:
    """Run the greedy search; write ``tune.json``, ``tune.md`` and ``best.yaml`` in ``plan.out_dir``.

    Args:
        plan: the search.
        model: the causal LM.
        tokenizer: its tokenizer.
        stop_ids: tokens that end an answer.
        model_name: recorded with each step (a resumed step must use the same model).
        progress: called with each new eval row.
        on_step: called with each axis name and the number of jobs of its step, before it runs.
        command: the command line, written at the end of ``tune.md``.

    Raises:
        ValueError: if no candidate reaches the target.
    """
    base_share = key_share_of(plan.base)
    current: dict[str, Any] = {
        "group_size": plan.base.group_size,
        "factor_form": plan.base.factor_form,
        "factor_group_size": plan.base.factor_group_size,
        "factor_rotation": plan.base.factor_rotation,
        "key_share": base_share,
    }
    for name, values in plan.axes.items():  # start from each axis' first value
        current[name] = values[0]
    result = TuneResult(plan)
    scored: dict[str, Scored] = {}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for step, (axis, values) in enumerate(plan.axes.items()):
        configs = _step_candidates(plan, current, axis, values, scored)
        if configs:
            eval_plan = _step_plan(plan, configs, step, axis)
            runner = Runner(eval_plan, model, tokenizer, stop_ids, progress=progress, model_name=model_name)
            if on_step is not None:
                on_step(axis, runner.total_jobs())
            rows = runner.run()
            for name, (choice, config) in configs.items():
                mine = [r for r in rows if r["method"] == name and r["status"] == "ok"]
                score = sum(r["score"] for r in mine) / len(mine) if mine else None
                ratio = min(r["measured_ratio"] for r in mine) if mine else None
                scored[name] = Scored(name, choice, config, score, ratio, step)
                result.candidates.append(scored[name])
        best_here = None
        for value in values:
            name = label({**current, axis: value})
            if name in scored and _better(scored[name], best_here, plan.target):
                best_here = scored[name]
        if best_here is not None:
            current = dict(best_here.choice)
    for entry in result.candidates:
        if _better(entry, result.best, plan.target):
            result.best = entry
    write_tune(result, command)
    if result.best is None:
        raise ValueError(f"no candidate reached {plan.target:g}x on the calibration samples (see {plan.out_dir})")
    return result


def write_tune(result: TuneResult, command: str | None = None) -> list[str]:
    """Write ``tune.json``, ``tune.md`` and (when a candidate won) ``best.yaml``; return the names written."""
    out = result.plan.out_dir
    (out / "tune.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    lines = [
        f"# xkv tune: {result.plan.target:g}x",
        "",
        f"Calibration: {', '.join(result.plan.tasks)} at {result.plan.length} tokens, {result.plan.samples} samples "
        f"each (seeds {result.plan.first_seed}-{result.plan.first_seed + result.plan.samples - 1}).",
        "",
        "| step | candidate | score | measured factor |",
        "|---|---|---|---|",
    ]
    for s in result.candidates:
        score = "unreachable" if s.score is None else f"{100 * s.score:.1f}"
        ratio = "-" if s.measured_ratio is None else f"{s.measured_ratio:.2f}x"
        star = " **best**" if result.best is not None and s.label == result.best.label else ""
        lines.append(f"| {s.step} | {s.label}{star} | {score} | {ratio} |")
    if command:
        lines += ["", f"Written by `{command}`"]
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    written = ["tune.json", "tune.md"]
    best = result.best
    if best is not None and best.score is not None and best.measured_ratio is not None:
        header = (
            f"# Written by xkv tune for {result.plan.target:g}x: measured {best.measured_ratio:.2f}x, calibration "
            f"score {100 * best.score:.1f} ({len(result.plan.tasks)} tasks x {result.plan.samples} samples at "
            f"{result.plan.length} tokens, seeds {result.plan.first_seed}+).\n"
            f"# Run it with: xkv eval --methods full,tuned={out / 'best.yaml'} --ratios {result.plan.target:g}\n"
        )
        tmp = out / "best.yaml.tmp"
        tmp.write_text(header + yaml.safe_dump(best.config.to_dict(), sort_keys=False))
        tmp.replace(out / "best.yaml")
        written.append("best.yaml")
    return written
