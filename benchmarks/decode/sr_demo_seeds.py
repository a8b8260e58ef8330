"""Answers of the demo's needle prompts (4k tokens) under several decode settings, from one prefill per seed.

Each seed's context is prefilled once into a dense cache and compressed by ``XKVCache.from_dense`` for every
setting (the same factors as compressing during the prefill); the question is appended and answered greedily.

    .venv/bin/python benchmarks/decode/sr_demo_seeds.py --seeds 0,1,2,3 \
        --settings '{"decode": "absorb"}' '{"decode": "selective"}' '{"decode": "selective", "sr_chunk_size": 8}'
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.generation import greedy_generate, prefill
from xkv.models import load, stop_token_ids
from xkv.prompts import is_correct, needle_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3", help="demo seeds, comma-separated")
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--settings", nargs="+", default=['{"decode": "selective"}'],
                        help="XKVConfig fields over the defaults, one JSON object per setting")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load("smollm2-135m")
    stops = stop_token_ids(tokenizer, "smollm2-135m")
    settings = [json.loads(text) for text in args.settings]
    for seed in (int(s) for s in args.seeds.split(",")):
        sample = needle_sample(tokenizer, args.context_tokens, seed=seed)
        dense = DynamicCache()
        prefill(model, torch.tensor([sample.context_ids]), dense)
        states = [(layer.keys, layer.values) for layer in dense.layers]
        print(f"seed {seed}: needle {sample.answer} at {sample.depth:.0%} of {len(sample.context_ids)} tokens")
        for fields in settings:
            cache = XKVCache.from_dense(model, states, XKVConfig(**fields))
            ratio = cache.memory_report().compression_factor  # the context's bytes, before any decode buffer
            generation = greedy_generate(model, torch.tensor([sample.question_ids]), cache, 24, stops)
            answer = tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
            mark = "correct" if is_correct(answer, sample.answer) else "wrong"
            print(f"  {json.dumps(fields)}: {answer!r} ({mark}, context at {ratio:.2f}x)")


if __name__ == "__main__":
    main()
