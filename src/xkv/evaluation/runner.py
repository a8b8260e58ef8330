"""The evaluation loop: tasks x lengths x samples x methods x target factors, resumable from a JSONL file.

Protocol (issue "Evaluation harness"): the context is compressed, then the question is appended uncompressed and
answered greedily (question-agnostic, as kvpress's benchmark does); ``question_in_context`` compresses the question
too (the xKV paper's setting). Methods that only read the finished cache share one dense prefill per sample.
The full cache runs first on every task and length; tasks where it scores under ``min_full_score`` are dropped,
with their scores kept in the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from xkv import __version__ as xkv_version
from xkv.baselines.presses import capture_prefill
from xkv.config import UnreachableRatioError, XKVConfig
from xkv.evaluation.code_tasks import CODE_TASK_NAMES, exact_match
from xkv.evaluation.methods import METHODS, Method, SampleContext, build_method
from xkv.evaluation.protocol import seed_split
from xkv.evaluation.tasks import generate, score_answer
from xkv.generation import prefill

logger = logging.getLogger(__name__)

#: Called after each finished (sample, method, factor) with the row; the CLI draws progress from it.
Progress = Callable[[dict[str, Any]], None]


def parse_lengths(spec: str) -> list[int]:
    """``"2k,4k,1500"`` -> ``[2048, 4096, 1500]``.

    Raises:
        ValueError: naming a length that is not a positive integer (with optional ``k``) or is below 256.
    """
    lengths = []
    for item in (part.strip().lower() for part in spec.split(",") if part.strip()):
        try:
            value = int(float(item[:-1]) * 1024) if item.endswith("k") else int(item)
        except ValueError:
            raise ValueError(f"length {item!r} must be an integer token count such as 2048 or 2k") from None
        if value < 256:
            raise ValueError(f"length {item!r} must be at least 256 tokens")
        lengths.append(value)
    if not lengths:
        raise ValueError("`--lengths` must name at least one length")
    return lengths


def parse_ratios(spec: str) -> list[float]:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]`` (compression factors, dense / held).

    Raises:
        ValueError: naming a ratio that is not a number > 1.
    """
    ratios = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        try:
            value = float(item.rstrip("x"))
        except ValueError:
            raise ValueError(f"ratio {item!r} must be a number such as 4 (dense bytes / held bytes)") from None
        if not value > 1.0 or not math.isfinite(value):
            raise ValueError(f"ratio {item!r} must be > 1 (a compression factor: dense bytes / held bytes)")
        ratios.append(value)
    if not ratios:
        raise ValueError("`--ratios` must name at least one ratio")
    return ratios


def parse_methods(spec: str, registry: dict[str, type[Method]] | None = None) -> list[str]:
    """Comma list of method names, checked against the registry (config-file methods: :func:`parse_method_files`).

    Raises:
        ValueError: naming an unknown method and listing the known ones.
    """
    names, _ = parse_method_files(spec, registry)
    return names


def parse_method_files(
    spec: str, registry: dict[str, type[Method]] | None = None
) -> tuple[list[str], dict[str, XKVConfig]]:
    """Comma list of method names and ``label=config.yaml`` entries (an xKV config run as a method of its own).

    A config file's ranks set the key/value split; each target factor scales them (:func:`xkv_config_for`), so a
    file written by ``xkv tune`` for one factor runs at that factor exactly.

    Returns:
        The method names in order (labels for files) and the config of each label.

    Raises:
        ValueError: naming an unknown method (listing the known ones), a label that shadows a registered method,
            or a config file that cannot be read (the file and the problem named).
        FileNotFoundError: naming a config file that is not there and its label.
    """
    registry = registry or METHODS
    names: list[str] = []
    configs: dict[str, XKVConfig] = {}
    for part in (part.strip() for part in spec.split(",")):
        if not part:
            continue
        if "=" in part:
            label, path = (item.strip() for item in part.split("=", 1))
            if not label or label in registry:
                raise ValueError(f"method label {label!r} in {part!r} must be new (not one of {sorted(registry)})")
            if not Path(path).is_file():
                raise FileNotFoundError(f"method {label!r}: no config file at {path!r}")
            configs[label] = XKVConfig.load(path)
            names.append(label)
        elif part not in registry:
            raise ValueError(f"unknown method {part!r}; known methods: {sorted(registry)} or label=config.yaml")
        else:
            names.append(part)
    if not names:
        raise ValueError("`--methods` must name at least one method")
    if len(set(names)) != len(names):
        raise ValueError(f"`--methods` names a method twice: {names}")
    return names, configs


@dataclass
class EvalPlan:
    """Everything one evaluation run does.

    Attributes:
        tasks: task names.
        lengths: total prompt lengths in tokens.
        methods: method names (``full`` is always run first, for the task filter).
        ratios: target compression factors for every method but ``full``.
        samples: samples per task and length.
        out_dir: where ``results.jsonl``, ``summary.json``, ``results.md`` and the plot go.
        haystack: user documents for the natural-text haystack, or ``None``.
        question_in_context: compress the question with the context.
        max_new_tokens: answer length cap.
        min_full_score: tasks where the full cache scores under this (per length) are dropped.
        method_options: keyword options per method name (e.g. ``{"xkv": {"config": XKVConfig(...)}}``).
        first_seed: seed of sample 0; sample ``i`` uses ``first_seed + i``.
        screen: run the full cache on every task first and the other methods only where it reaches
            ``min_full_score`` (saves the other methods on weak tasks); ``False`` runs every method in one pass, one
            prefill per sample (saves a second prefill where the tasks are known to be kept). The report drops weak
            tasks either way.
        only_sample: run only this sample id (``task-length-seed``), to replay one failure.
    """

    tasks: list[str]
    lengths: list[int]
    methods: list[str]
    ratios: list[float]
    samples: int
    out_dir: Path
    haystack: list[str] | None = None
    question_in_context: bool = False
    max_new_tokens: int = 48
    min_full_score: float = 0.5
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_seed: int = 0
    screen: bool = True
    only_sample: str | None = None

    @property
    def results_path(self) -> Path:
        """Per-sample JSONL rows."""
        return self.out_dir / "results.jsonl"

    def sample_seeds(self) -> list[int]:
        """Seeds of the samples of one task and length."""
        return [self.first_seed + i for i in range(self.samples)]


def _row_key(row: dict[str, Any]) -> tuple[str, str, float]:
    return row["sample_id"], row["method"], float(row["target_ratio"])


def _parse_row(line: bytes) -> dict[str, Any] | None:
    """One JSONL line as a row, or ``None`` for a line that is not a whole JSON object (e.g. torn by a kill)."""
    try:
        row = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already written; a line that is not a whole row (torn by an interrupted run) is ignored."""
    rows = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is None:
                logger.warning("ignoring a truncated line in %s", path)
            else:
                rows.append(row)
    return rows


def repair_torn_tail(path: Path) -> None:
    """Make a rows file end with a whole line before a resumed run appends to it.

    A run killed while appending can leave a last line without its newline. If that line is a whole row (as
    :func:`load_rows` counts it, so the resumed run does not redo it), its newline is added; otherwise the torn part
    is cut off (:func:`load_rows` ignored it, so the resumed run writes that row again, once).
    """
    if not path.exists() or not path.stat().st_size:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    if _parse_row(data[start:]) is not None:
        append_line(path, b"")
    else:
        logger.warning("dropping a torn last line of %s (%d bytes): its row is run again", path, len(data) - start)
        with path.open("r+b") as handle:
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())


def append_line(path: Path, line: bytes) -> None:
    """Append ``line`` and a newline in one write, flushed to disk, so that a kill leaves it whole or torn at the end.

    A torn last line is what :func:`repair_torn_tail` mends before the next append.
    """
    data = line + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _options_fingerprint(options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Method options as JSON values (an ``XKVConfig`` as its dict)."""
    return {
        name: {key: value.to_dict() if hasattr(value, "to_dict") else value for key, value in sorted(opts.items())}
        for name, opts in sorted(options.items())
    }


def _fingerprint(plan: EvalPlan, model_name: str) -> dict[str, Any]:
    """What must not change between a run and its resumption (tasks, lengths, methods and ratios may grow)."""
    haystack = None
    if plan.haystack is not None:
        haystack = hashlib.sha256("\x00".join(plan.haystack).encode()).hexdigest()[:16]
    return {
        "model": model_name,
        "samples": plan.samples,
        "first_seed": plan.first_seed,
        "split": seed_split(plan.sample_seeds()),  # "report", "calibration" or "mixed" (xkv.evaluation.protocol)
        "question_in_context": plan.question_in_context,
        "max_new_tokens": plan.max_new_tokens,
        "haystack_sha256": haystack,
        "method_options": _options_fingerprint(plan.method_options),
        "xkv_version": xkv_version,
        # The xKV methods take every field but the ranks from the defaults (e.g. the storage form or the SVD).
        "xkv_defaults": XKVConfig().to_dict(),
    }


def check_resumable(plan: EvalPlan, model_name: str) -> None:
    """Write ``plan.json`` for a new run; for an existing one, refuse to mix rows made another way.

    Raises:
        ValueError: naming the first setting that differs from the run already in ``plan.out_dir``.
    """
    path = plan.out_dir / "plan.json"
    mine = _fingerprint(plan, model_name)
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is damaged ({err}): it records how the rows in {plan.out_dir} were made; use another --out"
            ) from None
        for key, value in mine.items():
            if key == "split" and key not in theirs:
                continue  # a plan written before splits were recorded: the split follows from the seeds
            if theirs.get(key) != value:
                raise ValueError(
                    f"{plan.out_dir} holds results made with {key}={theirs.get(key)!r}, this run has {value!r}: "
                    "use another --out (or the same settings) so rows are not mixed"
                )
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mine, indent=2) + "\n")
    tmp.replace(path)  # atomic: a run killed here leaves no half plan


#: Settings that must agree between runs merged into one report (samples and lengths may differ).
_MERGE_KEYS = ("model", "question_in_context", "max_new_tokens", "haystack_sha256", "method_options", "xkv_defaults")


def merge_runs(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of several ``xkv eval`` output folders (e.g. one per length, run side by side), for one report.

    Folders must agree on the model, question placement, answer cap and haystack, and a method run in several
    folders must have been run with the same options in each (methods only one folder ran may differ).

    Raises:
        ValueError: naming a folder without ``plan.json``/``results.jsonl``, a setting in which two folders differ,
            or a (sample, method, ratio) found in two folders with different results (equal ones count once).
    """
    runs: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]] = []
    for run_dir in map(Path, run_dirs):
        plan_path, results_path = run_dir / "plan.json", run_dir / "results.jsonl"
        if not plan_path.is_file() or not results_path.is_file():
            raise ValueError(f"{run_dir} is not an `xkv eval` output folder (no plan.json or results.jsonl)")
        runs.append((run_dir, json.loads(plan_path.read_text()), load_rows(results_path)))
    if not runs:
        raise ValueError("name at least one `xkv eval` output folder")
    first_dir, first_plan, first_rows = runs[0]
    first_methods = {row["method"] for row in first_rows}
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, float], tuple[Path, dict[str, Any]]] = {}
    for run_dir, plan, run_rows in runs:
        methods = {row["method"] for row in run_rows}
        for key in _MERGE_KEYS:
            mine, theirs, ref_dir = plan.get(key), first_plan.get(key), first_dir
            if key == "method_options" and mine is not None and theirs is not None:
                both = methods & first_methods  # options matter only for methods whose rows are in both
                mine = {name: opts for name, opts in mine.items() if name in both}
                theirs = {name: opts for name, opts in theirs.items() if name in both}
            if key == "xkv_defaults":
                # Runs made before plans recorded the defaults hold None: compare the recorded ones with each other.
                recorded = [(d, p[key]) for d, p, _ in runs if p.get(key) is not None]
                if mine is None or not recorded:
                    continue
                ref_dir, theirs = recorded[0]
            if mine != theirs:
                raise ValueError(
                    f"{run_dir} was run with {key}={mine!r} but {ref_dir} with {theirs!r}: "
                    "their rows do not belong in one report"
                )
        for row in run_rows:
            key_ = _row_key(row)
            if key_ in seen:
                # The same sample and method in two runs (e.g. the full cache, run by every folder) must agree.
                other_dir, other = seen[key_]
                if any(row.get(f) != other.get(f) for f in ("status", "prediction", "score", "measured_ratio")):
                    raise ValueError(f"{run_dir} and {other_dir} both hold {key_} with different results")
                continue
            seen[key_] = (run_dir, row)
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel evaluation (``torchrun`` / ``accelerate launch``).

    Attributes:
        rank: this process's index.
        world: number of processes; sample ``i`` of every task runs on rank ``i % world``.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """``RANK`` and ``WORLD_SIZE`` as set by ``torchrun`` and ``accelerate launch`` (one process if unset).

        Raises:
            ValueError: for values that do not describe a process of the group.
        """
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError as err:
            raise ValueError(f"RANK/WORLD_SIZE must be integers: {err}") from err
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not a process of WORLD_SIZE={world}")
        return cls(rank, world)

    def gather(self, item: Any) -> list[Any]:
        """``item`` of every process, in rank order (``torch.distributed`` with gloo, initialised on first use)."""
        if self.world == 1:
            return [item]
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        items: list[Any] = [None] * self.world
        dist.all_gather_object(items, item)
        return items


def canonical_order(plan: EvalPlan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the order one process writes them.

    Full-cache rows first when screening; then by length, task, sample, method and ratio, in the plan's order.
    """
    methods = ["full", *(m for m in plan.methods if m != "full")]
    seeds = {seed: i for i, seed in enumerate(plan.sample_seeds())}

    def key(row: dict[str, Any]) -> tuple:
        phase = 0 if not plan.screen or row["method"] == "full" else 1
        return (
            phase,
            plan.lengths.index(int(row["length"])) if int(row["length"]) in plan.lengths else len(plan.lengths),
            plan.tasks.index(row["task"]) if row["task"] in plan.tasks else len(plan.tasks),
            seeds.get(row["seed"], len(seeds)),
            methods.index(row["method"]) if row["method"] in methods else len(methods),
            plan.ratios.index(row["target_ratio"]) if row["target_ratio"] in plan.ratios else -1,
        )

    return sorted(rows, key=key)


class Runner:
    """Runs an :class:`EvalPlan` with one model and tokenizer.

    Args:
        plan: what to run.
        model: the causal LM.
        tokenizer: its tokenizer.
        stop_ids: tokens that end an answer.
        progress: called with each new row.
        model_name: recorded in ``plan.json`` so a resumed run uses the same model.
    """

    def __init__(
        self,
        plan: EvalPlan,
        model: Any,
        tokenizer: Any,
        stop_ids: list[int],
        progress: Progress | None = None,
        model_name: str = "",
        shard: Shard | None = None,
    ):
        self.plan = plan
        self.shard = shard or Shard()
        # Each process appends to a file of its own; rank 0 merges them into results.jsonl at the end.
        self.rows_path = (
            plan.results_path if self.shard.world == 1 else plan.out_dir / f"results.rank{self.shard.rank}.jsonl"
        )
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.progress = progress or (lambda row: None)
        self.methods = {
            name: build_method(name, plan.method_options.get(name, {})) for name in {"full", *plan.methods}
        }
        rows = load_rows(plan.results_path)
        for extra in sorted(plan.out_dir.glob("results.rank*.jsonl")) if plan.out_dir.is_dir() else []:
            rows += load_rows(extra)  # a data-parallel run stopped before its merge
        self.done = {_row_key(row) for row in rows}
        #: The full cache's scores per (task, length), kept up to date as rows are written (screening reads them).
        self.full_scores: dict[tuple[str, int], list[float]] = {}
        for row in rows:
            self._note_full_score(row)

    def total_jobs(self) -> int:
        """Upper bound of (sample, method, factor) jobs, for progress bars."""
        per_sample = 1 + sum(len(self.plan.ratios) for name in self.plan.methods if name != "full")
        return len(self.plan.tasks) * len(self.plan.lengths) * self.plan.samples * per_sample

    def run(self) -> list[dict[str, Any]]:
        """Run the full cache everywhere, drop weak tasks, run the other methods; return all rows.

        Raises:
            ValueError: if ``out_dir`` holds rows of a run whose samples or answers were made differently.
        """
        self.plan.out_dir.mkdir(parents=True, exist_ok=True)
        if self.shard.rank == 0:
            check_resumable(self.plan, self.model_name)
        self.shard.gather(None)  # the others wait for plan.json
        if self.shard.rank != 0:
            check_resumable(self.plan, self.model_name)
        repair_torn_tail(self.rows_path)
        if not self.plan.screen:
            for length in self.plan.lengths:
                for task in self.plan.tasks:
                    self._run_task(task, length, ["full", *(name for name in self.plan.methods if name != "full")])
            return self._merged()
        for length in self.plan.lengths:
            for task in self.plan.tasks:
                self._run_task(task, length, ["full"], screening=True)
        if self.shard.world > 1:  # every process decides on the same full-cache scores: all rows on disk
            self.shard.gather(None)
            self.full_scores = {}
            parts = sorted(self.plan.out_dir.glob("results.rank*.jsonl"))
            for row in [r for path in [self.plan.results_path, *parts] for r in load_rows(path)]:
                self._note_full_score(row)
        kept = self.kept_tasks()
        others = [name for name in self.plan.methods if name != "full"]
        for length in self.plan.lengths:
            for task in self.plan.tasks:
                if (task, length) in kept:
                    self._run_task(task, length, others)
        return self._merged()

    def _merged(self) -> list[dict[str, Any]]:
        """All rows; with several processes, rank 0 merges theirs into ``results.jsonl`` in one process's order.

        Every process returns the merged rows (the others wait for the merge).
        """
        leftovers = sorted(self.plan.out_dir.glob("results.rank*.jsonl"))
        if self.shard.world == 1 and not leftovers:
            return load_rows(self.plan.results_path)
        self.shard.gather(None)  # every process has written its last row
        if self.shard.rank == 0:
            parts = sorted(self.plan.out_dir.glob("results.rank*.jsonl"))
            rows = load_rows(self.plan.results_path) + [row for part in parts for row in load_rows(part)]
            unique = {_row_key(row): row for row in rows}
            tmp = self.plan.results_path.with_name("results.jsonl.tmp")
            tmp.write_text(
                "".join(json.dumps(row) + "\n" for row in canonical_order(self.plan, list(unique.values())))
            )
            tmp.replace(self.plan.results_path)
            for part in parts:
                part.unlink()
        self.shard.gather(None)  # the merge is on disk
        return load_rows(self.plan.results_path)

    def kept_tasks(self) -> set[tuple[str, int]]:
        """(task, length) pairs where the full cache reaches ``min_full_score``."""
        return {
            key for key, values in self.full_scores.items() if sum(values) / len(values) >= self.plan.min_full_score
        }

    def _note_full_score(self, row: dict[str, Any]) -> None:
        if row["method"] == "full":
            self.full_scores.setdefault((row["task"], int(row["length"])), []).append(row["score"])

    def _run_task(self, task: str, length: int, methods: Iterable[str], screening: bool = False) -> None:
        """Run ``methods`` on every sample of one task and length.

        With ``screening`` (the full cache alone), stop once the task cannot reach ``min_full_score`` even if every
        remaining sample were answered: it is dropped either way, and the mean over the samples run is then below
        the threshold too.
        """
        methods = list(methods)
        seeds = self.plan.sample_seeds()
        for index, seed in enumerate(seeds):
            if index % self.shard.world != self.shard.rank:
                continue  # another process's sample
            # Each process sees only its own full-cache scores: with several, screening runs every full sample.
            if screening and self.shard.world == 1 and self._screened_out(task, length, len(seeds)):
                logger.info("%s at %d tokens cannot reach the full-cache threshold: screening stopped", task, length)
                return
            encoded = generate(
                task,
                self.tokenizer,
                length,
                seed,
                haystack=self.plan.haystack,
                num_samples_hint=self.plan.samples,
                sample_index=index,
            )
            sample = encoded.sample
            if self.plan.only_sample and sample.sample_id != self.plan.only_sample:
                continue
            jobs = [
                (name, factor)
                for name in methods
                for factor in ([1.0] if name == "full" else self.plan.ratios)
                if (sample.sample_id, name, factor) not in self.done
            ]
            if jobs:
                self._run_sample(encoded, jobs)

    def _screened_out(self, task: str, length: int, total: int) -> bool:
        """Whether the full cache's scores so far keep ``task`` under the threshold whatever the rest score."""
        scores = self.full_scores.get((task, length), [])
        return sum(scores) + (total - len(scores)) < self.plan.min_full_score * total

    def _context(self, encoded: Any) -> SampleContext:
        device = next(self.model.parameters()).device
        context, question = list(encoded.context_ids), list(encoded.question_ids)
        if self.plan.question_in_context:
            context, question = context + question, []
        return SampleContext(
            model=self.model,
            context_ids=torch.tensor([context], device=device),
            question_ids=torch.tensor([question], dtype=torch.long, device=device).reshape(1, -1),
            stop_ids=self.stop_ids,
            max_new_tokens=self.plan.max_new_tokens,
        )

    def _run_sample(self, encoded: Any, jobs: list[tuple[str, float]]) -> None:
        sample = encoded.sample
        ctx = self._context(encoded)
        if any(self.methods[name].needs_capture for name, _ in jobs):
            ctx.capture = capture_prefill(self.model, ctx.context_ids)
            dense, ctx.last_logits = ctx.capture.cache, ctx.capture.last_logits
            ctx.dense = [(layer.keys, layer.values) for layer in dense.layers]
        elif any(self.methods[name].reuses_prefill for name, _ in jobs):
            dense = DynamicCache()
            ctx.last_logits = prefill(self.model, ctx.context_ids, dense)
            ctx.dense = [(layer.keys, layer.values) for layer in dense.layers]
        for name, factor in jobs:
            start = time.perf_counter()
            row: dict[str, Any] = {
                "sample_id": sample.sample_id,
                "task": sample.task,
                "length": sample.length,
                "seed": sample.seed,
                "depth": sample.depth,
                "context_tokens": int(ctx.context_ids.shape[1]),
                "method": name,
                "target_ratio": factor,
                "answers": sample.answers,
            }
            try:
                outcome = self.methods[name].run(ctx, factor)
            except UnreachableRatioError as err:
                row.update({"status": "unreachable", "reason": str(err), "score": None, "measured_ratio": None})
            else:
                prediction = self.tokenizer.decode(outcome.tokens, skip_special_tokens=True).strip()
                row.update(
                    {
                        "status": "ok",
                        "prediction": prediction,
                        "score": score_answer(sample.task, prediction, sample.answers),
                        "held_bytes": outcome.held_bytes,
                        "dense_bytes": outcome.dense_bytes,
                        "measured_ratio": outcome.compression_factor,
                        **outcome.details,
                    }
                )
                if sample.task in CODE_TASK_NAMES:
                    row["exact_match"] = exact_match(prediction, sample.answers[0])
                    row["source"] = sample.source
            row["seconds"] = time.perf_counter() - start
            append_line(self.rows_path, json.dumps(row).encode())
            self.done.add(_row_key(row))
            self._note_full_score(row)
            self.progress(row)
