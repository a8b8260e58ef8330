"""Choose Selective Reconstruction's defaults on calibration samples (seeds the reports never use).

For each sample of the RULER-lite tasks given, one dense prefill; per chunk setting one full-rank xKV factorization
(the landmarks depend on it); every budget and target factor is then a free copy (``XKVCache.with_ranks``). Prints
and writes the mean score per setting, with the rebuild path's score as the reference.

    .venv/bin/python benchmarks/decode/calibrate_sr.py --tasks niah_single_2,niah_multikey_1 --samples 10 \
        --first-seed 100 --out benchmarks/decode/calibration.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.evaluation.methods import SampleContext, answer_through, xkv_config_for
from xkv.evaluation.tasks import generate, string_match_all
from xkv.generation import prefill
from xkv.models import load, stop_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_single_2,niah_multikey_1")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--ratios", default="4,8")
    parser.add_argument("--chunks", default="8,16", help="chunk sizes")
    parser.add_argument("--budgets", default="128,256,512", help="token budgets")
    parser.add_argument("--out", default="benchmarks/decode/calibration.json")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load()
    stops = stop_token_ids(tokenizer)
    ratios = [float(r) for r in args.ratios.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    scores: dict[str, list[float]] = {}
    for task, i in itertools.product(args.tasks.split(","), range(args.samples)):
        encoded = generate(
            task, tokenizer, args.length, args.first_seed + i, num_samples_hint=args.samples, sample_index=i
        )
        ctx = SampleContext(
            model, torch.tensor([encoded.context_ids]), torch.tensor([encoded.question_ids]), stops, 48
        )
        dense = DynamicCache()
        prefill(model, ctx.context_ids, dense)
        kv = [(layer.keys, layer.values) for layer in dense.layers]
        for chunk in chunks:
            base = XKVConfig(sr_chunk_size=chunk, rank_k=1.0, rank_v=1.0, min_tokens=0)
            full = XKVCache.from_dense(model, kv, base)
            for ratio in ratios:
                settings = [("rebuild", "rebuild", 256)] if chunk == chunks[0] else []
                settings += [(f"selective c{chunk} b{b}", "selective", b) for b in budgets]
                for name, decode, budget in settings:
                    config = xkv_config_for(
                        ratio, XKVConfig.from_dict({**base.to_dict(), "decode": decode, "sr_budget": budget})
                    )
                    cache = full.with_ranks(config)
                    answer = tokenizer.decode(answer_through(ctx, cache), skip_special_tokens=True)
                    scores.setdefault(f"{name} @{ratio:g}x", []).append(
                        string_match_all(answer, encoded.sample.answers)
                    )
        print(task, i, {k: round(100 * sum(v) / len(v), 1) for k, v in scores.items()}, flush=True)
    summary = {k: 100 * sum(v) / len(v) for k, v in scores.items()}
    Path(args.out).write_text(json.dumps({"args": vars(args), "mean_score": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
