"""On the embedded SmolLM2-135M (30 layers, 3 KV heads, head_dim 64): real checkpoint, real prompts."""

import pytest
import torch
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig, tensor_bytes
from xkv.generation import greedy_generate, prefill
from xkv.models import stop_token_ids
from xkv.prompts import needle_sample

pytestmark = pytest.mark.slow


def test_full_rank_gives_the_same_greedy_tokens_on_1k(smollm2):
    model, tokenizer = smollm2
    sample = needle_sample(tokenizer, 1000, seed=1)
    prompt = torch.tensor([sample.context_ids + sample.question_ids])
    stops = stop_token_ids(tokenizer)
    expected = greedy_generate(model, prompt, DynamicCache(), 24, stops).tokens
    got = greedy_generate(
        model, prompt, XKVCache(model, XKVConfig(group_size=4, rank_k=1.0, rank_v=1.0, decode="rebuild")), 24, stops
    )
    assert got.tokens == expected
    assert sample.answer in tokenizer.decode(expected)


def test_g4_at_4x_holds_at_most_26_percent_on_2k(smollm2):
    model, tokenizer = smollm2
    context = torch.tensor([needle_sample(tokenizer, 2048, seed=2).context_ids])
    dense = DynamicCache()
    prefill(model, context, dense)
    dense_bytes = tensor_bytes(t for layer in dense.layers for t in (layer.keys, layer.values))
    del dense
    # Keys at 8x and values at 2.67x: 4x for every group (the 2-layer remainder group included).
    cache = XKVCache(model, XKVConfig(group_size=4, rank_k="8x", rank_v="2.67x", decode="rebuild"))
    prefill(model, context, cache)
    report = cache.memory_report()
    assert report.dense_bytes == dense_bytes
    assert report.held_bytes <= 0.26 * dense_bytes
    assert report.held_bytes == tensor_bytes(
        t for s in cache.group_stores for t in (*s.prefix_tensors(), *s.pending_tensors())
    ) + tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    assert all(g.compression_factor >= 4.0 for g in report.groups)
