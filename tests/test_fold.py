"""Folding exact tails into the factors: chunked prefills and long generations (incremental SVD)."""

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache

from tests.conftest import build_tiny
from xkv import XKVCache, XKVConfig
from xkv.compat import TRANSFORMERS_VERSION, cache_kwargs
from xkv.factorization import append_rows, cross_layer_svd

#: Full rank in the model's dtype: folding must then change nothing (int4 factors would round).
EXACT_FULL_RANK = dict(factor_form="model", min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0, decode="absorb")


def ids(tokens, seed=0):
    return torch.randint(0, 99, (1, tokens), generator=torch.Generator().manual_seed(seed))


def test_append_rows_at_full_rank_equals_factoring_everything():
    torch.manual_seed(0)
    old = [torch.randn(2, 30, 6, dtype=torch.float64) for _ in range(3)]
    new = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(3)]
    grown = append_rows(cross_layer_svd(old, 18), new, 18)
    for slot in range(3):
        torch.testing.assert_close(grown.layer(slot), torch.cat([old[slot], new[slot]], dim=1))
    # Truncated: the same error as factoring all rows at that rank when the old rows were kept whole.
    low = append_rows(cross_layer_svd(old, 18), new, 4)
    direct = cross_layer_svd([torch.cat([o, n], dim=1) for o, n in zip(old, new, strict=True)], 4)
    for slot in range(3):
        torch.testing.assert_close(low.layer(slot), direct.layer(slot))
    with pytest.raises(ValueError, match="rank"):
        append_rows(cross_layer_svd(old, 4), new, 10)


@torch.no_grad()
def chunked_logits(model, cache, prompt, chunk):
    outs = [model(part, use_cache=True, **cache_kwargs(cache)).logits for part in prompt.split(chunk, dim=1)]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("form", ["model", "int8"])
def test_a_chunked_prefill_at_full_rank_equals_the_one_shot_prefill(form):
    model = build_tiny("llama")
    prompt = ids(96)
    dense = chunked_logits(model, DynamicCache(), prompt, 96)
    cfg = XKVConfig(min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0, decode="absorb", fold_tokens=16,
                    fold_keep=4, factor_form=form)  # fmt: skip
    cache = XKVCache(model, cfg)
    chunked = chunked_logits(model, cache, prompt, 16)
    # int8 factors round: their logits measured at most 6.8e-4 from the dense ones (logits: standard deviation 0.11,
    # largest 0.43), so 2e-3 (3x the measured error) and no relative slack (logits near 0 would make it meaningless).
    tol = {"model": dict(atol=1e-4, rtol=1e-4), "int8": dict(atol=2e-3, rtol=0)}[form]
    torch.testing.assert_close(chunked, dense, **tol)
    store = cache.group_stores[0]
    assert store.prefix_len == 76 and cache.layers[0].tail()[0].shape[-2] == 4 + 16  # kept tokens + last chunk
    # Bytes: still measured, and equal to the factors' analytic count at the folded length and ranks.
    if form == "model":
        report = cache.memory_report()
        dim = cache.spec.kv_dim
        for group in report.groups:
            g = len(group.layers)
            assert group.held_bytes == 4 * sum(group.tokens * r + r * g * dim for r in (group.rank_k, group.rank_v))


def test_folding_keeps_a_long_generation_bounded_and_changes_nothing_at_full_rank():
    model = build_tiny("llama")
    prompt = ids(48)
    cfg = XKVConfig(**EXACT_FULL_RANK, fold_tokens=8, fold_keep=2)
    folded = XKVCache(model, cfg)
    out = model.generate(prompt, past_key_values=folded, max_new_tokens=30, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, past_key_values=DynamicCache(), max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    tails = [layer.tail()[0].shape[-2] for layer in folded.layers]
    assert max(tails) < 8 and folded.get_seq_length() == 48 + 29
    # At a lower rank a fold re-resolves the rank for the new length and keeps the tail bounded too.
    low = XKVCache(model, XKVConfig(**{**cfg.to_dict(), "rank_k": "2x", "rank_v": "2x"}))
    model.generate(prompt, past_key_values=low, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert max(layer.tail()[0].shape[-2] for layer in low.layers) < 8
    assert low.memory_report().context_compression_factor >= 2.0


def test_fold_settings_are_checked():
    with pytest.raises(ValueError, match="fold_keep"):
        XKVConfig(fold_tokens=8, fold_keep=8)
    with pytest.raises(ValueError, match="fold_tokens"):
        XKVConfig(fold_tokens=-1)


def test_fold_now_folds_every_tail_and_trims_the_headroom():
    from xkv.generation import chunked_prefill

    model = build_tiny("llama")
    prompt = ids(96, seed=3)
    cfg = XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k="4x", rank_v="2x", decode="absorb",
                    fold_tokens=16, fold_keep=0, fold_headroom=True)  # fmt: skip
    cache = XKVCache(model, cfg)
    logits = chunked_prefill(model, prompt, cache, 16)
    assert logits.shape == (1, model.config.vocab_size)
    store = cache.group_stores[0]
    target = store.check_ranks(store.prefix_len, torch.float32)
    assert (store.rank_k, store.rank_v) > target  # the headroom: more directions than the length's ranks
    assert cache.fold(0) == 16 and cache.fold(0) == 0  # the last chunk; then nothing is left to fold
    for store in cache.group_stores:
        assert store.prefix_len == 96
        assert (store.rank_k, store.rank_v) == store.check_ranks(96, torch.float32)
    assert all(layer.tail()[0].shape[-2] == 0 for layer in cache.layers)
    report = cache.memory_report()
    dim = cache.spec.kv_dim
    for group in report.groups:
        g = len(group.layers)
        assert group.held_bytes == 4 * sum(96 * r + r * g * dim for r in (group.rank_k, group.rank_v))
    assert report.held_bytes == sum(g.held_bytes for g in report.groups)  # decode scratch freed by the fold
    assert report.context_compression_factor >= 2.6
    # What the fold built: each layer's rebuilt keys and values as close to the model's own as the same ranks
    # factored in one shot (relative errors 0.36-0.64 on this random model, the fold's at most 2.2% above the one-shot
    # ones: 1.07 is 3x that; rows folded out of order measured 2x the one-shot error).
    one_shot, dense = (
        XKVCache(model, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k="4x", rank_v="2x")),
        DynamicCache(),
    )
    with torch.no_grad():
        for other in (one_shot, dense):
            model(prompt, use_cache=True, **cache_kwargs(other))
    assert [(s.rank_k, s.rank_v) for s in one_shot.group_stores] == [(s.rank_k, s.rank_v) for s in cache.group_stores]

    def errors(other):  # per layer, keys then values
        pairs = list(zip(other.materialize().layers, dense.layers, strict=True))
        sides = [(a.keys, b.keys) for a, b in pairs] + [(a.values, b.values) for a, b in pairs]
        return torch.tensor([float((a - b).norm() / b.norm()) for a, b in sides])

    copy = cache.materialize()
    assert (errors(cache) <= 1.07 * errors(one_shot)).all(), (errors(cache), errors(one_shot))
    # Decoding goes on from the folded prefix, as attention over what the factors hold (measured 6e-8 apart).
    with torch.no_grad():
        step = torch.tensor([[5]])
        out, expected = (model(step, use_cache=True, **cache_kwargs(c)).logits for c in (cache, copy))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 97
    with pytest.raises(ValueError, match="keep"):
        cache.fold(-1)


def test_headroom_keeps_early_chunks_closer_to_a_one_shot_prefill():
    from xkv.generation import chunked_prefill, prefill

    model = build_tiny("llama")
    prompt = ids(128, seed=5)
    dense = DynamicCache()
    prefill(model, prompt, dense)
    errors = {}
    for headroom in (False, True):
        cfg = XKVConfig(min_tokens=0, group_size=2, rank_k="3x", rank_v="3x", decode="absorb", fold_tokens=32,
                        fold_keep=0, fold_headroom=headroom)  # fmt: skip
        cache = XKVCache(model, cfg)
        chunked_prefill(model, prompt, cache, 32)
        cache.fold(0)
        rebuilt = cache.materialize()
        pairs = zip(rebuilt.layers, dense.layers, strict=True)
        errors[headroom] = sum(float((a.values - b.values).norm() / b.values.norm()) for a, b in pairs)
    assert errors[True] < errors[False]


def test_chunked_prefill_checks_its_arguments():
    from xkv.generation import chunked_prefill

    model = build_tiny("llama")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(model, ids(8), DynamicCache(), 0)
    with pytest.raises(ValueError, match="input_ids"):
        chunked_prefill(model, ids(8)[:, :0], DynamicCache(), 4)
    with pytest.raises(ValueError, match="fold_headroom"):
        XKVConfig(fold_headroom=2)


def test_a_long_update_takes_the_exact_rebuild_path():
    from xkv.cache import FAST_PATH_MAX_QUERIES

    model = build_tiny("llama")
    prompt, more = ids(64), ids(FAST_PATH_MAX_QUERIES + 4, seed=1)
    logits = {}
    for decode in ("rebuild", "absorb", "selective"):
        cfg = XKVConfig(min_tokens=0, group_size=2, rank_k="2x", rank_v="2x", decode=decode, sr_min_tokens=16)
        cache = XKVCache(model, cfg)
        model(prompt, use_cache=True, **cache_kwargs(cache))
        logits[decode] = model(more, use_cache=True, **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits["absorb"], logits["rebuild"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["selective"], logits["rebuild"], atol=1e-4, rtol=1e-4)


def test_only_short_updates_reach_the_fast_paths(monkeypatch):
    from xkv.cache import FAST_PATH_MAX_QUERIES
    from xkv.cache.decoding import FastPath

    def refuse(*args, **kwargs):
        raise AssertionError("fast path")

    model = build_tiny("llama")
    cache = XKVCache(model, XKVConfig(min_tokens=0, group_size=2, rank_k="2x", rank_v="2x", decode="absorb"))
    with torch.no_grad():
        model(ids(64), use_cache=True, **cache_kwargs(cache))
        monkeypatch.setattr(FastPath, "inputs", refuse)
        model(ids(FAST_PATH_MAX_QUERIES + 1, seed=1), use_cache=True, **cache_kwargs(cache))  # rebuild path
        with pytest.raises(AssertionError, match="fast path"):
            model(ids(1, seed=2), use_cache=True, **cache_kwargs(cache))


def test_a_thousand_token_generation_keeps_the_tail_and_the_bytes_bounded():
    model = build_tiny("llama", max_position_embeddings=2048)
    cfg = XKVConfig(min_tokens=0, group_size=2, rank_k="2x", rank_v="2x", decode="absorb", fold_tokens=64,
                    fold_keep=16)  # fmt: skip
    cache = XKVCache(model, cfg)
    with torch.no_grad():
        model(ids(128), use_cache=True, **cache_kwargs(cache))
        token, tails, ratios, tail_bytes = torch.tensor([[7]]), [], [], []
        for _ in range(1000):
            logits = model(token, use_cache=True, **cache_kwargs(cache)).logits
            token = logits[:, -1:].argmax(-1)
            tails.append(max(layer.tail()[0].shape[-2] for layer in cache.layers))
            report = cache.memory_report()
            ratios.append(report.context_compression_factor)
            tail_bytes.append(report.tail_bytes)
    assert cache.get_seq_length() == 1128
    assert max(tails) == 64 and min(tails[100:]) >= 16  # folded once it holds 64, the newest 16 kept exact
    assert min(ratios[100:]) >= 1.95  # the factors keep their 2x at every length they grow to
    assert max(tail_bytes[500:]) <= max(tail_bytes[:200])  # the exact tail's buffers stop growing


@pytest.mark.parametrize(("form", "rotation"), [("int8", "none"), ("int8", "hadamard"), ("int4", "hadamard")])
def test_trimming_quantized_and_rotated_factors_keeps_whole_directions(form, rotation):
    from xkv.generation import chunked_prefill, prefill

    model = build_tiny("llama")
    prompt = ids(128, seed=6)
    dense = DynamicCache()
    prefill(model, prompt, dense)
    base = dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="3x", factor_form=form, factor_rotation=rotation,
                factor_group_size=16)  # fmt: skip
    one_shot = XKVCache.from_dense(model, [(lay.keys, lay.values) for lay in dense.layers], XKVConfig(**base))
    chunked = XKVCache(model, XKVConfig(**base, fold_tokens=32, fold_keep=0, fold_headroom=True))
    chunked_prefill(model, prompt, chunked, 32)
    chunked.fold(0)

    def error(cache):
        pairs = zip(cache.materialize().layers, dense.layers, strict=True)
        return sum(float((a.values - b.values).norm() / b.values.norm()) for a, b in pairs)

    for a, b in zip(chunked.group_stores, one_shot.group_stores, strict=True):
        assert (a.rank_k, a.rank_v) == (b.rank_k, b.rank_v)
    assert error(chunked) < 1.3 * error(one_shot)  # a cut through mixed columns would be far worse


_BEFORE_5_24 = Version("5.24") > TRANSFORMERS_VERSION
_CHUNKS = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, prefill_chunk_size=32)
_FOLDING = XKVConfig(**EXACT_FULL_RANK, fold_tokens=32, fold_keep=0)


@pytest.mark.skipif(not _BEFORE_5_24, reason="transformers >= 5.24 gives prefill chunks their own positions")
def test_generate_with_prefill_chunks_is_refused_with_what_to_do_on_5_2():
    # 5.2 rotates every chunk at the last chunk's positions: refused, never a silently wrong prefix, and the
    # message says what works instead.
    model = build_tiny("llama")
    with pytest.raises(ValueError, match=r"RoPE positions 0..n-1.*prefill_chunk_size.*chunked_prefill.*>= 5.24"):
        model.generate(ids(100), **_CHUNKS, **cache_kwargs(XKVCache(model, _FOLDING)))


@pytest.mark.skipif(_BEFORE_5_24, reason="transformers 5.2's chunked prefill passes wrong positions (refused above)")
def test_generate_with_prefill_chunks_folds_each_chunk():
    model = build_tiny("llama")
    prompt = ids(100)
    options = _CHUNKS
    cache = XKVCache(model, _FOLDING)
    expected = model.generate(prompt, **options, **cache_kwargs(DynamicCache()))
    assert torch.equal(model.generate(prompt, **options, **cache_kwargs(cache)), expected)
    assert cache.group_stores[0].prefix_len == 96  # chunks folded as they came; the tail holds the rest


def test_a_fold_of_int4_factors_spends_the_bytes_its_shape_leaves():
    # Chunks of 32 folded without headroom, then 64 tokens: the value side's int4 rank is capped at G*D = 32, where
    # int4 holds far less than its 2x budget; the fold stores it with the rest spent on int8 directions, as a
    # one-shot prefill does.
    from xkv.forms import FactorFormat
    from xkv.generation import chunked_prefill
    from xkv.memory import tensor_bytes

    model = build_tiny("llama")
    base = dict(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x", factor_form="int4", factor_group_size=16)
    cache = XKVCache(model, XKVConfig(**base, fold_tokens=32, fold_keep=0))
    chunked_prefill(model, ids(64, seed=4), cache, 32)
    cache.fold(0)
    dim = cache.spec.kv_dim
    capped, budget = FactorFormat("int4", 16).factor_bytes(64, 2, dim, 32, 4), 2 * 64 * dim * 4 / 2
    for store in cache.group_stores:
        assert store.prefix_len == 64
        assert capped < tensor_bytes(store.value_factors.tensors()) <= budget


def test_folded_int4_factors_of_a_16_bit_model_keep_its_dtype_and_load(tmp_path):
    # A fold dequantizes to float32 and quantizes again: the result must still be the bf16 model's form (its
    # dtype and balance), or its prefix file would be refused.
    from xkv.generation import chunked_prefill

    model = build_tiny("llama").to(torch.bfloat16)
    cfg = XKVConfig(min_tokens=0, group_size=2, rank_k="3x", rank_v="2x", factor_form="int4", factor_group_size=16,
                    fold_tokens=32, fold_keep=0)  # fmt: skip
    cache = XKVCache(model, cfg)
    chunked_prefill(model, ids(96, seed=5), cache, 32)
    cache.fold(0)
    for store in cache.group_stores:
        for factors in (store.key_factors, store.value_factors):
            assert factors.dtype == torch.bfloat16 and factors.balance is not None
    cache.save(tmp_path / "folded.xkv")
    loaded = XKVCache.load(tmp_path / "folded.xkv", model)
    assert loaded.group_stores[0].value_factors.dtype == torch.bfloat16
