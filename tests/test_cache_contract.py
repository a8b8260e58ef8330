"""Every cache class of the project through the same transformers ``Cache`` behaviours (one contract, not a copy per
class): generation, beam search, batch edits, crop, reset and reuse, and bytes measured from what is held."""

import pytest
import torch

from xkv import XKVCache, XKVConfig
from xkv.baselines.minicache import MiniCache, MiniCacheConfig
from xkv.compat import cache_kwargs

#: name -> factory(model). Add every new cache class here.
CACHES = {
    "xkv": lambda model: XKVCache(model, XKVConfig(min_tokens=0, group_size=2, rank_k=4, rank_v=4)),
    "xkv-absorb-int8": lambda model: XKVCache(
        model, XKVConfig(min_tokens=0, group_size=2, rank_k=4, rank_v=4, decode="absorb", factor_form="int8")
    ),
    "xkv-selective": lambda model: XKVCache(
        model, XKVConfig(min_tokens=0, group_size=2, rank_k=4, rank_v=4, decode="selective", sr_min_tokens=8)
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


@pytest.mark.parametrize("name", CACHES)
def test_beam_search_returns_every_sequence(name, tiny_llama):
    cache = CACHES[name](tiny_llama)
    with torch.no_grad():
        out = tiny_llama.generate(
            ids(1, 30, seed=2), max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False,
            pad_token_id=0, **cache_kwargs(cache),
        )  # fmt: skip
    assert out.shape == (2, 35)


@pytest.mark.parametrize("name", CACHES)
def test_bytes_are_measured_from_the_tensors_held(name, tiny_llama):
    cache = CACHES[name](tiny_llama)
    with torch.no_grad():
        tiny_llama(ids(1, 160, seed=7), **cache_kwargs(cache))
    report = cache.memory_report()
    assert 0 < report.held_bytes < report.dense_bytes


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_layers_survive_copies_files_and_materialize(family, tmp_path):
    from transformers import DynamicCache

    from tests.conftest import build_tiny

    model = build_tiny(family)
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=1.0, rank_v=1.0, svd="exact")
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
