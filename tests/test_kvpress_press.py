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
    press = XKVPress(XKVConfig(min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0))
    with pytest.raises(RuntimeError, match="not compressed"):
        press.memory_report()
    assert pipe(context, question=question, press=press, max_new_tokens=6)["answer"] == plain  # full rank: exact
    assert isinstance(press.cache, XKVCache) and all(s.key_factors is not None for s in press.cache.group_stores)
    assert all(isinstance(layer, CompressedLayer) for layer in press.cache.layers)
    low = XKVPress(XKVConfig(min_tokens=0, group_size=2, rank_k="4x", rank_v="4x"))
    pipe(context, question=question, press=low, max_new_tokens=6)
    assert low.memory_report().context_compression_factor >= 4.0
