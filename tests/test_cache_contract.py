"""Every cache class of the project through the same transformers ``Cache`` behaviours (one contract, not a copy per
class): generation, beam search, batch edits, crop, reset and reuse, and bytes measured from what is held."""

import pytest
import torch
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.baselines.minicache import MiniCache, MiniCacheConfig
from xkv.compat import cache_kwargs

#: name -> factory(model). Add every new cache class here.
CACHES = {
    "xkv": lambda model: XKVCache(
        model, XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=4, rank_v=4)
    ),
    "xkv-absorb-int8": lambda model: XKVCache(
        model, XKVConfig(min_tokens=0, group_size=2, rank_k=4, rank_v=4, decode="absorb", factor_form="int8")
    ),
    "xkv-selective": lambda model: XKVCache(
        model,
        XKVConfig(
            factor_form="model", min_tokens=0, group_size=2, rank_k=4, rank_v=4, decode="selective", sr_min_tokens=8
        ),
    ),
    "minicache": lambda model: MiniCache(model, MiniCacheConfig(start_layer=2)),
}

FULL = {"min_tokens": 0, "group_size": 2, "rank_k": 1.0, "rank_v": 1.0, "factor_form": "model"}
#: name -> factory(model) of each cache class and decode path at settings that lose nothing, so generation must give
#: ``DynamicCache``'s tokens: full rank (the selective path with a budget covering the prompt), and MiniCache on
#: ``twin_llama``, whose merged pair holds identical states. Not int8 factors: their rounding is a loss at any rank.
LOSSLESS = {
    "xkv-rebuild": lambda model: XKVCache(model, XKVConfig(**FULL, decode="rebuild")),
    "xkv-absorb": lambda model: XKVCache(model, XKVConfig(**FULL, decode="absorb")),
    "xkv-selective": lambda model: XKVCache(
        model, XKVConfig(**FULL, decode="selective", sr_min_tokens=8, sr_budget=64)
    ),
    "minicache": lambda model: MiniCache(model, MiniCacheConfig(start_layer=2)),
}


def ids(batch, tokens, seed=0):
    return torch.randint(0, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CACHES)
def test_generation_batch_edits_crop_and_reset(name, tiny_llama):
    cache = CACHES[name](tiny_llama)
    with torch.no_grad():
        out = tiny_llama.generate(ids(3, 30), max_new_tokens=4, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert out.shape == (3, 34) and cache.get_seq_length() == 33
    assert cache.memory_report().held_bytes > 0
    reference = cache.materialize()
    last = len(reference.layers) - 1
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(cache.materialize().layers[last].keys, reference.layers[last].keys[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(cache.materialize().layers[0].values, reference.layers[0].values[[0]])
    cache.batch_repeat_interleave(2)
    assert cache.materialize().layers[0].keys.shape[0] == 2
    cache.crop(31)  # inside the exact tail
    assert cache.get_seq_length() == 31
    cache.crop(-11)  # inside the compressed prefix
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(
        cache.materialize().layers[last].keys, reference.layers[last].keys[[0, 0], :, :20], rtol=0, atol=1e-5
    )
    with torch.no_grad():  # decoding goes on after the edits
        tiny_llama(ids(2, 1, seed=3), **cache_kwargs(cache))
    assert cache.get_seq_length() == 21
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report().held_bytes == 0
    with torch.no_grad():  # and the cache takes a new prompt
        tiny_llama(ids(1, 24, seed=5), **cache_kwargs(cache))
    assert cache.get_seq_length() == 24


def twin_llama():
    """The tiny Llama with layer 3's keys and values parallel to layer 2's, token by token, so that MiniCache's merge
    of that pair (one direction, each layer's own magnitude) loses nothing and a lossless MiniCache exists.

    The hidden dims are split in two halves: the keys and values of layers 2 and 3 read the first half only (through
    the same norm weights and projections), and layer 2 writes to the second half only. Layer 3's key and value
    inputs are then layer 2's scaled by each token's RMS ratio; both layers still change the logits."""
    from tests.conftest import build_tiny

    model = build_tiny("llama")
    first, second = model.model.layers[2], model.model.layers[3]
    half = model.config.hidden_size // 2
    with torch.no_grad():
        for proj in (first.self_attn.k_proj, first.self_attn.v_proj):
            proj.weight[:, half:] = 0
        first.self_attn.o_proj.weight[:half] = 0
        first.mlp.down_proj.weight[:half] = 0
        second.input_layernorm.weight.copy_(first.input_layernorm.weight)
        second.self_attn.k_proj.weight.copy_(first.self_attn.k_proj.weight)
        second.self_attn.v_proj.weight.copy_(first.self_attn.v_proj.weight)
    return model


@pytest.fixture(scope="module")
def twin():
    return twin_llama()


def decode_paths(cache):
    return {store.decode_path(0) for store in cache.group_stores} if isinstance(cache, XKVCache) else None


@pytest.mark.parametrize("name", LOSSLESS)
def test_beam_search_gives_the_dense_caches_beams(name, twin):
    # Two different prompts, 3 beams each, 2 returned: the beams reorder rows within each prompt's block.
    prompt = torch.cat([ids(1, 30, seed=2), ids(1, 30, seed=4)])
    options = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    options.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    cache = LOSSLESS[name](twin)
    with torch.no_grad():
        expected = twin.generate(prompt, **options, **cache_kwargs(DynamicCache()))
        got = twin.generate(prompt, **options, **cache_kwargs(cache))
    new = expected.sequences[:, 30:]
    assert new.shape == (4, 8) and not torch.equal(new[0], new[1]) and not torch.equal(new[2], new[3])  # 2 beams each
    assert torch.equal(got.sequences, expected.sequences)
    # The logits and beam scores too: the same tokens could hide a cache that shifts every logit a little. Measured
    # differences: up to 2e-7 (logits, standard deviation 0.11) and 5e-7 (scores); float32 equality is 1e-4 here.
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=1e-4)
    assert decode_paths(cache) in ({name.removeprefix("xkv-")}, None)  # the path named, not a fallback


@pytest.mark.parametrize("name", LOSSLESS)
def test_sampling_with_a_fixed_seed_gives_the_dense_caches_tokens(name, twin):
    prompt = torch.cat([ids(1, 30, seed=2), ids(1, 30, seed=4)])
    options = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=2.0, pad_token_id=0)
    options.update(return_dict_in_generate=True, output_logits=True)
    cache = LOSSLESS[name](twin)
    with torch.no_grad():
        greedy = twin.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        expected = twin.generate(prompt, **options, **cache_kwargs(DynamicCache()))
        torch.manual_seed(0)
        got = twin.generate(prompt, **options, **cache_kwargs(cache))
    assert not torch.equal(expected.sequences, greedy)  # it sampled
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    assert decode_paths(cache) in ({name.removeprefix("xkv-")}, None)


#: The tiny Llama's shapes: 4 float32 layers, 2 KV heads of 8 dims (D = 16 per layer), groups of 2 layers.
HEADS, HEAD_DIM, F32 = 2, 8, 4
D = HEADS * HEAD_DIM


def expected_store_bytes(name, tokens):
    """Bytes of one group (xKV, keys and values at rank 4) or merged pair (MiniCache) of ``CACHES[name]``."""
    rank, layers = 4, 2
    if name == "xkv":  # per side: U (T, r) and one (r, D) matrix per layer
        return 2 * F32 * (tokens * rank + layers * rank * D)
    if name == "xkv-absorb-int8":  # int8 values; one float32 scale per row of at most 64 values (r = 4, D = 16)
        return 2 * (tokens * rank + F32 * tokens + layers * rank * D + F32 * layers * rank)
    if name == "xkv-selective":  # the factors, and per layer and KV head the index of 2-token chunks:
        chunks, exact = tokens // 2, 2 + 2 + 4  # 8 chunks held exact: 2 sink, 2 local and 4 outliers
        landmarks = chunks * (HEAD_DIM // 2 + F32)  # int4 (two a byte) and one float32 scale each
        exact_rows = exact * 8 + 2 * (exact * 2) * HEAD_DIM * F32  # int64 chunk ids; their keys and values
        return expected_store_bytes("xkv", tokens) + layers * HEADS * (landmarks + exact_rows)
    assert name == "minicache"  # per side: directions, 2 magnitudes, 2 x retained states, their int32 indices
    kept = int(0.05 * tokens)
    return 2 * (F32 * HEADS * tokens * (HEAD_DIM + 2) + 2 * F32 * HEADS * kept * HEAD_DIM + 4 * HEADS * kept)


@pytest.mark.parametrize("name", CACHES)
def test_bytes_are_measured_from_the_tensors_held(name, tiny_llama):
    tokens = 160
    cache = CACHES[name](tiny_llama)
    with torch.no_grad():
        tiny_llama(ids(1, tokens, seed=7), **cache_kwargs(cache))
    report = cache.memory_report()
    per_layer = 2 * F32 * tokens * D  # dense keys and values of one layer
    stores = 1 if name == "minicache" else 2  # MiniCache merges layers 2 and 3; layers 0 and 1 stay dense
    assert [g.held_bytes for g in report.groups] == [expected_store_bytes(name, tokens)] * stores
    assert report.dense_layer_bytes == (2 * per_layer if name == "minicache" else 0)
    assert report.tail_bytes == report.table_bytes == report.workspace_bytes == 0
    assert report.held_bytes == stores * expected_store_bytes(name, tokens) + report.dense_layer_bytes
    assert report.dense_bytes == 4 * per_layer


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_layers_survive_copies_files_and_materialize(family, tmp_path):
    from tests.conftest import build_tiny

    model = build_tiny(family)
    config = XKVConfig(factor_form="model", min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0, svd="exact")
    cache, own = XKVCache(model, config), DynamicCache(config=model.config)
    prompt, step = ids(1, 40), ids(1, 1, seed=9)
    with torch.no_grad():
        for c in (cache, own):
            model(prompt, **cache_kwargs(c))
        cache.save(tmp_path / "doc.xkv")
        copies = {"materialized": cache.materialize(), "with_ranks": cache.with_ranks(config),
                  "loaded": XKVCache.load(tmp_path / "doc.xkv", model)}  # fmt: skip
        expected = model(step, **cache_kwargs(own)).logits
        for name, copy in copies.items():
            assert copy.get_seq_length() == 40, name
            torch.testing.assert_close(model(step, **cache_kwargs(copy)).logits, expected, atol=1e-4, rtol=1e-4)
    # After the prefill a sliding layer holds its window only, not a view of the whole prompt's storage.
    window = model.config.sliding_window
    layer = cache.layers[cache.spec.sliding_layers[0]]
    assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes and layer.keys.shape[-2] == window - 1
    with pytest.raises(ValueError, match="sliding-window layer 0"):  # as transformers' own cache refuses
        cache.crop(20)
    assert cache.get_seq_length() == 40 and cache.group_stores[0].prefix_len == 40  # nothing was cropped
    with pytest.raises(ValueError, match="whole prompt"):  # a sliding-window cache cannot be compressed after
        XKVCache.from_dense(model, [(layer.keys, layer.values) for layer in own.layers], config)
