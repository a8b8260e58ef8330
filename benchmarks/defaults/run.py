"""Needle benchmark that chose XKVConfig's defaults: several 4x configurations side by side on SmolLM2-135M.

Each sample is prefilled once with a dense cache; every configuration compresses that finished cache
(``XKVCache.from_dense``, equal to compressing during the prefill: tests/test_cache.py), and answers by decoding
through ``XKVCache.materialize()`` (the same attention as decoding through the cache: tests/test_cache.py) at dense
speed. Byte figures come from the real cache's ``memory_report()``. Results are appended to ``results.jsonl``
(a rerun resumes) and summarised in ``results.md``.

    .venv/bin/python benchmarks/defaults/run.py --samples 20 --context-tokens 4000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.generation import greedy_generate, prefill
from xkv.models import load, stop_token_ids
from xkv.prompts import is_correct, needle_sample

HERE = Path(__file__).parent
CONFIGS = {
    "G=8 K@8x V@2.67x": XKVConfig(group_size=8, rank_k="8x", rank_v="2.67x"),
    "G=8 K@6x V@3x": XKVConfig(group_size=8, rank_k="6x", rank_v="3x"),
    "G=8 K@4x V@4x": XKVConfig(group_size=8, rank_k="4x", rank_v="4x"),
    "G=8 K@2.67x V@8x": XKVConfig(group_size=8, rank_k="2.67x", rank_v="8x"),
    "G=4 K@8x V@2.67x": XKVConfig(group_size=4, rank_k="8x", rank_v="2.67x"),
    "G=1 K@8x V@2.67x": XKVConfig(group_size=1, rank_k="8x", rank_v="2.67x"),
}


def answer(model, tokenizer, cache, question, stops, max_new_tokens):
    generation = greedy_generate(model, question, cache, max_new_tokens, stops)
    return tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    model, tokenizer = load("smollm2-135m")
    stops = stop_token_ids(tokenizer)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["seed"], row["method"], row["context_tokens"]))
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.samples):
        methods = ["full", *CONFIGS]
        if all((seed, m, args.context_tokens) in done for m in methods):
            continue
        sample = needle_sample(tokenizer, args.context_tokens, seed=seed)
        context = torch.tensor([sample.context_ids])
        question = torch.tensor([sample.question_ids])
        dense = DynamicCache()
        prefill(model, context, dense)
        keys_values = [(layer.keys, layer.values) for layer in dense.layers]
        rows = []
        for method in methods:
            if (seed, method, args.context_tokens) in done:
                continue
            t0 = time.perf_counter()
            if method == "full":
                cache, factor = DynamicCache(), 1.0
                for layer_idx, (k, v) in enumerate(keys_values):
                    cache.update(k.clone(), v.clone(), layer_idx)
            else:
                xkv = XKVCache.from_dense(model, keys_values, CONFIGS[method])
                factor = xkv.memory_report().compression_factor
                cache = xkv.materialize()
                del xkv
            text = answer(model, tokenizer, cache, question, stops, args.max_new_tokens)
            rows.append(
                {
                    "seed": seed,
                    "context_tokens": args.context_tokens,
                    "tokens": len(sample.context_ids),
                    "method": method,
                    "compression_factor": factor,
                    "correct": is_correct(text, sample.answer),
                    "answer": text,
                    "expected": sample.answer,
                    "seconds": time.perf_counter() - t0,
                }
            )
        with args.out.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"seed {seed}: " + ", ".join(f"{r['method']}={int(r['correct'])}" for r in rows), flush=True)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    summarize(args.out, args.context_tokens)


def summarize(path: Path, context_tokens: int) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["context_tokens"] == context_tokens]
    lines = [
        f"Written by `.venv/bin/python benchmarks/defaults/run.py --context-tokens {context_tokens}` "
        f"(see README.md here).",
        "",
        f"| method ({context_tokens} context tokens) | correct | accuracy +- s.e. | measured compression |",
        "|---|---|---|---|",
    ]
    for method in ["full", *CONFIGS]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        n, k = len(mine), sum(r["correct"] for r in mine)
        p = k / n
        factor = sum(r["compression_factor"] for r in mine) / n
        lines.append(f"| {method} | {k}/{n} | {p:.2f} +- {math.sqrt(p * (1 - p) / n):.2f} | {factor:.2f}x |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
