"""Where a Selective Reconstruction decode step (or, with --prefill, the prefill) goes, by xkv function.

.venv/bin/python benchmarks/decode/profile_selective.py --config benchmarks/heldout/default-selective.yaml
.venv/bin/python benchmarks/decode/profile_selective.py --config benchmarks/heldout/default-selective.yaml --prefill

Decode: prefills a random-token prompt into ``XKVCache(model, config)``, runs one warm-up step, then profiles
``--steps`` steps with torch.profiler, each xkv function below a labelled range, and prints milliseconds per step.
Prefill: times a dense prefill and the xKV one, and the seconds spent in the factorization's functions.
"""

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import DynamicCache

import xkv.cache.side as side
import xkv.cache.store as store
import xkv.decode as decode
import xkv.factorization as factorization
import xkv.forms as forms
from xkv import XKVCache, XKVConfig
from xkv.cache import decoding
from xkv.compat import cache_kwargs
from xkv.generation import prefill
from xkv.models import load


def labelled(fn: Callable[..., Any], label: str, seconds: dict[str, float] | None) -> Callable[..., Any]:
    """``fn`` inside a profiler range named ``label`` (and its wall time added to ``seconds[label]``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        with record_function(label):
            try:
                return fn(*args, **kwargs)
            finally:
                if seconds is not None:
                    seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="xKV config file (default: XKVConfig())")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill", action="store_true", help="time the prefill's parts instead of decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    for cls, name in [(forms.QuantizedFactors, "chunk_rows"), (forms.QuantizedFactors, "matrix"),
                      (decode.SelectiveIndex, "landmark_scores"), (decoding.Selective, "attend"),
                      (factorization.LowRankFactors, "stored")]:  # fmt: skip
        setattr(cls, name, labelled(getattr(cls, name), f"xkv:{name}", seconds))
    for module, name, users in [(decode, "select_chunks", [decode]), (decode, "select_shared_chunks", [decode]),
                                (decode, "rope_rows", [decode]), (decode, "softmax_blocks", [decode]),
                                (factorization, "cross_layer_svd", [side]), (forms, "choose_head", [side]),
                                (decode, "build_selective_index", [store])]:  # fmt: skip
        wrapped = labelled(getattr(module, name), f"xkv:{name}", seconds)
        for user in (module, *users):
            setattr(user, name, wrapped)
    model, _ = load()
    config = XKVConfig.load(args.config) if args.config else XKVConfig()
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    if args.prefill:
        start = time.perf_counter()
        prefill(model, ids, DynamicCache())
        dense = time.perf_counter() - start
        seconds.clear()
        start = time.perf_counter()
        prefill(model, ids, XKVCache(model, config))
        print(f"prefill: dense {dense:.2f} s, xKV {time.perf_counter() - start:.2f} s")
        for label, spent in sorted(seconds.items(), key=lambda item: -item[1]):
            print(f"{label:28s} {spent:8.2f} s")
        return
    cache = XKVCache(model, config)
    token = prefill(model, ids, cache).argmax(-1).view(1, 1)
    with torch.no_grad():
        model(token, use_cache=True, **cache_kwargs(cache))  # warm-up: builds the RoPE table and workspace
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                token = model(token, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / args.steps / 1000
    print(f"decode step: {total:.1f} ms (profiled)")
    for event in sorted((e for e in events if e.key.startswith("xkv:")), key=lambda e: -e.cpu_time_total):
        print(f"{event.key:28s} {event.cpu_time_total / args.steps / 1000:8.2f} ms/step  ({event.count} calls)")


if __name__ == "__main__":
    main()
