"""XKVPress in kvpress's own pipeline, on a tiny model with the embedded model's tokenizer."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, pipeline

pytest.importorskip("kvpress")
from xkv import XKVCache, XKVConfig  # noqa: E402
from xkv.cache import CompressedLayer  # noqa: E402
from xkv.integrations.kvpress import XKVPress  # noqa: E402


@pytest.mark.slow
def test_the_pipeline_answers_from_the_factors(smollm2):
    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=37, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    context = "The harbour was calm and the boats were painted blue. " * 20
    question = "What colour were the boats?"
    plain = pipe(context, question=question, max_new_tokens=6)["answer"]
    press = XKVPress(XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0))
    with pytest.raises(RuntimeError, match="not compressed"):
        press.memory_report()
    assert pipe(context, question=question, press=press, max_new_tokens=6)["answer"] == plain  # full rank: exact
    assert isinstance(press.cache, XKVCache) and all(s.key_factors is not None for s in press.cache.group_stores)
    assert all(isinstance(layer, CompressedLayer) for layer in press.cache.layers)
    low = XKVPress(XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k="4x", rank_v="4x"))
    pipe(context, question=question, press=low, max_new_tokens=6)
    # The context's factors at 4x: per group and side, the largest rank r with r * (T + G*D) float32 values within a
    # quarter of the dense T * G*D (G = 2 layers of D = 2 KV heads x 32), and exactly those bytes held.
    report = low.memory_report()
    tokens, width = report.groups[0].tokens, 2 * 64
    rank = tokens * width // (4 * (tokens + width))
    assert tokens > 200 and len(report.groups) == 2  # the 20 sentences of context (245 tokens), layers 0-1 and 2-3
    for group in report.groups:
        assert (group.tokens, group.rank_k, group.rank_v) == (tokens, rank, rank)
        assert group.held_bytes == 2 * 4 * rank * (tokens + width)
        assert group.dense_bytes == 2 * 4 * tokens * width
    assert report.context_compression_factor == pytest.approx(tokens * width / (rank * (tokens + width)), rel=1e-9)
    assert 4.0 <= report.context_compression_factor < 4.0 * (rank + 1) / rank  # 4.004x at r = 21
