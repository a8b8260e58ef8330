"""A long generation with tail folding: the exact tail stays bounded while the factors grow with the sequence.

Prefills a ~2k-token document into an ``XKVCache`` (default ranks, ``fold_tokens``/``fold_keep`` set), then decodes
``--steps`` tokens greedily through it, recording every ``--every`` steps the tail length, the bytes held
(``memory_report()``, measured from the tensors) and what a dense cache would hold at that length. Writes
``long_generation.json`` and ``long_generation.md`` next to this file.

    .venv/bin/python benchmarks/memory/long_generation.py --steps 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from xkv import XKVCache, XKVConfig
from xkv.compat import cache_kwargs
from xkv.memory import dense_kv_bytes
from xkv.models import load
from xkv.prompts import needle_sample

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--fold-tokens", type=int, default=256)
    parser.add_argument("--fold-keep", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load("smollm2-135m")
    sample = needle_sample(tokenizer, args.context_tokens, seed=0)
    ids = torch.tensor([sample.context_ids])
    config = XKVConfig(fold_tokens=args.fold_tokens, fold_keep=args.fold_keep)
    cache = XKVCache(model, config)
    spec = cache.spec
    logits = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits
    rows, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        token = logits[:, -1:].argmax(-1)
        logits = model(token, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits
        if step % args.every == 0 or step == args.steps:
            report = cache.memory_report()
            length = cache.get_seq_length()
            dense = dense_kv_bytes(1, length, spec.num_layers, spec.kv_dim, torch.float32)
            rows.append(
                {
                    "step": step,
                    "tokens": length,
                    "tail_tokens": max(layer.tail()[0].shape[-2] for layer in cache.layers),
                    "held_mib": report.held_bytes / 2**20,
                    "factor_mib": sum(g.held_bytes for g in report.groups) / 2**20,
                    "tail_mib": report.tail_bytes / 2**20,
                    "dense_mib": dense / 2**20,
                    "ratio": dense / report.held_bytes,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(json.dumps(rows[-1]), flush=True)  # noqa: T201  (a script's progress)
    command = "python benchmarks/memory/long_generation.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    (HERE / "long_generation.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "| step | tokens | tail tokens | KV MiB held | of which factors | of which tail | dense MiB | ratio |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['step']} | {r['tokens']} | {r['tail_tokens']} | {r['held_mib']:.1f} | {r['factor_mib']:.1f} | "
            f"{r['tail_mib']:.1f} | {r['dense_mib']:.1f} | {r['ratio']:.2f}x |"
            for r in rows
        ),
        "",
        f"Command: `{command}`",
        "",
    ]
    (HERE / "long_generation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
