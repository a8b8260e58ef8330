"""How far a compressed cache moves the answer: KL(full || config) along the full cache's own answer.

Exact-match scores move one sample at a time; this measures every answer token. For each calibration sample: the
full cache answers greedily; then each config's cache (at a target factor, ranks as ``xkv eval`` sets them) is fed
the same question and the same answer tokens (teacher forcing), and at every answer position the KL divergence of
its next-token distribution from the full cache's is taken. Prints one JSON line per sample and writes a summary
(mean KL per config, and how often its top token differs from the full cache's).

    .venv/bin/python benchmarks/heldout/answer_kl.py --samples niah_single_3:1002,prose_needle:1002 \
        --configs absorb=benchmarks/heldout/default.yaml,c2=benchmarks/heldout/candidates/i4-sel-c2.yaml \
        --ratio 4 --out benchmarks/heldout/answer-kl/run.json

Only calibration seeds (1000 and up) belong here: it is a tool for choosing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.cli.common import quiet_library_output
from xkv.evaluation.methods import xkv_config_for
from xkv.evaluation.tasks import generate
from xkv.generation import cache_step, decode_n_tokens, prefill
from xkv.models import load, stop_token_ids


@torch.no_grad()
def forced_log_probs(model, cache, question: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """``(len(answer), vocab)`` log-probabilities before each answer token, the question then the answer fed."""
    step = cache_step(model, cache)
    logits = step(question)
    out = []
    for token in answer:
        out.append(torch.log_softmax(logits[0].float(), dim=-1))
        logits = step(torch.tensor([[token]], device=question.device))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", required=True, help="comma list of task:seed (calibration seeds)")
    parser.add_argument("--configs", required=True, help="comma list of label=config.yaml")
    parser.add_argument("--ratio", type=float, default=4.0, help="target compression factor")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    samples = [(task, int(seed)) for task, seed in (item.split(":") for item in args.samples.split(","))]
    if any(seed < 1000 for _, seed in samples):
        parser.error("report seeds (0-999) are not for choosing: use calibration seeds (1000 and up)")
    configs = {}
    for item in args.configs.split(","):
        label, path = item.split("=", 1)
        configs[label] = XKVConfig.from_dict(yaml.safe_load(Path(path).read_text()))
    quiet_library_output(args.threads)
    model, tokenizer = load()
    stops = stop_token_ids(tokenizer)
    rows = []
    for task, seed in samples:
        encoded = generate(task, tokenizer, args.length, seed)
        context = torch.tensor([list(encoded.context_ids)])
        question = torch.tensor([list(encoded.question_ids)], dtype=torch.long).reshape(1, -1)
        dense = DynamicCache()
        prefill(model, context, dense)
        logits = cache_step(model, dense)(question)
        answer = decode_n_tokens(cache_step(model, dense), logits, args.max_new_tokens, stops).tokens
        full = DynamicCache()
        prefill(model, context, full)
        states = [(layer.keys, layer.values) for layer in full.layers]
        reference = forced_log_probs(model, full, question, answer)
        row = {"sample": f"{task}:{seed}", "answer": tokenizer.decode(answer), "tokens": len(answer)}
        for label, base in configs.items():
            start = time.perf_counter()
            dense_copy = [(k.clone(), v.clone()) for k, v in states]
            cache = XKVCache.from_dense(model, dense_copy, xkv_config_for(args.ratio, base))
            ratio = cache.memory_report().compression_factor
            paths = sorted({store.decode_path(0) for store in cache.group_stores})
            log_probs = forced_log_probs(model, cache, question, answer)
            kl = (reference.exp() * (reference - log_probs)).sum(-1)
            row[label] = {
                "kl_mean": round(kl.mean().item(), 5),
                "kl_max": round(kl.max().item(), 4),
                "top1_differs": int((log_probs.argmax(-1) != reference.argmax(-1)).sum()),
                "ratio": round(ratio, 2),
                "paths": paths,
                "seconds": round(time.perf_counter() - start, 1),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        label: {
            "mean_kl": sum(r[label]["kl_mean"] for r in rows) / len(rows),
            "top1_differs": sum(r[label]["top1_differs"] for r in rows),
            "answer_tokens": sum(r["tokens"] for r in rows),
        }
        for label in configs
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary, "rows": rows},
                                   indent=1) + "\n")  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
