import pytest
import torch
from transformers import DynamicCache

from tests.conftest import TINY_FAMILIES, assert_decodes_like, build_tiny
from xkv import XKVCache, XKVConfig, tensor_bytes
from xkv.compat import cache_kwargs

FULL = {"rank_k": 1.0, "rank_v": 1.0, "factor_form": "model"}  # full rank in the model dtype: exact


def ids(batch, tokens, seed=0):
    return torch.randint(0, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("grouping", ["contiguous", "stride"])
def test_full_rank_matches_dynamic_cache(family, grouping):
    model = build_tiny(family)
    prompt, turn, step = ids(2, 40), ids(2, 6, seed=1), ids(2, 1, seed=2)
    dense, xkv = DynamicCache(), XKVCache(model, XKVConfig(min_tokens=0, group_size=2, grouping=grouping, **FULL))
    with torch.no_grad():
        for chunk in (prompt, turn, step):
            expected = model(chunk, past_key_values=dense).logits
            got = model(chunk, past_key_values=xkv).logits
            assert (expected - got).abs().max() < 1e-4
    assert xkv.get_seq_length() == dense.get_seq_length() == 47


def test_generate_with_full_rank_gives_the_same_tokens(tiny_llama):
    prompt = ids(1, 60)
    with torch.no_grad():
        expected = tiny_llama.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=4, **FULL))
        got = tiny_llama.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(expected, got)
    assert cache.get_seq_length() == 60 + 11


def test_generate_continues_a_prefilled_cache(tiny_llama):
    # The context is compressed first; generate() then appends only the new tokens.
    prompt, question = ids(1, 50), ids(1, 5, seed=3)
    with torch.no_grad():
        cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=6, rank_v=6))
        tiny_llama(prompt, past_key_values=cache)
        out = tiny_llama.generate(
            torch.cat([prompt, question], dim=1),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            **cache_kwargs(cache),
        )
    assert out.shape[1] == 59
    assert all(store.prefix_len == 50 for store in cache.group_stores)
    assert cache.layers[0].keys.shape[-2] == 5 + 3  # question and decoded tokens stay exact in the tail


def test_compression_changes_logits_and_tail_is_exact(tiny_llama):
    prompt, turn = ids(1, 64), ids(1, 5, seed=1)
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=3, rank_v=3))
    dense = DynamicCache()
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=cache)
        tiny_llama(prompt, past_key_values=dense)
        tiny_llama(turn, past_key_values=cache)
        tiny_llama(turn, past_key_values=dense)
    # Layer 0 sees the same inputs in both runs, so its tail must be bit-exact (later layers see compressed context).
    assert torch.equal(cache.layers[0].keys, dense.layers[0].keys[:, :, 64:])
    assert torch.equal(cache.layers[0].values, dense.layers[0].values[:, :, 64:])
    rebuilt = cache.group_stores[0].rebuild_keys(0)
    assert not torch.allclose(rebuilt, dense.layers[0].keys[:, :, :64], atol=1e-3)


def test_at_most_one_contiguous_group_is_dense_during_prefill(tiny_llama):
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=4, rank_v=4))
    seen = []
    original = type(cache.group_stores[0]).add_prefill

    def spy(store, *args, **kwargs):
        original(store, *args, **kwargs)
        seen.append(sum(len(s.pending_keys) for s in cache.group_stores))

    for store in cache.group_stores:
        store.add_prefill = spy.__get__(store)
    with torch.no_grad():
        tiny_llama(ids(1, 30), past_key_values=cache)
    assert seen == [1, 0, 1, 0]


def test_layers_outside_range_stay_dense(tiny_llama):
    cache = XKVCache(
        tiny_llama, XKVConfig(min_tokens=0, group_size=2, first_layer=1, last_layer=2, rank_k=2, rank_v=2)
    )
    dense = DynamicCache()
    prompt = ids(1, 30)
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=cache)
        tiny_llama(prompt, past_key_values=dense)
    assert [s.layers for s in cache.group_stores] == [(1, 2)]
    for layer_idx in (0, 3):
        torch.testing.assert_close(cache.layers[layer_idx].keys, dense.layers[layer_idx].keys)


def test_keys_or_values_can_stay_exact(tiny_llama):
    prompt = ids(1, 30)
    dense = DynamicCache()
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=dense)
        for side in ("keys", "values"):
            cache = XKVCache(
                tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=1, rank_v=1, **{f"compress_{side}": False})
            )
            tiny_llama(prompt, past_key_values=cache)
            store = cache.group_stores[1]
            exact = store.rebuild_keys(1) if side == "keys" else store.rebuild_values(1)
            torch.testing.assert_close(exact, getattr(dense.layers[3], side))
            assert (store.rank_k is None) == (side == "keys")


def test_from_dense_equals_compressing_during_prefill(tiny_llama):
    prompt, turn = ids(1, 48), ids(1, 4, seed=5)
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=5, rank_v=7)
    during = XKVCache(tiny_llama, config)
    dense = DynamicCache()
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=during)
        tiny_llama(prompt, past_key_values=dense)
        after = XKVCache.from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], config)
        for a, b in zip(during.group_stores, after.group_stores, strict=True):
            torch.testing.assert_close(a.rebuild_keys(0), b.rebuild_keys(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.rebuild_values(1), b.rebuild_values(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            tiny_llama(turn, past_key_values=during).logits,
            tiny_llama(turn, past_key_values=after).logits,
            atol=1e-5,
            rtol=1e-5,
        )
    with pytest.raises(ValueError, match="3 layers"):
        XKVCache.from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers[:3]], config)


def test_materialize_decodes_like_the_cache(tiny_llama):
    prompt = ids(1, 40)
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=4, rank_k=3, rank_v=5, decode="rebuild"))
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=cache)
        dense = cache.materialize()
        token = ids(1, 1, seed=9)
        for _ in range(5):
            a = tiny_llama(token, past_key_values=cache).logits
            b = tiny_llama(token, past_key_values=dense).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            token = a[:, -1:].argmax(-1)


def test_rank_larger_than_tokens_raises_before_storing(tiny_llama):
    cache = XKVCache(tiny_llama, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=20, rank_v=4))
    with pytest.raises(ValueError, match=r"rank_k for group 0.*\[1, 10\].*got 20"), torch.no_grad():
        tiny_llama(ids(1, 10), past_key_values=cache)
    assert cache.get_seq_length() == 0 and not cache.group_stores[0].pending_keys
    with pytest.raises(ValueError, match="rank_v for group 0.*cannot reach"), torch.no_grad():
        tiny_llama(
            ids(1, 4),
            past_key_values=XKVCache(
                tiny_llama, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=1, rank_v="9x")
            ),
        )


def test_custom_positions_are_refused(tiny_llama):
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=2, rank_v=2))
    with pytest.raises(ValueError, match="positions 0..n-1 after its left padding"), torch.no_grad():
        tiny_llama(ids(1, 10), past_key_values=cache, position_ids=torch.arange(5, 15).unsqueeze(0))


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match=r"gpt2.*supported: \['deepseek_v2', 'deepseek_v3', 'gemma2'"):
        XKVCache(model)


def test_randomized_svd_cache_meets_its_byte_targets_at_the_exact_svds_error(tiny_llama):
    tokens, width = 64, 2 * 16  # a group of 2 layers of D = 16
    prompt, dense = ids(1, tokens), DynamicCache()
    caches = {}
    with torch.no_grad():
        tiny_llama(prompt, **cache_kwargs(dense))
        for svd in ("randomized", "exact"):
            cfg = XKVConfig(
                factor_form="model", min_tokens=0, group_size=2, rank_k="2x", rank_v="3x", svd=svd, decode="rebuild"
            )
            caches[svd] = XKVCache(tiny_llama, cfg)
            tiny_llama(prompt, **cache_kwargs(caches[svd]))
    # Ranks: the largest r with r * (T + G*D) float32 values within 1/2 (keys) and 1/3 (values) of the dense T * G*D.
    rank_k, rank_v = tokens * width // 2 // (tokens + width), tokens * width // 3 // (tokens + width)
    assert (rank_k, rank_v) == (10, 7)
    report = caches["randomized"].memory_report()
    for group in report.groups:
        assert (group.rank_k, group.rank_v) == (rank_k, rank_v)
        assert group.held_bytes == 4 * (tokens + width) * (rank_k + rank_v)
        assert group.dense_bytes == 2 * 4 * tokens * width
    assert report.context_compression_factor == pytest.approx(2 * tokens * width / ((tokens + width) * 17))  # 2.51x

    def group_errors(cache):  # relative Frobenius error of each group side's rebuild
        rebuilt = cache.materialize().layers
        errors = []
        for group in cache.groups:
            for side in ("keys", "values"):
                pairs = [(getattr(rebuilt[i], side), getattr(dense.layers[i], side)) for i in group.layers]
                errors.append(
                    float(sum((a - b).pow(2).sum() for a, b in pairs) / sum(b.pow(2).sum() for _, b in pairs))
                )
        return torch.tensor(errors).sqrt()

    # The exact SVD is the best at these ranks (Eckart-Young); the randomized one (1 power iteration) measured at most
    # 0.12% above it (errors 0.39-0.55): a margin of 4x that.
    randomized, exact = group_errors(caches["randomized"]), group_errors(caches["exact"])
    assert (randomized >= exact * (1 - 1e-5)).all() and (randomized <= exact * 1.005).all(), (randomized, exact)
    with torch.no_grad():  # and it decodes
        tiny_llama(ids(1, 1), **cache_kwargs(caches["randomized"]))
    assert caches["randomized"].get_seq_length() == tokens + 1


def test_short_prompts_are_kept_exact_by_default(tiny_llama):
    # A prompt under min_tokens (default 1024) is not factored: generate() behaves like a dense cache.
    prompt = ids(1, 2)
    with torch.no_grad():
        expected = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        cache = XKVCache(tiny_llama)
        got = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert torch.equal(expected, got)
    report = cache.memory_report()
    assert all(g.rank_k is None and g.rank_v is None for g in report.groups)
    assert report.context_compression_factor == pytest.approx(1.0)


def test_exact_sides_do_not_alias_the_callers_tensors(tiny_llama):
    dense = DynamicCache()
    with torch.no_grad():
        tiny_llama(ids(1, 30), past_key_values=dense)
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=2, compress_values=False)
    cache = XKVCache.from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], config)
    before = cache.group_stores[0].rebuild_values(0).clone()
    dense.reset()  # zeroes the DynamicCache's tensors in place
    torch.testing.assert_close(cache.group_stores[0].rebuild_values(0), before)


def test_crop_and_reset_free_what_they_drop(tiny_llama):
    cache = XKVCache(tiny_llama, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=4, rank_v=4))
    with torch.no_grad():
        tiny_llama(ids(1, 40), past_key_values=cache)
        tiny_llama(ids(1, 3), past_key_values=cache)
    before = cache.memory_report()
    cache.crop(20)
    after = cache.memory_report()
    assert after.groups[0].held_bytes == 2 * 4 * (20 * 4 + 4 * 2 * 16)  # U keeps 20 rows; B unchanged
    assert after.tail_bytes == 0 < before.tail_bytes
    cache.reset()
    assert cache.memory_report().held_bytes == 0
    assert all(t.untyped_storage().nbytes() == 0 for layer in cache.layers for t in (layer.keys, layer.values))


def test_checks_run_whichever_layer_comes_first(tiny_llama):
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, rank_k=20, rank_v=2))
    states = torch.zeros(1, 2, 10, 8)
    with pytest.raises(ValueError, match="rank_k for group 0"):
        cache.update(states, states, 1)
    assert cache.get_seq_length(1) == 0 and not cache.group_stores[0].pending_keys


def test_length_dependent_rope_is_refused():
    model = build_tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="rope_type 'dynamic'"):
        XKVCache(model)


def test_with_ranks_equals_factoring_at_those_ranks(tiny_llama):
    prompt, turn = ids(1, 60), ids(1, 3, seed=8)
    # Exact SVD: truncating its full-rank factors equals factoring at the lower rank (a randomized SVD's need not).
    full = XKVCache(
        tiny_llama, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0, svd="exact")
    )
    target = XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k="3x", rank_v=5, svd="exact")
    direct = XKVCache(tiny_llama, target)
    with torch.no_grad():
        tiny_llama(prompt, past_key_values=full)
        tiny_llama(prompt, past_key_values=direct)
        tiny_llama(turn, past_key_values=full)
    lowered = full.with_ranks(target)
    for a, b in zip(direct.group_stores, lowered.group_stores, strict=True):
        for slot in (0, 1):
            assert torch.equal(a.rebuild_keys(slot), b.rebuild_keys(slot))
            assert torch.equal(a.rebuild_values(slot), b.rebuild_values(slot))
    assert [g.held_bytes for g in lowered.memory_report().groups] == [
        g.held_bytes for g in direct.memory_report().groups
    ]
    # The exact tail is copied; the source keeps its full-rank factors.
    assert torch.equal(lowered.layers[3].keys, full.layers[3].keys) and lowered.get_seq_length() == 63
    assert lowered.layers[3].keys.data_ptr() != full.layers[3].keys.data_ptr()
    assert full.memory_report().groups[0].rank_k == 32
    with pytest.raises(ValueError, match="groups the layers differently"):
        full.with_ranks(XKVConfig(factor_form="model", min_tokens=0, group_size=4))
    with pytest.raises(ValueError, match="rank_k` for group 0 is 9 but only rank 6 is held"):
        lowered.with_ranks(XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=9, rank_v=5))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_full_rank_matches_the_models_own_cache_over_twenty_steps(family):
    model = build_tiny(family)
    own = DynamicCache(config=model.config)  # what generate() builds: sliding-window layers where the model has them
    xkv = XKVCache(model, XKVConfig(min_tokens=0, group_size=2, decode="absorb", **FULL))
    assert_decodes_like(model, own, xkv, ids(1, 40))
    report = xkv.memory_report()
    sliding = set(xkv.spec.sliding_layers)
    assert all(not sliding & set(g.layers) for g in report.groups)  # a group never holds a sliding-window layer
    if sliding:  # those keep transformers' window-bounded layer, and the reference counts what the model keeps
        window = model.config.sliding_window
        assert all(xkv.layers[i].sliding_window == window for i in sliding)
        # The window's tokens exactly (the model's own layer keeps a view of a longer storage: at least as much).
        assert report.dense_layer_bytes == 4 * 2 * len(sliding) * xkv.spec.kv_dim * (window - 1)
        held = tensor_bytes(t for i in sliding for t in (own.layers[i].keys, own.layers[i].values))
        assert report.dense_layer_bytes <= held


def test_a_group_never_spans_two_devices():
    model = build_tiny("llama")  # 4 layers
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                           "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}  # fmt: skip
    XKVCache(model, XKVConfig(group_size=2))  # groups (0, 1) and (2, 3): each on one device
    with pytest.raises(ValueError, match=r"group 0 would span devices \(layer 0 on cpu, layer 1 on cpu, layer 2 on 1"):
        XKVCache(model, XKVConfig(group_size=4))
    with pytest.raises(ValueError, match=r"group 0 would span devices \(layer 1 on cpu, layer 2 on 1\)"):
        XKVCache(model, XKVConfig(group_size=2, first_layer=1))
    XKVCache(model, XKVConfig(group_size=2, first_layer=1, dense_layers=[1]))  # (2, 3) on one device: fine
    model.hf_device_map = {"": "cpu"}  # the whole model on one device
    XKVCache(model, XKVConfig(group_size=4))


def test_gemma3_without_its_window_is_refused():
    model = build_tiny("gemma3", sliding_window=None)
    with pytest.raises(NotImplementedError, match="own RoPE base"):
        XKVCache(model)
