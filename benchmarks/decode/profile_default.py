"""Where the default's decode step goes: torch.profiler over decode steps at one context length.

.venv/bin/python benchmarks/decode/profile_default.py --tokens 4096 --steps 4 --threads 1

Prefills a random-token prompt into ``XKVCache(model, XKVConfig())`` (or ``--config FILE``), runs one warm-up step,
then profiles ``--steps`` decode steps and prints the operators by self CPU time.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from xkv import XKVCache, XKVConfig
from xkv.compat import cache_kwargs
from xkv.generation import prefill
from xkv.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default=None, help="xKV config file (default: XKVConfig())")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load()
    config = XKVConfig.load(args.config) if args.config else XKVConfig()
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    cache = XKVCache(model, config)
    token = prefill(model, ids, cache).argmax(-1).view(1, 1)  # the last position's logits
    with torch.no_grad():
        model(token, use_cache=True, **cache_kwargs(cache))  # warm-up: builds the RoPE table and workspace
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                token = model(token, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
