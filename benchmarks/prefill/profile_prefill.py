"""Where a compressing prefill spends its extra time: torch profiler totals of a dense and an xKV prefill, op by op.

Run: ``.venv/bin/python benchmarks/prefill/profile_prefill.py --lengths 4k,7k`` (``README.md`` in this folder has its
output). The embedded SmolLM2-135M prefills the bench's random prompt (``xkv.bench``) into a ``DynamicCache`` and
into the default ``XKVCache``, twice each in the order dense, xKV, dense, xKV; the second of each is profiled. Prints
the wall times and the ops whose self CPU time differs by more than 10 ms.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from xkv.bench import _prefill, _prompt, _release_memory, make_cache
from xkv.evaluation.runner import parse_lengths
from xkv.models import load


def profiled(model: torch.nn.Module, method: str, prompt: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Wall seconds of one prefill with ``method``, and each op's self CPU seconds."""
    _release_memory()
    cache = make_cache(model, method)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        _prefill(model, method, prompt, cache)
        wall = time.perf_counter() - start
    return wall, {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4k,7k", help="prompt lengths")
    args = parser.parse_args()
    model, _ = load()
    for length in parse_lengths(args.lengths):
        prompt = _prompt(model, length, 0)
        runs = {}
        for method in ("dense", "xkv-selective", "dense", "xkv-selective"):
            runs[method] = profiled(model, method, prompt)  # the second run of each is kept
        (dense_wall, dense), (xkv_wall, xkv) = runs["dense"], runs["xkv-selective"]
        extra = sum(xkv.values()) - sum(dense.values())
        print(f"\n{length} tokens: dense {dense_wall:.2f} s, xKV {xkv_wall:.2f} s (+{xkv_wall / dense_wall - 1:.1%})")
        print(f"self CPU time: dense {sum(dense.values()):.2f} s, xKV {sum(xkv.values()):.2f} s (+{extra:.2f} s)\n")
        print("| op | dense s | xKV s | difference s |")
        print("|---|---|---|---|")
        for name in sorted(set(dense) | set(xkv), key=lambda n: xkv.get(n, 0) - dense.get(n, 0), reverse=True):
            diff = xkv.get(name, 0.0) - dense.get(name, 0.0)
            if abs(diff) > 0.01:
                print(f"| `{name}` | {dense.get(name, 0.0):.3f} | {xkv.get(name, 0.0):.3f} | {diff:+.3f} |")


if __name__ == "__main__":
    main()
