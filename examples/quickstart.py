"""Quick start: compress a long document's KV-cache with xKV, then ask about it (README, "Quick start").

.venv/bin/python examples/quickstart.py
"""

import torch
import transformers

from xkv import XKVCache, XKVConfig
from xkv.compat import cache_kwargs
from xkv.generation import greedy_generate, prefill
from xkv.models import load, stop_token_ids
from xkv.prompts import needle_sample

transformers.utils.logging.disable_progress_bar()
model, tokenizer = load()  # the embedded SmolLM2-135M; or a transformers model id or local path
sample = needle_sample(tokenizer, 3000, seed=1)  # a generated ~3000-token document hiding one number

# 1. With model.generate(): the whole prompt (document and question) is prefilled, then compressed.
prompt = torch.tensor([sample.context_ids + sample.question_ids])
cache = XKVCache(model, XKVConfig())  # the defaults: groups of 8 layers, keys at 6x, values at 3x
out = model.generate(
    prompt,
    attention_mask=torch.ones_like(prompt),
    max_new_tokens=30,
    do_sample=False,
    pad_token_id=tokenizer.pad_token_id,
    **cache_kwargs(cache),
)
print("generate():", tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))

# 2. Compress the document alone, then ask: the question and the answer stay exact in the cache's tail.
cache = XKVCache(model)
prefill(model, torch.tensor([sample.context_ids]), cache)
report = cache.memory_report()
print(
    f"document: {report.dense_bytes / 2**20:.1f} MiB dense -> {report.held_bytes / 2**20:.1f} MiB held "
    f"({report.compression_factor:.2f}x, measured from the stored tensors)"
)
for group in report.groups:
    print(f"  layers {group.layers[0]}-{group.layers[-1]}: rank_k={group.rank_k} rank_v={group.rank_v}")
answer = greedy_generate(model, torch.tensor([sample.question_ids]), cache, 30, stop_token_ids(tokenizer))
print("question after compression:", tokenizer.decode(answer.tokens, skip_special_tokens=True))
print("expected:", sample.answer)
