"""Clear errors where a cache would otherwise fail deep inside torch or compress nothing without a word."""

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache

from tests.conftest import build_tiny
from xkv import NonFiniteStatesError, XKVCache, XKVConfig
from xkv.compat import TRANSFORMERS_VERSION, cache_kwargs

CONFIG = XKVConfig(min_tokens=0, group_size=2, rank_k=6, rank_v=6)


def ids(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 99, (1, tokens), generator=torch.Generator().manual_seed(seed))


def poison(model, layer: int, proj: str = "k_proj"):
    """A hook that makes ``layer``'s ``proj`` output NaN for inputs of more than one token (the context only)."""

    def hook(module, inputs, output):
        if output.shape[1] > 1:
            return torch.full_like(output, float("nan"))
        return output

    return getattr(model.model.layers[layer].self_attn, proj).register_forward_hook(hook)


@pytest.mark.parametrize(("layer", "proj", "side"), [(2, "k_proj", "keys"), (1, "v_proj", "values")])
def test_non_finite_context_names_the_layer_and_leaves_the_cache_empty_and_usable(layer, proj, side):
    model = build_tiny("llama")
    prompt = ids(40)
    cache = XKVCache(model, CONFIG)
    handle = poison(model, layer, proj)
    try:
        with torch.no_grad(), pytest.raises(NonFiniteStatesError, match=rf"layer {layer}: .*non-finite {side}"):
            model(prompt, **cache_kwargs(cache))
    finally:
        handle.remove()
    assert cache.get_seq_length() == 0
    assert all(layer.get_seq_length() == 0 for layer in cache.layers)
    assert all(not store.is_ready and not store.pending_keys for store in cache.group_stores)
    # The same cache then takes a clean prompt and gives what a fresh one gives.
    with torch.no_grad():
        got = model(prompt, **cache_kwargs(cache)).logits
        fresh = model(prompt, **cache_kwargs(XKVCache(model, CONFIG))).logits
    torch.testing.assert_close(got, fresh, atol=0, rtol=0)


def test_non_finite_context_is_a_value_error_before_any_svd():
    # A ValueError (what callers catch for bad input), raised by the check, not by LAPACK's _LinAlgError.
    model = build_tiny("llama")
    handle = poison(model, 0)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="layer 0") as caught:
            model(ids(40), **cache_kwargs(XKVCache(model, CONFIG)))
    finally:
        handle.remove()
    assert type(caught.value) is NonFiniteStatesError


def test_a_context_kept_exact_behaves_like_a_dense_cache_with_non_finite_states():
    # Under min_tokens nothing is factored: the cache holds what the model gave, as DynamicCache does.
    model = build_tiny("llama")
    handle = poison(model, 1)
    try:
        with torch.no_grad():
            dense = model(ids(40), **cache_kwargs(DynamicCache())).logits
            got = model(ids(40), **cache_kwargs(XKVCache(model, XKVConfig(min_tokens=1024)))).logits
    finally:
        handle.remove()
    assert torch.isnan(dense).all() and torch.isnan(got).all()


CHUNKED = {"group_size": 2, "rank_k": 6, "rank_v": 6, "min_tokens": 64}


def chunk_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "arrives in chunks" in r.getMessage()]


def test_a_context_fed_in_chunks_under_min_tokens_is_reported_once_with_what_to_do(caplog):
    from xkv.generation import chunked_prefill

    model = build_tiny("llama")
    cache = XKVCache(model, XKVConfig(**CHUNKED))
    with caplog.at_level("WARNING", logger="xkv.cache"):
        chunked_prefill(model, ids(200), cache, chunk_size=32)
        chunked_prefill(model, ids(40, seed=1), cache, chunk_size=32)  # more chunks: still one warning
    (message,) = chunk_warnings(caplog)
    assert "first chunk had 32 tokens < min_tokens=64" in message
    assert "fold_tokens" in message and "prefill_chunk_size=64" in message
    report = cache.memory_report()
    assert report.held_bytes >= report.dense_bytes  # what the warning is about: nothing was compressed
    cache.reset()  # a new prompt in the same cache is told again
    with caplog.at_level("WARNING", logger="xkv.cache"):
        chunked_prefill(model, ids(100), cache, chunk_size=32)
    assert len(chunk_warnings(caplog)) == 2


def test_the_advice_of_the_chunk_warning_compresses_without_a_warning(caplog):
    from xkv.generation import chunked_prefill

    model = build_tiny("llama")
    cache = XKVCache(model, XKVConfig(**CHUNKED, fold_tokens=64, fold_keep=0))
    with caplog.at_level("WARNING", logger="xkv.cache"):
        chunked_prefill(model, ids(320), cache, chunk_size=64)
    assert chunk_warnings(caplog) == []
    assert all(store.is_ready and store.prefix_len == 256 for store in cache.group_stores)  # last chunk: the tail
    report = cache.memory_report()
    assert report.held_bytes < report.dense_bytes


def test_short_prompts_and_decode_steps_do_not_warn(caplog):
    model = build_tiny("llama")
    with caplog.at_level("WARNING", logger="xkv.cache"), torch.no_grad():
        out = model.generate(ids(40), max_new_tokens=30, do_sample=False, pad_token_id=0,
                             **cache_kwargs(XKVCache(model, XKVConfig(**CHUNKED))))  # fmt: skip
    assert out.shape[1] == 70  # 40 + 30 tokens grow past min_tokens one at a time: no chunk warning
    assert chunk_warnings(caplog) == []


@pytest.mark.skipif(
    Version("5.24") > TRANSFORMERS_VERSION, reason="5.2's generate(prefill_chunk_size=...) is refused (test_fold.py)"
)
def test_generate_with_prefill_chunks_under_min_tokens_warns_once(caplog):
    model = build_tiny("llama")
    with caplog.at_level("WARNING", logger="xkv.cache"), torch.no_grad():
        model.generate(ids(300), max_new_tokens=4, do_sample=False, pad_token_id=0, prefill_chunk_size=32,
                       **cache_kwargs(XKVCache(model, XKVConfig(**CHUNKED))))  # fmt: skip
    assert len(chunk_warnings(caplog)) == 1
