import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import build_tiny
from xkv import XKVCache, XKVConfig, compression_factor, tensor_bytes
from xkv.memory import dense_kv_bytes


def test_tensor_bytes_counts_storages_once_and_whole():
    base = torch.zeros(100, dtype=torch.float32)
    assert tensor_bytes([base, base[:10], None]) == 400  # a view keeps its whole storage alive
    assert tensor_bytes([torch.zeros(3, dtype=torch.bfloat16), torch.zeros(0)]) == 6
    assert dense_kv_bytes(2, 10, 3, 16, torch.float16) == 2 * 2 * 10 * 3 * 16 * 2


@settings(deadline=None, max_examples=15)
@given(
    tokens=st.integers(40, 120),
    group_size=st.sampled_from([1, 2, 4]),
    rank_k=st.integers(1, 16),
    rank_v=st.integers(1, 16),
)
def test_measured_bytes_equal_the_formula(tiny_llama, tokens, group_size, rank_k, rank_v):
    # D = kv_heads * head_dim = 2 * 8 = 16 on the tiny model.
    cache = XKVCache(
        tiny_llama,
        XKVConfig(
            factor_form="model", min_tokens=0, group_size=group_size, rank_k=rank_k, rank_v=rank_v, decode="rebuild"
        ),
    )
    with torch.no_grad():
        tiny_llama(torch.randint(0, 99, (1, tokens)), past_key_values=cache)
    report = cache.memory_report()
    assert report.tail_bytes == 0 and report.dense_layer_bytes == 0
    for group in report.groups:
        g = len(group.layers)
        # Keys and values each hold T*r + r*G*D numbers: the bytes must match exactly.
        expected = 4 * (tokens * rank_k + rank_k * g * 16) + 4 * (tokens * rank_v + rank_v * g * 16)
        assert group.held_bytes == expected
        predicted = 2 / (1 / compression_factor(tokens, g, 16, rank_k) + 1 / compression_factor(tokens, g, 16, rank_v))
        assert group.compression_factor == pytest.approx(predicted, rel=1e-12)


def test_report_splits_tail_and_dense_layers(tiny_llama):
    cache = XKVCache(
        tiny_llama,
        XKVConfig(
            factor_form="model", min_tokens=0, group_size=2, first_layer=2, rank_k=4, rank_v=4, decode="rebuild"
        ),
    )
    with torch.no_grad():
        tiny_llama(torch.randint(0, 99, (1, 50)), past_key_values=cache)
        tiny_llama(torch.randint(0, 99, (1, 7)), past_key_values=cache)
    report = cache.memory_report()
    assert [g.layers for g in report.groups] == [(2, 3)]
    # Layers 2, 3: keys + values in tail buffers preallocated for 16 tokens (7 used; they double when full).
    assert report.tail_bytes == 2 * 2 * 16 * 16 * 4
    assert report.dense_layer_bytes == 2 * 2 * 57 * 16 * 4  # layers 0, 1 keep everything
    assert report.dense_bytes == dense_kv_bytes(1, 57, 4, 16, torch.float32)
    assert report.table_bytes == 50 * 2 * 8 * 4  # cos and sin (rot_dim 8) of the 50 prefix positions
    # The rebuild path's workspace: one layer's keys and values for prefix and tail, with 1/16 headroom.
    assert report.workspace_bytes == 2 * ((50 + 7) * 16 + (50 + 7) * 16 // 16) * 4
    held = report.groups[0].held_bytes + report.tail_bytes + report.dense_layer_bytes + report.table_bytes
    assert report.held_bytes == held + report.workspace_bytes
    data = report.to_dict()
    assert data["compression_factor"] == pytest.approx(report.compression_factor)


def test_bf16_model_cache_follows_dtype():
    model = build_tiny("llama").to(torch.bfloat16)
    cache = XKVCache(
        model, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=4, rank_v=4, decode="rebuild")
    )
    with torch.no_grad():
        model(torch.randint(0, 99, (1, 30)), past_key_values=cache)
    store = cache.group_stores[0]
    assert store.key_factors.token_basis.dtype == torch.bfloat16
    assert cache.memory_report().groups[0].held_bytes == 2 * 2 * (30 * 4 + 4 * 2 * 16)
