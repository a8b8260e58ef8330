"""``xkv bench``: decode speed, prefill time, KV bytes and peak memory of every cache.

Speed (:func:`run_bench`) is measured side by side in one process.

For each context length every method prefills the same prompt (random tokens, or the first tokens of a text file:
:func:`text_prompt`), in rounds (each round runs every method once, the order rotated from round to round), then the
decode steps are interleaved (one step of each method in turn), so a noisy machine slows every method alike.
Reported per method and length: the median decode step, the median prefill time, the KV bytes held after the prefill
(measured from the tensors), the process's resident memory (its peak while that method prefilled, and that peak
above the resident memory just before: the prefill's transients plus the cache it keeps) and, for Selective
Reconstruction, the share of its layer steps that widened their budget.

Peak memory (:func:`run_peak_bench`, ``xkv bench --memory``) is measured in one fresh process per method and length:
the kernel's high-water mark of resident memory (``VmHWM``, reset after the model is loaded), so no other method's
allocations or freed pages can blur it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from xkv.baselines.quantized import quantized_cache_bytes
from xkv.cache import XKVCache
from xkv.config import XKVConfig
from xkv.evaluation.methods import METHODS, Method
from xkv.generation import decode_one_token, prefill
from xkv.memory import tensor_bytes


@dataclass(frozen=True)
class BenchMethod:
    """A name of ``xkv bench``: a method of the one registry (:data:`xkv.evaluation.methods.METHODS`) and its setting.

    Attributes:
        method: the registry name; the bench times the cache of its ``new_cache`` and ``prefill``.
        config: xKV config fields set over the bench's config (before the method sets its decode path).
        prefill_chunk: tokens per forward pass of the prefill, over the method's own ``prefill_chunk``.
    """

    method: str
    config: dict[str, Any] = field(default_factory=dict)
    prefill_chunk: int | None = None


#: The names ``xkv bench --methods`` takes, in report order, each a registry method at a setting.
BENCH_METHODS: dict[str, BenchMethod] = {
    "dense": BenchMethod("full"),
    # A dense cache fed in xkv-chunked's chunks.
    "dense-chunked": BenchMethod("full", prefill_chunk=512),
    "quantized-int4": BenchMethod("quantized"),  # QuantizedMethod.new_cache: int4 at transformers' defaults
    "xkv-rebuild": BenchMethod("xkv"),
    # The shipped default (exact SVD, int4 factors, values absorbed) at the bench's config.
    "xkv-absorb": BenchMethod("xkv-absorb"),
    "xkv-selective": BenchMethod("xkv-selective"),
    # Selective Reconstruction with one pick of chunks for all KV heads of a layer (sr_select="shared").
    "xkv-shared": BenchMethod("xkv-selective", {"sr_select": "shared"}),
    # The absorb path with the exact SVD (the default SVD since 2026-12-03; kept so older commands still run).
    "xkv-exact": BenchMethod("xkv-absorb", {"svd": "exact"}),
    # The absorb path with int4 factors (int8 head from the spectrum; the default form since 2026-12-03).
    "xkv-int4": BenchMethod("xkv-absorb", {"factor_form": "int4"}),
    # The default until 2026-12-03: factors in the model's dtype, randomized SVD, Selective Reconstruction.
    "xkv-former": BenchMethod("xkv-selective", {"factor_form": "model", "svd": "randomized"}),
    # The context fed in chunks of 512 tokens, each folded into the factors (incremental SVD), then the last.
    "xkv-chunked": BenchMethod("xkv-chunked"),
}


@dataclass
class BenchRow:
    """One method at one context length.

    Attributes:
        method: a name from :data:`BENCH_METHODS`, or the label of ``label=config.yaml``.
        context: prompt tokens.
        decode_ms: median wall time of one decode step.
        decode_vs_dense: ``decode_ms`` over the dense cache's in the same run.
        prefill_s: wall time of the prefill (compression included): the median of ``prefill_runs``.
        prefill_vs_dense: ``prefill_s`` over the dense cache's.
        kv_bytes: bytes the cache holds after the prefill (from its tensors).
        kv_bytes_decoded: bytes it holds after the timed decode steps (tail buffers and decode workspaces too).
        peak_rss_mb: the process's peak resident memory while this method prefilled (the highest of its prefills).
        peak_delta_mb: that peak above the resident memory just before the prefill (the highest of its prefills).
        prefill_runs: wall time of each of the method's prefills, in the order they ran.
        widened_share: of the layer steps the selective decode path served, the share that rebuilt a widened budget
            (``sr_widen_below``); ``None`` where the method never decoded selectively.
    """

    method: str
    context: int
    decode_ms: float
    decode_vs_dense: float
    prefill_s: float
    prefill_vs_dense: float
    kv_bytes: int
    kv_bytes_decoded: int
    peak_rss_mb: float
    peak_delta_mb: float
    prefill_runs: list[float] = field(default_factory=list)
    widened_share: float | None = None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_memory() -> None:
    """Return freed heap pages to the OS, so the next method's resident memory starts from what is alive."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: resident memory may include freed pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakSampler:
    """The peak resident memory over a ``with`` block, in ``peak`` (MiB).

    Read from the kernel's high-water mark (``VmHWM``, reset on entry) where Linux allows it, so no thread runs
    beside the timed work; elsewhere sampled every 2 ms in a thread (which costs the timed threads a little).
    """

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakSampler:
        try:
            _reset_high_water()
        except RuntimeError:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak = max(self.peak, _high_water_mb())
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


#: The registry method that runs a config file's ``decode`` path (``--methods label=config.yaml``).
_FILE_METHODS = {"rebuild": "xkv", "absorb": "xkv-absorb", "selective": "xkv-selective"}
_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def bench_method(name: str) -> BenchMethod:
    """The setting a ``--methods`` entry names: one of :data:`BENCH_METHODS`, or ``label=config.yaml``.

    A config file is a whole configuration and runs as written (ranks, form, decode path, ``sr_*`` fields; the
    bench's own config does not apply to it), so two settings of one decode path (say two ``sr_budget`` values) can
    be timed side by side. Its prefill is one forward pass, as for the named methods other than ``*-chunked``.

    Raises:
        ValueError: for a name that is neither, or a label that is empty, a known name or not ``[A-Za-z0-9_.-]+``.
        FileNotFoundError: for a config file that does not exist.
    """
    if name in BENCH_METHODS:
        return BENCH_METHODS[name]
    label, sep, path = (part.strip() for part in name.partition("="))
    if not sep:
        raise ValueError(f"unknown bench method {name!r}; known: {list(BENCH_METHODS)} or label=config.yaml")
    if not _LABEL.fullmatch(label) or label in BENCH_METHODS or not path:
        raise ValueError(
            f"bench method {name!r}: want label=config.yaml with a new label of letters, digits, '_', '.' or '-' "
            "and a file"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"bench method {label!r}: no config file at {path!r}")
    config = XKVConfig.load(path)
    return BenchMethod(_FILE_METHODS[config.decode], config.to_dict())


def method_label(name: str) -> str:
    """What a method's rows are called: its name, or the label of ``label=config.yaml``."""
    return name.partition("=")[0].strip()


def check_methods(methods: list[str]) -> list[str]:
    """``methods`` with ``"dense"`` first (the reference), each resolved by :func:`bench_method`, labels unique."""
    methods = ["dense", *[m for m in methods if m != "dense"]]
    for method in methods:
        bench_method(method)
    labels = [method_label(m) for m in methods]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"bench methods named more than once: {repeated}")
    return methods


def _registry_method(method: str) -> Method:
    return METHODS[bench_method(method).method]()


def make_cache(model: nn.Module, method: str, config: XKVConfig | None = None) -> Any:
    """An empty cache of ``method`` for ``model`` (xKV methods take ``config``'s fields, then their own).

    Raises:
        ValueError: for a method :func:`bench_method` does not know.
        FileNotFoundError: for a ``label=config.yaml`` method whose file does not exist.
    """
    setting = bench_method(method)  # a config file is read once
    fields = setting.config
    base = XKVConfig.from_dict({**(config or XKVConfig()).to_dict(), **fields}) if fields else config
    return METHODS[setting.method]().new_cache(model, base)


def _prompt(model: nn.Module, length: int, seed: int) -> torch.Tensor:
    """``(1, length)`` random tokens, the same for every method at this length and seed."""
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed + length))


def text_prompt(tokenizer: Any, path: str | Path, length: int) -> torch.Tensor:
    """``(1, length)``: the first ``length`` tokens of a text file, a real-text prompt instead of random tokens.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file holds fewer than ``length`` tokens.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"text file {str(path)!r} holds {len(ids)} tokens, fewer than the longest length {length}")
    return torch.tensor([ids[:length]])


def _selective_share(cache: Any) -> float | None:
    counts = cache.selective_counts if isinstance(cache, XKVCache) else None
    return counts.widened_share if counts is not None and counts.steps else None


def cache_bytes(cache: Any) -> int:
    """Bytes a cache of any bench method holds, from its tensors."""
    if isinstance(cache, XKVCache):
        return cache.memory_report().held_bytes
    if type(cache) is DynamicCache:  # QuantizedCache subclasses it
        return tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    return quantized_cache_bytes(cache)


@torch.no_grad()
def run_bench(
    model: nn.Module,
    lengths: list[int],
    methods: list[str],
    steps: int = 20,
    seed: int = 0,
    config: XKVConfig | None = None,
    on_progress: Callable[[str], None] | None = None,
    prefill_repeats: int = 3,
    prompt: torch.Tensor | None = None,
) -> list[BenchRow]:
    """Measure every method at every length (see the module docstring).

    Args:
        model: a causal LM (the embedded SmolLM2-135M in the README's tables).
        lengths: context lengths in tokens.
        methods: names from :data:`BENCH_METHODS` or ``label=config.yaml`` (:func:`bench_method`); ``"dense"``
            is added first if missing (the reference).
        steps: decode steps timed per method (two more are run first as warm-up).
        seed: seed of the random prompt tokens.
        config: base xKV settings (ranks, groups, SR settings); the method picks ``decode``.
        on_progress: called with a short label after each prefill and each decode round.
        prefill_repeats: prefills per method and length, interleaved (round ``i`` runs every method once, the
            order rotated by ``i``, each method's previous cache dropped first); the median is reported (an odd
            count keeps it one measured run) and the last round's caches are decoded. The peak memory columns
            are the highest over the rounds: from the second round on, every other method's cache is alive.
        prompt: ``(1, n)`` token ids whose first ``length`` tokens are each length's prompt (real text,
            :func:`text_prompt`); random tokens if ``None``.

    Raises:
        ValueError: for an unknown method, a label named twice, a length below 1 or above the ``prompt``'s,
            ``steps < 1`` or ``prefill_repeats < 1``.
        FileNotFoundError: for a ``label=config.yaml`` method whose file does not exist.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1 but got {steps}")
    if prefill_repeats < 1:
        raise ValueError(f"`prefill_repeats` must be >= 1 but got {prefill_repeats}")
    if any(length < 1 for length in lengths):
        raise ValueError(f"context lengths must be >= 1 but got {lengths}")
    if prompt is not None and max(lengths) > prompt.shape[-1]:
        raise ValueError(f"the prompt holds {prompt.shape[-1]} tokens, fewer than the longest length {max(lengths)}")
    methods = check_methods(methods)
    report = on_progress or (lambda label: None)
    rows: list[BenchRow] = []
    for length in lengths:
        ids = _prompt(model, length, seed) if prompt is None else prompt[:, :length]
        prefilled = _prefill_rounds(model, ids, methods, config, prefill_repeats, report)
        kv = {method: cache_bytes(cache) for method, cache in prefilled.caches.items()}
        token = torch.tensor([[int(ids[0, -1])]])
        times = _decode_rounds(model, methods, prefilled.caches, token, steps, report, f"{length} tokens")
        kv_decoded = {method: cache_bytes(cache) for method, cache in prefilled.caches.items()}
        rows += _rows(length, methods, prefilled, times, kv, kv_decoded)
        del prefilled  # the caches go before the next length's prefills
    return rows


@dataclass
class _Prefilled:
    """One length's prefill rounds (:func:`_prefill_rounds`).

    Attributes:
        caches: per method, the cache of its last prefill (decoded next).
        runs: per method, the wall time of each prefill, in the order they ran.
        peaks: per method, the highest peak resident memory over its prefills and the highest peak above the
            memory just before one (MiB).
    """

    caches: dict[str, Any]
    runs: dict[str, list[float]]
    peaks: dict[str, tuple[float, float]]


def _prefill_rounds(
    model: nn.Module,
    prompt: torch.Tensor,
    methods: list[str],
    config: XKVConfig | None,
    repeats: int,
    report: Callable[[str], None],
) -> _Prefilled:
    """``repeats`` rounds, each prefilling ``prompt`` once per method; round ``i`` starts ``i`` methods later.

    A method's previous cache is dropped (and freed memory returned to the OS) before it prefills again, so its
    peak covers its own prefill's transients plus the cache it keeps (and every other method's live cache).
    """
    length = prompt.shape[1]
    registry = {method: _registry_method(method) for method in methods}
    chunks = {method: bench_method(method).prefill_chunk for method in methods}  # files read once, not timed
    done = _Prefilled({}, {method: [] for method in methods}, {method: (0.0, float("-inf")) for method in methods})
    for round_ in range(repeats):
        shift = round_ % len(methods)
        for method in methods[shift:] + methods[:shift]:
            done.caches.pop(method, None)
            _release_memory()
            before = _rss_mb()
            cache = make_cache(model, method, config)
            with _PeakSampler() as sampler:
                start = time.perf_counter()
                registry[method].prefill(model, prompt, cache, chunks[method])
                done.runs[method].append(time.perf_counter() - start)
            done.caches[method] = cache
            del cache  # only `caches` holds it: the next round's pop frees it
            peak, delta = done.peaks[method]
            done.peaks[method] = (max(peak, sampler.peak), max(delta, sampler.peak - before))
            report(f"{length} tokens: {method_label(method)} prefill {round_ + 1}/{repeats}")
    return done


def _decode_rounds(
    model: nn.Module,
    methods: list[str],
    caches: dict[str, Any],
    token: torch.Tensor,
    steps: int,
    report: Callable[[str], None],
    label: str,
) -> dict[str, list[float]]:
    """``steps + 2`` rounds of one decode step per method in turn, the same ``token`` each time; two untimed first.

    Returns:
        Per method, the wall time of each timed step (s).
    """
    times: dict[str, list[float]] = {method: [] for method in methods}
    for step in range(steps + 2):
        for method in methods:
            start = time.perf_counter()
            decode_one_token(model, token, caches[method])
            if step >= 2:
                times[method].append(time.perf_counter() - start)
        report(f"{label}: decode step {step + 1}/{steps + 2}")
    return times


def _rows(
    length: int,
    methods: list[str],
    prefilled: _Prefilled,
    times: dict[str, list[float]],
    kv: dict[str, int],
    kv_decoded: dict[str, int],
) -> list[BenchRow]:
    """One row per method at ``length``: medians, and each against the dense cache's."""
    dense_ms = statistics.median(times["dense"]) * 1e3
    dense_prefill = statistics.median(prefilled.runs["dense"])
    rows = []
    for method in methods:
        ms = statistics.median(times[method]) * 1e3
        prefill_s = statistics.median(prefilled.runs[method])
        rows.append(
            BenchRow(
                method=method_label(method),
                context=length,
                decode_ms=ms,
                decode_vs_dense=ms / dense_ms,
                prefill_s=prefill_s,
                prefill_vs_dense=prefill_s / dense_prefill,
                kv_bytes=kv[method],
                kv_bytes_decoded=kv_decoded[method],
                peak_rss_mb=prefilled.peaks[method][0],
                peak_delta_mb=prefilled.peaks[method][1],
                prefill_runs=prefilled.runs[method],
                widened_share=_selective_share(prefilled.caches[method]),
            )
        )
    return rows


def write_report(rows: list[BenchRow], out_dir: str | Path, command: str) -> Path:
    """Write ``results.json``, ``results.md`` and ``decode_ms.png`` (ms per step against context) to ``out_dir``.

    Returns:
        The Markdown file's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    lines = [
        "| context | method | decode ms/step | vs dense | prefill s (median, range) | vs dense | KV MiB after prefill "
        "| KV MiB after decode | prefill peak RSS MiB | peak above start MiB | widened steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        widened = "-" if r.widened_share is None else f"{100 * r.widened_share:.0f}%"
        lines.append(
            f"| {r.context} | {r.method} | {r.decode_ms:.1f} | {r.decode_vs_dense:.2f}x | {_prefill_cell(r)} | "
            f"{r.prefill_vs_dense:.2f}x | {r.kv_bytes / 2**20:.1f} | {r.kv_bytes_decoded / 2**20:.1f} | "
            f"{r.peak_rss_mb:.0f} | {r.peak_delta_mb:.0f} | {widened} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    points = [(r.method, r.context, r.decode_ms) for r in rows]
    _plot_by_method(points, "decode ms per step (median)", "Decode step against context length", out / "decode_ms.png")
    return path


def _prefill_cell(row: BenchRow) -> str:
    """The median prefill, with the range of its runs when there were several: ``"9.83 (9.71-10.12)"``."""
    if len(row.prefill_runs) < 2:
        return f"{row.prefill_s:.2f}"
    return f"{row.prefill_s:.2f} ({min(row.prefill_runs):.2f}-{max(row.prefill_runs):.2f})"


def _plot_by_method(points: list[tuple[str, int, float]], ylabel: str, title: str, path: Path) -> None:
    """A line per method through its `(method, context, value)` points; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the eval extra)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(m for m, _, _ in points):
        mine = [(context, value) for m, context, value in points if m == method]
        ax.plot([c for c, _ in mine], [v for _, v in mine], marker="o", label=method)
    ax.set_xlabel("context tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class PeakRow:
    """Peak resident memory of one method at one context length, measured in a fresh process.

    Attributes:
        method: a name from :data:`BENCH_METHODS`, or the label of ``label=config.yaml``.
        context: prompt tokens.
        start_mb: resident memory after the model was loaded and before the prefill (MiB).
        prefill_peak_mb: the process's peak resident memory up to the end of the prefill (MiB).
        peak_mb: the peak after the decode steps too (MiB).
        kv_bytes: bytes the cache holds after the prefill (from its tensors).
        decode_steps: decode steps run after the prefill.
    """

    method: str
    context: int
    start_mb: float
    prefill_peak_mb: float
    peak_mb: float
    kv_bytes: int
    decode_steps: int


def _high_water_mb() -> float:
    """The process's peak resident memory so far (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_high_water() -> None:
    """Reset ``VmHWM`` to the current resident memory (Linux ``clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak resident memory (/proc/self/clear_refs): {err}") from err


@torch.no_grad()
def measure_peak(
    model: nn.Module,
    method: str,
    length: int,
    seed: int = 0,
    config: XKVConfig | None = None,
    decode_steps: int = 4,
) -> PeakRow:
    """Prefill a random prompt with ``method`` in this process and read its peak resident memory.

    Meant for a fresh process that has only loaded ``model`` (:func:`run_peak_bench` starts one per measurement):
    after a 16-token forward pass that pages every weight in, the peak is reset, so it covers the prefill and
    ``decode_steps`` decode steps only. Linux only.

    Raises:
        ValueError: for an unknown method or a length below 1.
        FileNotFoundError: for a ``label=config.yaml`` method whose file does not exist.
        RuntimeError: where ``/proc/self/clear_refs`` cannot be written.
    """
    if length < 1:
        raise ValueError(f"context length must be >= 1 but got {length}")
    prompt = _prompt(model, length, seed)
    # Touch every weight first (a loaded model may be paged in lazily at its first forward pass).
    prefill(model, prompt[:, :16], DynamicCache())
    cache = make_cache(model, method, config)
    registered, chunk = _registry_method(method), bench_method(method).prefill_chunk  # before the peak is reset
    _release_memory()
    _reset_high_water()
    start = _rss_mb()
    registered.prefill(model, prompt, cache, chunk)
    prefill_peak = _high_water_mb()
    kv = cache_bytes(cache)
    token = prompt[:, -1:]
    for _ in range(decode_steps):
        decode_one_token(model, token, cache)
    # The kernel's RSS counters are batched per thread: a later read can come out a few hundred KiB lower.
    peak = max(prefill_peak, _high_water_mb())
    return PeakRow(method_label(method), length, start, prefill_peak, peak, kv, decode_steps)


def run_peak_bench(
    model_name: str,
    lengths: list[int],
    methods: list[str],
    seed: int = 0,
    config_path: str | None = None,
    threads: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> list[PeakRow]:
    """:func:`measure_peak` for every method and length, each in a fresh ``python -m xkv.bench`` process.

    Args:
        model_name: what :func:`xkv.models.load` takes (the child loads it).
        lengths: context lengths in tokens.
        methods: names from :data:`BENCH_METHODS` or ``label=config.yaml`` (:func:`bench_method`); ``"dense"``
            is added first if missing (the reference).
        seed: seed of the random prompt tokens.
        config_path: xKV config file for the xKV methods.
        threads: torch threads in each child (0: torch's default).
        on_progress: called with a short label after each measurement.

    Raises:
        ValueError: for an unknown method, a label named twice or a length below 1.
        FileNotFoundError: for a ``label=config.yaml`` method whose file does not exist.
        RuntimeError: if a child process fails (its error output is in the message).
    """
    methods = check_methods(methods)
    if any(length < 1 for length in lengths):
        raise ValueError(f"context lengths must be >= 1 but got {lengths}")
    rows = []
    for length in lengths:
        for method in methods:
            command = [
                sys.executable, "-m", "xkv.bench", "--model", model_name, "--method", method,
                "--length", str(length), "--seed", str(seed), "--threads", str(threads),
            ]  # fmt: skip
            if config_path:
                command += ["--config", config_path]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{method_label(method)} at {length} tokens failed:\n{done.stderr[-2000:]}")
            rows.append(PeakRow(**json.loads(done.stdout.strip().splitlines()[-1])))
            if on_progress:
                on_progress(f"{length} tokens: {method_label(method)}")
    return rows


def write_peak_report(rows: list[PeakRow], out_dir: str | Path, command: str) -> Path:
    """Write ``results.json``, ``results.md`` and ``peak_mb.png`` (peak against context) to ``out_dir``.

    The Markdown table compares each method's peak with the dense cache's at the same length, next to half the
    KV bytes it saves (the bar of the peak-memory issue: the peak should fall by at least that much).

    Returns:
        The Markdown file's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    dense = {r.context: r for r in rows if r.method == "dense"}
    lines = [
        "| context | method | KV MiB | KV saved MiB | start MiB | prefill peak MiB | peak with decode MiB "
        "| peak below dense MiB | half the KV saved MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = dense.get(r.context)
        saved = (ref.kv_bytes - r.kv_bytes) / 2**20 if ref else float("nan")
        below = ref.peak_mb - r.peak_mb if ref else float("nan")
        lines.append(
            f"| {r.context} | {r.method} | {r.kv_bytes / 2**20:.1f} | {saved:.1f} | {r.start_mb:.0f} | "
            f"{r.prefill_peak_mb:.0f} | {r.peak_mb:.0f} | {below:.0f} | {saved / 2:.0f} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    points = [(r.method, r.context, r.peak_mb) for r in rows]
    ylabel, title = "peak resident memory, MiB (fresh process)", "Peak process memory against context length"
    _plot_by_method(points, ylabel, title, out / "peak_mb.png")
    return path


def _main(argv: list[str] | None = None) -> None:
    """One :func:`measure_peak` in this process; prints its row as one JSON line (for :func:`run_peak_bench`)."""
    import argparse

    from xkv.models import load

    parser = argparse.ArgumentParser(prog="python -m xkv.bench", description=_main.__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", required=True, help="a bench method or label=config.yaml")
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = XKVConfig.load(args.config) if args.config else None
    model, _ = load(args.model)
    row = measure_peak(model, args.method, args.length, seed=args.seed, config=config)
    sys.stdout.write(json.dumps(asdict(row)) + "\n")


if __name__ == "__main__":
    _main()
