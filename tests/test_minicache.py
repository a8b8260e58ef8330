import math

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import build_tiny
from xkv.baselines.minicache import (
    MiniCache,
    MiniCacheConfig,
    merge_pair,
    predicted_compression_factor,
    retained_count,
    slerp,
    slerp_with_angle,
)
from xkv.compat import cache_kwargs

HEADS, HEAD_DIM, LAYERS = 2, 8, 4


def ids(batch, tokens, seed=0):
    return torch.randint(0, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def dense_prefill(tiny_llama):
    cache = DynamicCache()
    with torch.no_grad():
        tiny_llama(ids(2, 40), past_key_values=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def relative_error(rebuilt, exact):
    return ((rebuilt - exact).norm() / exact.norm()).item()


# ---------------------------------------------------------------------- SLERP
def test_slerp_endpoints_unit_norm_and_angle():
    a, b = randn(3, 5, HEAD_DIM, seed=1), randn(3, 5, HEAD_DIM, seed=2)
    torch.testing.assert_close(slerp(a, b, 0.0), unit(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(a, b, 1.0), unit(b), rtol=0, atol=1e-12)
    mid, omega = slerp_with_angle(a, b, 0.3)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3, 5, dtype=torch.float64))
    expected_omega = torch.arccos((unit(a) * unit(b)).sum(-1))
    torch.testing.assert_close(omega, expected_omega)
    # The result lies on the great circle: angle 0.3*omega from a and 0.7*omega from b.
    torch.testing.assert_close(torch.arccos((mid * unit(a)).sum(-1).clamp(-1, 1)), 0.3 * omega)
    torch.testing.assert_close(torch.arccos((mid * unit(b)).sum(-1).clamp(-1, 1)), 0.7 * omega)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_handles_parallel_antiparallel_and_zero_vectors(dtype):
    a = randn(4, HEAD_DIM, seed=3, dtype=dtype)
    torch.testing.assert_close(slerp(a, 2.5 * a, 0.5), unit(a))
    for t in (0.0, 0.5, 1.0):
        anti = slerp(a, -a, t)
        assert torch.isfinite(anti).all()
        torch.testing.assert_close(anti.norm(dim=-1), torch.ones(4, dtype=dtype))
    torch.testing.assert_close(slerp(a, -a, 1.0), -unit(a))
    halfway = slerp(a, -a, 0.5)
    torch.testing.assert_close((halfway * unit(a)).sum(-1), torch.zeros(4, dtype=dtype), rtol=0, atol=1e-6)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(slerp(zero, a, 0.5), unit(a))
    torch.testing.assert_close(slerp(a, zero, 0.5), unit(a))
    assert torch.equal(slerp(zero, zero, 0.5), zero)


# ---------------------------------------------------------------------- merging
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merging_parallel_layers_reconstructs_each_magnitude(dtype):
    x = randn(2, HEADS, 30, HEAD_DIM, seed=4, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for second in (x, 3.0 * x):  # identical layers, and layers differing only in magnitude
        merged = merge_pair(x, second, t=0.5, retain_fraction=0.0)
        torch.testing.assert_close(merged.rebuild(0), x, rtol=tol, atol=tol)
        torch.testing.assert_close(merged.rebuild(1), second, rtol=tol, atol=tol)


def test_merging_identical_layers_through_the_cache_is_exact(tiny_llama, dense_prefill):
    # Layers 2 and 3 fed the same states: the merged pair must give them back.
    states = dense_prefill[:3] + [dense_prefill[2]]
    cache = MiniCache.from_dense(tiny_llama, states, MiniCacheConfig(start_layer=2, retain_fraction=0.0))
    dense = cache.materialize()
    for layer_idx in (2, 3):
        torch.testing.assert_close(dense.layers[layer_idx].keys, states[2][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dense.layers[layer_idx].values, states[2][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(dense.layers[0].keys, states[0][0])  # layers before start_layer stay dense


def test_more_retention_never_increases_the_error(dense_prefill):
    (k2, v2), (k3, v3) = dense_prefill[2], dense_prefill[3]
    errors = []
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.75, 0.99):
        keys = merge_pair(k2, k3, 0.5, fraction)
        values = merge_pair(v2, v3, 0.5, fraction)
        errors.append(
            relative_error(keys.rebuild(0), k2)
            + relative_error(keys.rebuild(1), k3)
            + relative_error(values.rebuild(0), v2)
            + relative_error(values.rebuild(1), v3)
        )
    assert errors[0] > 0.1
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.1 * errors[0]


def test_retained_tokens_are_exact_and_the_most_distant(dense_prefill):
    (k2, _), (k3, _) = dense_prefill[2], dense_prefill[3]
    merged = merge_pair(k2, k3, 0.5, 0.25)
    assert merged.retained_indices.shape == (2, HEADS, 10) and merged.retained_indices.dtype == torch.int32
    index = merged.retained_indices.long().unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)
    assert torch.equal(merged.rebuild(0).gather(-2, index), k2.gather(-2, index))
    assert torch.equal(merged.rebuild(1).gather(-2, index), k3.gather(-2, index))
    _, omega = slerp_with_angle(k2, k3, 0.5)
    kept_min = omega.gather(-1, merged.retained_indices.long()).min(dim=-1).values
    mask = torch.ones_like(omega, dtype=torch.bool).scatter_(-1, merged.retained_indices.long(), False)
    merged_max = omega.masked_fill(~mask, -1).max(dim=-1).values
    assert (kept_min >= merged_max).all()


def test_merge_pair_needs_equal_shapes():
    with pytest.raises(ValueError, match="same shape"):
        merge_pair(randn(1, 2, 5, 8), randn(1, 2, 6, 8), 0.5, 0.0)


def test_retained_count_is_a_floor():
    assert retained_count(100, 0.29) == 29
    assert retained_count(40, 0.05) == 2
    assert retained_count(19, 0.05) == 0
    assert retained_count(7, 0.0) == 0


# ---------------------------------------------------------------------- the cache
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_is_exact_and_decode_equals_materialize(family):
    model = build_tiny(family)
    prompt = ids(2, 40)
    cache, dense = MiniCache(model, MiniCacheConfig(start_layer=0, retain_fraction=0.1)), DynamicCache()
    with torch.no_grad():
        torch.testing.assert_close(
            model(prompt, past_key_values=cache).logits, model(prompt, past_key_values=dense).logits, rtol=0, atol=0
        )
        for step, chunk in enumerate((ids(2, 1, seed=1), ids(2, 3, seed=2), ids(2, 1, seed=3))):
            reference = cache.materialize()
            got = model(chunk, past_key_values=cache).logits
            expected = model(chunk, past_key_values=reference).logits
            assert (got - expected).abs().max() < 1e-5, step
    assert cache.get_seq_length() == 45 and cache.layers[3].keys.shape[-2] == 5
    assert all(store.prefix_len == 40 for store in cache.stores)


def test_from_dense_equals_compressing_during_prefill(tiny_llama, dense_prefill):
    config = MiniCacheConfig(start_layer=1, retain_fraction=0.2)
    during = MiniCache(tiny_llama, config)
    with torch.no_grad():
        tiny_llama(ids(2, 40), past_key_values=during)
    after = MiniCache.from_dense(tiny_llama, dense_prefill, config)
    assert len(during.stores) == len(after.stores) == 1  # pair (1, 2); layer 3 has no partner
    for got, expected in zip(after.stores[0].prefix_tensors(), during.stores[0].prefix_tensors(), strict=True):
        assert torch.equal(got, expected)
    assert type(after.layers[3]).__name__ == "DynamicLayer" and torch.equal(after.layers[3].keys, dense_prefill[3][0])
    with pytest.raises(ValueError, match="`keys_values` has 3 layers"):
        MiniCache.from_dense(tiny_llama, dense_prefill[:3], config)


def test_memory_report_equals_a_hand_count(tiny_llama):
    batch, tokens, decoded = 2, 40, 3
    cache = MiniCache(tiny_llama, MiniCacheConfig(start_layer=2, retain_fraction=0.25))
    with torch.no_grad():
        tiny_llama(ids(batch, tokens), past_key_values=cache)
        for step in range(decoded):
            tiny_llama(ids(batch, 1, seed=10 + step), past_key_values=cache)
    f32, i32, kept = 4, 4, 10
    side = batch * HEADS * (tokens * HEAD_DIM * f32 + 2 * tokens * f32 + 2 * kept * HEAD_DIM * f32 + kept * i32)
    pair = 2 * side
    tails = 2 * 2 * batch * HEADS * 16 * HEAD_DIM * f32  # tail buffers for 16 tokens (3 used; doubled when full)
    dense_layers = 2 * 2 * batch * HEADS * (tokens + decoded) * HEAD_DIM * f32
    report = cache.memory_report()
    assert [g.layers for g in report.groups] == [(2, 3)] and report.groups[0].held_bytes == pair
    assert report.groups[0].dense_bytes == 2 * 2 * batch * HEADS * tokens * HEAD_DIM * f32
    assert report.tail_bytes == tails and report.dense_layer_bytes == dense_layers
    assert report.held_bytes == pair + tails + dense_layers
    assert report.dense_bytes == LAYERS * 2 * batch * HEADS * (tokens + decoded) * HEAD_DIM * f32
    store = cache.stores[0]
    assert store.keys.directions.shape == (batch, HEADS, tokens, HEAD_DIM)
    assert store.keys.magnitudes[1].shape == (batch, HEADS, tokens)
    assert store.values.retained[0].shape == (batch, HEADS, kept, HEAD_DIM)


@pytest.mark.parametrize(
    ("start_layer", "fraction", "tokens"), [(0, 0.0, 40), (0, 0.05, 64), (1, 0.3, 33), (2, 0.5, 50)]
)
def test_measured_factor_matches_the_formula(tiny_llama, start_layer, fraction, tokens):
    cache = MiniCache(tiny_llama, MiniCacheConfig(start_layer=start_layer, retain_fraction=fraction))
    with torch.no_grad():
        tiny_llama(ids(1, tokens), past_key_values=cache)
    measured = cache.memory_report().compression_factor
    predicted = predicted_compression_factor(LAYERS, HEADS, HEAD_DIM, tokens, start_layer, fraction, 4)
    assert measured == pytest.approx(predicted, rel=0.01)


def test_for_compression_factor(tiny_llama):
    assert MiniCache.for_compression_factor(tiny_llama, 4.0, tokens=64) is None
    config = MiniCache.for_compression_factor(tiny_llama, 1.3, tokens=64, retain_fraction=0.05)
    assert config is not None and config.start_layer == 0 and config.retain_fraction == 0.05
    low = MiniCache.for_compression_factor(tiny_llama, 1.1, tokens=64)
    assert low is not None and low.start_layer == 2  # the deepest start that is enough
    cache = MiniCache(tiny_llama, config)
    with torch.no_grad():
        tiny_llama(ids(1, 64), past_key_values=cache)
    assert cache.memory_report().compression_factor >= 1.3
    # The ceiling of merging every layer with no retention is 2*hd / (hd + 2), under 2x.
    ceiling = predicted_compression_factor(LAYERS, HEADS, HEAD_DIM, 64, 0, 0.0, 4)
    assert ceiling == pytest.approx(2 * HEAD_DIM / (HEAD_DIM + 2)) and ceiling < 2
    with pytest.raises(ValueError, match="`start_layer`"):
        MiniCache.for_compression_factor(tiny_llama, 1.3, tokens=64, start_layer=0)
    with pytest.raises(ValueError, match="`target`"):
        MiniCache.for_compression_factor(tiny_llama, 0.0, tokens=64)
    with pytest.raises(ValueError, match="`tokens`"):
        MiniCache.for_compression_factor(tiny_llama, 1.3, tokens=0)


def test_crop_inside_the_merged_prefix_merges_again(tiny_llama):
    # The Cache behaviours every class shares are in tests/test_cache_contract.py; this is MiniCache's own part.
    cache = MiniCache(tiny_llama, MiniCacheConfig(start_layer=2))
    with torch.no_grad():
        tiny_llama.generate(ids(3, 30), max_new_tokens=4, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    reference = cache.materialize()
    cache.crop(20)  # inside the merged prefix: merged again at 20 tokens, equal up to rounding
    assert cache.get_seq_length() == 20 and cache.stores[0].keys.directions.shape[-2] == 20
    assert cache.stores[0].keys.retained_indices.shape[-1] == retained_count(20, 0.05)
    cropped = cache.materialize().layers[2].keys
    torch.testing.assert_close(cropped, reference.layers[2].keys[:, :, :20], rtol=0, atol=1e-5)


def test_decode_before_the_pair_is_merged_raises(tiny_llama):
    cache = MiniCache(tiny_llama, MiniCacheConfig(start_layer=2))
    states = torch.zeros(1, HEADS, 5, HEAD_DIM)
    cache.update(states, states, 2)
    with pytest.raises(RuntimeError, match="before every layer of its group"):
        cache.update(states[:, :, :1], states[:, :, :1], 2)
    with pytest.raises(RuntimeError, match="prefilled 4 tokens"):
        cache.update(states[:, :, :4], states[:, :, :4], 3)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"start_layer": -1}, "`start_layer`"),
        ({"t": 0.0}, "`t`"),
        ({"t": 1.0}, "`t`"),
        ({"t": math.nan}, "`t`"),
        ({"retain_fraction": 1.0}, "`retain_fraction`"),
        ({"retain_fraction": -0.1}, "`retain_fraction`"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MiniCacheConfig(**kwargs)


def test_start_layer_type_and_range_are_checked(tiny_llama):
    with pytest.raises(TypeError, match="`start_layer`"):
        MiniCacheConfig(start_layer=1.5)
    with pytest.raises(ValueError, match=r"`start_layer` must be in \[0, 2\] for a model with 4 layers but got 3"):
        MiniCache(tiny_llama, MiniCacheConfig(start_layer=3))
    assert MiniCache(tiny_llama).start_layer == 2  # default: the second half of the layers


def test_models_with_sliding_window_layers_are_refused():
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        MiniCache(build_tiny("gemma2"))
