"""Relative error of int4 factors with and without an int8 head, at equal bytes (one group of SmolLM2 at 2k).

Run: ``.venv/bin/python benchmarks/frontier/head_split.py`` (its output is in README.md). One 2048-token random prompt
is prefilled with the embedded SmolLM2-135M; layers 8-15 (the second group of 8) are stacked, keys before RoPE. For
a byte budget of 1/f of the dense group (f = 12 for keys and 6 for values: 8x overall with keys twice as hard), the
first ``head`` directions are stored in int8 and as many further directions as fit in int4 (one float32 scale per
64 values, as ``xkv.forms`` stores them), and the relative Frobenius error of the rebuilt group is printed. The
``auto`` line is what ``factor_head="auto"`` picks from the spectrum.
"""

import torch
import transformers
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.factorization import LowRankFactors, cross_layer_svd
from xkv.forms import FactorFormat, choose_head
from xkv.generation import prefill
from xkv.models import load
from xkv.positions import unapply_rope

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)
model, _ = load("smollm2-135m")
TOKENS, LAYERS = 2048, range(8, 16)
prompt = torch.randint(0, 40000, (1, TOKENS), generator=torch.Generator().manual_seed(0))
dense = DynamicCache()
prefill(model, prompt, dense)
cos, sin = XKVCache(model, XKVConfig()).angles(torch.arange(TOKENS).unsqueeze(0))
fmt = FactorFormat("int4", 64)


def layer_states(side: str) -> list[torch.Tensor]:
    out = []
    for layer in LAYERS:
        keys, values = dense.layers[layer].keys, dense.layers[layer].values
        x = unapply_rope(keys, cos, sin) if side == "keys" else values
        out.append(x.transpose(1, 2).reshape(1, TOKENS, -1))
    return out


def error(states: list[torch.Tensor], factors: LowRankFactors, head: int) -> float:
    stored = factors.stored(fmt, head)
    num = sum(float((stored.layer(s) - x).pow(2).sum()) for s, x in enumerate(states))
    return (num / sum(float(x.pow(2).sum()) for x in states)) ** 0.5


for side, factor in (("keys", 12.0), ("values", 6.0)):
    states = layer_states(side)
    group, dim = len(states), states[0].shape[-1]
    budget = int(group * TOKENS * dim * 4 / factor)
    full = cross_layer_svd(states, min(TOKENS, group * dim))
    results = []
    for head in (0, 64, 128, 192, 256, 384):
        kept, rank = choose_head(full.token_basis, full.reconstruction, fmt, budget, heads=[head])
        if kept != head:
            results.append(f"head {head}: does not fit")
            continue
        results.append(f"head {head}: rank {rank}, error {error(states, full.truncate(rank), head):.3f}")
    head, rank = choose_head(full.token_basis, full.reconstruction, fmt, budget)
    results.append(f"auto (head {head}): rank {rank}, error {error(states, full.truncate(rank), head):.3f}")
    print(f"{side} at {factor:g}x: " + "; ".join(results))
