"""On the embedded SmolLM2-135M (30 layers, 3 KV heads, head_dim 64): real checkpoint, real prompts."""

import pytest
import torch
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig, tensor_bytes
from xkv.compat import cache_kwargs
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


def _generate(model, tokenizer, ids, mask, cache, **kwargs):
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, **kwargs}
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **cache_kwargs(cache))
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("case", ["transformers-prompts-full-rank", "needles-fixed-ranks"])
def test_left_padded_batch_gives_each_prompt_its_own_tokens(smollm2, case):
    """transformers' cache integration case (its two prompts, compressed at full rank), and long prompts at the
    default config but ``min_tokens`` (they would stay exact under its 1024), fixed ranks and float factors: a
    compression factor resolves to a lower rank for the shorter prompt alone than for the padded batch, and with the
    default int4 factors the second case's tokens differ (README, "Limits": quantized factors and padded batches)."""
    model, tokenizer = smollm2
    if case == "transformers-prompts-full-rank":
        prompts = ["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"]
        make = lambda: XKVCache(model, XKVConfig(min_tokens=0, rank_k=1.0, rank_v=1.0, factor_form="model"))  # noqa: E731
    else:
        samples = [needle_sample(tokenizer, 700, seed=1), needle_sample(tokenizer, 520, seed=2)]
        prompts = [tokenizer.decode(s.context_ids + s.question_ids) for s in samples]
        make = lambda: XKVCache(model, XKVConfig(min_tokens=512, rank_k=64, rank_v=128, factor_form="model"))  # noqa: E731
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    assert not batch.attention_mask.all()  # the batch is padded
    cache = make()
    got = _generate(model, tokenizer, batch.input_ids, batch.attention_mask, cache)
    assert cache.runtime.pads is not None and cache.group_stores[0].is_ready  # compressed, with its padding
    for row, prompt in zip(got, prompts, strict=True):
        alone = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        assert row.tolist() == _generate(model, tokenizer, alone.input_ids, alone.attention_mask, make())[0].tolist()


def test_beam_search_with_two_beams_matches_dynamic_cache_at_full_rank(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(["A sequence: 1, 2, 3, 4, 5"], return_tensors="pt", add_special_tokens=False)
    kwargs = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 10}
    expected = _generate(model, tokenizer, ids.input_ids, ids.attention_mask, DynamicCache(), **kwargs)
    xkv = XKVCache(model, XKVConfig(factor_form="model", min_tokens=0, rank_k=1.0, rank_v=1.0))
    got = _generate(model, tokenizer, ids.input_ids, ids.attention_mask, xkv, **kwargs)
    assert got.shape[0] == 2 and torch.equal(got, expected)
