"""``xkv bench``: decode speed, prefill time, KV bytes and peak memory of every cache, side by side in one process.

For each context length every method prefills the same random-token prompt (one after another), then the decode
steps are interleaved (one step of each method in turn), so a noisy machine slows every method alike. Reported per
method and length: the median decode step, the prefill time, the KV bytes held after the prefill (measured from the
tensors) and the process's resident memory: its peak while that method prefilled, and that peak above the resident
memory just before (the prefill's transients plus the cache it keeps).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from xkv.baselines.quantized import quantized_cache, quantized_cache_bytes
from xkv.cache import XKVCache
from xkv.compat import cache_kwargs
from xkv.config import XKVConfig
from xkv.memory import tensor_bytes

#: xKV methods of the bench: config fields set over the bench's config.
XKV_VARIANTS: dict[str, dict[str, Any]] = {
    "xkv-rebuild": {"decode": "rebuild"},
    "xkv-absorb": {"decode": "absorb"},
    "xkv-selective": {"decode": "selective"},
    # The absorb path with a randomized SVD of one power iteration (benchmarks/prefill).
    "xkv-rsvd": {"decode": "absorb", "svd": "randomized", "svd_niter": 1},
    # The absorb path with int4 factors (int8 head from the spectrum); ranks count the packed bytes.
    "xkv-int4": {"decode": "absorb", "factor_form": "int4"},
    # The context fed in chunks of PREFILL_CHUNK tokens, each folded into the factors (incremental SVD).
    "xkv-chunked": {"decode": "absorb", "fold_tokens": 512, "fold_keep": 0, "fold_headroom": True},
}
#: Tokens per forward pass of the prefill, for methods that take their context in chunks.
PREFILL_CHUNK = {"xkv-chunked": 512}
#: Methods ``xkv bench`` knows, in report order.
BENCH_METHODS = ("dense", "quantized-int4", *XKV_VARIANTS)


@dataclass
class BenchRow:
    """One method at one context length.

    Attributes:
        method: a name from :data:`BENCH_METHODS`.
        context: prompt tokens.
        decode_ms: median wall time of one decode step.
        decode_vs_dense: ``decode_ms`` over the dense cache's in the same run.
        prefill_s: wall time of the prefill (compression included).
        prefill_vs_dense: ``prefill_s`` over the dense cache's.
        kv_bytes: bytes the cache holds after the prefill (from its tensors).
        kv_bytes_decoded: bytes it holds after the timed decode steps (tail buffers and decode workspaces too).
        peak_rss_mb: the process's peak resident memory while this method prefilled.
        peak_delta_mb: that peak above the resident memory just before the prefill.
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_memory() -> None:
    """Return freed heap pages to the OS, so the next method's resident memory starts from what is alive."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: resident memory may include freed pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakSampler:
    """Samples resident memory every 2 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def make_cache(model: nn.Module, method: str, config: XKVConfig | None = None) -> Any:
    """An empty cache of ``method`` for ``model`` (xKV methods take ``config``'s fields, their own ``decode``).

    Raises:
        ValueError: for a method not in :data:`BENCH_METHODS`.
    """
    if method == "dense":
        return DynamicCache()
    if method == "quantized-int4":
        return quantized_cache(model, 4)
    if method in XKV_VARIANTS:
        base = (config or XKVConfig()).to_dict()
        return XKVCache(model, XKVConfig.from_dict({**base, **XKV_VARIANTS[method]}))
    raise ValueError(f"unknown bench method {method!r}; known: {list(BENCH_METHODS)}")


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
) -> list[BenchRow]:
    """Measure every method at every length (see the module docstring).

    Args:
        model: a causal LM (the embedded SmolLM2-135M in the README's tables).
        lengths: context lengths in tokens.
        methods: names from :data:`BENCH_METHODS`; ``"dense"`` is added first if missing (the reference).
        steps: decode steps timed per method (two more are run first as warm-up).
        seed: seed of the random prompt tokens.
        config: base xKV settings (ranks, groups, SR budget); the method picks ``decode``.
        on_progress: called with a short label after each prefill and each decode round.

    Raises:
        ValueError: for an unknown method, a length below 1 or ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1 but got {steps}")
    if any(length < 1 for length in lengths):
        raise ValueError(f"context lengths must be >= 1 but got {lengths}")
    methods = ["dense", *[m for m in methods if m != "dense"]]
    for method in methods:
        if method not in BENCH_METHODS:
            raise ValueError(f"unknown bench method {method!r}; known: {list(BENCH_METHODS)}")
    vocab = model.config.get_text_config().vocab_size
    rows: list[BenchRow] = []
    for length in lengths:
        generator = torch.Generator().manual_seed(seed + length)
        prompt = torch.randint(0, vocab, (1, length), generator=generator)
        caches: dict[str, Any] = {}
        prefill_s: dict[str, float] = {}
        peaks: dict[str, tuple[float, float]] = {}
        for method in methods:
            _release_memory()
            before = _rss_mb()
            cache = make_cache(model, method, config)
            with _PeakSampler() as sampler:
                start = time.perf_counter()
                for part in prompt.split(PREFILL_CHUNK.get(method, length), dim=1):
                    model(part, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
                if method in PREFILL_CHUNK:
                    cache.fold(0)  # the last chunk too, and the factors trimmed to the target ranks
                prefill_s[method] = time.perf_counter() - start
            caches[method], peaks[method] = cache, (sampler.peak, sampler.peak - before)
            if on_progress:
                on_progress(f"{length} tokens: {method} prefill")
        kv = {method: cache_bytes(cache) for method, cache in caches.items()}
        times: dict[str, list[float]] = {method: [] for method in methods}
        token = torch.tensor([[int(prompt[0, -1])]])
        for step in range(steps + 2):
            for method in methods:
                start = time.perf_counter()
                model(token, use_cache=True, logits_to_keep=1, **cache_kwargs(caches[method]))
                if step >= 2:
                    times[method].append(time.perf_counter() - start)
            if on_progress:
                on_progress(f"{length} tokens: decode step {step + 1}/{steps + 2}")
        kv_decoded = {method: cache_bytes(cache) for method, cache in caches.items()}
        dense_ms = statistics.median(times["dense"]) * 1e3
        for method in methods:
            ms = statistics.median(times[method]) * 1e3
            rows.append(
                BenchRow(
                    method=method,
                    context=length,
                    decode_ms=ms,
                    decode_vs_dense=ms / dense_ms,
                    prefill_s=prefill_s[method],
                    prefill_vs_dense=prefill_s[method] / prefill_s["dense"],
                    kv_bytes=kv[method],
                    kv_bytes_decoded=kv_decoded[method],
                    peak_rss_mb=peaks[method][0],
                    peak_delta_mb=peaks[method][1],
                )
            )
        del caches
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
        "| context | method | decode ms/step | vs dense | prefill s | vs dense | KV MiB after prefill "
        "| KV MiB after decode | prefill peak RSS MiB | peak above start MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.context} | {r.method} | {r.decode_ms:.1f} | {r.decode_vs_dense:.2f}x | {r.prefill_s:.2f} | "
            f"{r.prefill_vs_dense:.2f}x | {r.kv_bytes / 2**20:.1f} | {r.kv_bytes_decoded / 2**20:.1f} | "
            f"{r.peak_rss_mb:.0f} | {r.peak_delta_mb:.0f} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the eval extra)
        return path
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        ax.plot([r.context for r in mine], [r.decode_ms for r in mine], marker="o", label=method)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode ms per step (median)")
    ax.set_title("Decode step against context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode_ms.png", dpi=120)
    plt.close(fig)
    return path
