"""Multi-head Latent Attention (DeepSeek V2/V3): the latent factored across layers, its RoPE part kept exact."""

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
)

from tests.conftest import assert_decodes_like
from xkv import SUPPORTED_MODEL_TYPES, XKVCache, XKVConfig, tensor_bytes
from xkv.baselines.minicache import MiniCache
from xkv.compat import cache_kwargs, mla_caches_latent

TINY_MLA = {
    "vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "moe_intermediate_size": 16,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
}  # fmt: skip
FAMILIES = {
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM, {}),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM, {"n_group": 1, "topk_group": 1}),
}


def build(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY_MLA, **extra)).eval()


def ids(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 99, (1, tokens), generator=torch.Generator().manual_seed(seed))


def test_both_families_are_listed():
    assert {"deepseek_v2", "deepseek_v3"} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_line_that_caches_per_head_states_is_refused(family):
    model = build(family)
    if mla_caches_latent(model):
        pytest.skip("this transformers caches the latent")
    with pytest.raises(NotImplementedError, match="caches decompressed per-head keys and values"):
        XKVCache(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_rank_matches_the_models_own_latent_cache_over_twenty_steps(family):
    model = build(family)
    if not mla_caches_latent(model):
        pytest.skip("this transformers caches per-head keys and values (refused, tested above)")
    own = DynamicCache(config=model.config)
    xkv = XKVCache(model, XKVConfig(min_tokens=0, group_size=2, rank_k=1.0, factor_form="model"))
    assert xkv.config.compress_values is False  # the RoPE part k_pe stays exact
    assert_decodes_like(model, own, xkv, ids(40))
    # The reference is the model's own cache: the latent (kv_lora_rank) and k_pe (qk_rope_head_dim) per layer.
    report = xkv.memory_report()
    assert report.dense_bytes == tensor_bytes(t for layer in own.layers for t in (layer.keys, layer.values))
    assert all(g.rank_k == 2 * TINY_MLA["kv_lora_rank"] and g.rank_v is None for g in report.groups)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ratio_counts_the_latent_and_the_exact_rope_part(family):
    model = build(family)
    if not mla_caches_latent(model):
        pytest.skip("this transformers caches per-head keys and values")
    cache = XKVCache(model, XKVConfig(min_tokens=0, group_size=2, rank_k="4x", decode="rebuild", factor_form="model"))
    with torch.no_grad():
        model(ids(400), **cache_kwargs(cache))
    report = cache.memory_report()
    latent, rope = TINY_MLA["kv_lora_rank"], TINY_MLA["qk_rope_head_dim"]
    for group in report.groups:
        # 4x on the latent, k_pe exact: (latent + rope) / (latent / 4 + rope), 2x for these shapes.
        assert group.compression_factor == pytest.approx((latent + rope) / (latent / 4 + rope), rel=0.05)
    assert report.dense_bytes == 400 * 4 * (latent + rope) * 4
    with pytest.raises(NotImplementedError, match="Multi-head Latent Attention"):
        MiniCache(model)


def test_padded_batches_lower_ranks_and_folds_on_the_latent():
    model = build("deepseek_v2")
    if not mla_caches_latent(model):
        pytest.skip("this transformers caches per-head keys and values")
    ids = torch.randint(1, 99, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    config = XKVConfig(
        min_tokens=0,
        group_size=2,
        rank_k=1.0,
        svd="exact",
        decode="rebuild",
        fold_tokens=4,
        fold_keep=1,
        factor_form="model",
    )
    own, xkv = DynamicCache(config=model.config), XKVCache(model, config)
    with torch.no_grad():
        for step in range(8):  # the prefill, then tails folded into the latent's factors every 4 tokens
            chunk = ids if step == 0 else torch.full((2, 1), 10 + step)
            mask = mask if step == 0 else torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -chunk.shape[1] :]
            kwargs = {"attention_mask": mask, "position_ids": positions}
            expected, got = (model(chunk, **kwargs, **cache_kwargs(c)).logits for c in (own, xkv))
            real = mask[:, -chunk.shape[1] :].bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert xkv.runtime.pads.tolist() == [0, 9] and xkv.group_stores[0].prefix_len > 40  # folded
    lower = xkv.with_ranks(
        XKVConfig(min_tokens=0, group_size=2, rank_k=8, svd="exact", decode="rebuild", factor_form="model")
    )
    assert [g.rank_k for g in lower.memory_report().groups] == [8, 8]
    assert XKVCache(model, XKVConfig(group_size=2, rank_v=100)).config.compress_values is False  # rank_v unused
