"""The decode paths: rebuild (lean), value absorption and Selective Reconstruction, on tiny models of every family."""

import dataclasses
import logging

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import TINY_FAMILIES, build_tiny
from xkv import XKVCache, XKVConfig
from xkv.attention import IMPLEMENTATION
from xkv.cache.decoding import PATHS
from xkv.compat import cache_kwargs
from xkv.decode import (
    build_selective_index,
    select_chunks,
    select_shared_chunks,
    selective_index_bytes,
    widened_count,
)
from xkv.forms import dequantize
from xkv.memory import tensor_bytes


def ids(batch, tokens, seed=0):
    return torch.randint(0, 99, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def config(decode, **overrides):
    base = dict(
        min_tokens=0, group_size=2, rank_k=0.5, rank_v=0.6, decode=decode, sr_chunk_size=4, sr_budget=8,
        sr_sink_chunks=1, sr_local_chunks=1, sr_outlier_chunks=1, sr_min_tokens=0, factor_form="model",
    )  # fmt: skip
    return XKVConfig(**{**base, **overrides})


@torch.no_grad()
def logits_after(model, cfg, prompt, turns):
    """Prefill ``prompt`` into an XKVCache, then feed each of ``turns``; logits of every turn, concatenated."""
    cache = XKVCache(model, cfg)
    model(prompt, use_cache=True, **cache_kwargs(cache))
    return torch.cat([model(t, use_cache=True, **cache_kwargs(cache)).logits for t in turns], dim=1), cache


TURNS = [ids(1, 5, seed=1), ids(1, 1, seed=2), ids(1, 1, seed=3)]  # a 5-token turn (causal tail), then decode


#: Families whose attention the fast paths compute (Gemma 2 caps its logits: it keeps the rebuild path).
FAST_FAMILIES = [family for family in sorted(TINY_FAMILIES) if family != "gemma2"]


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_absorb_equals_rebuild(family):
    model = build_tiny(family)
    prompt = ids(1, 64)
    rebuilt, _ = logits_after(model, config("rebuild"), prompt, TURNS)
    absorbed, cache = logits_after(model, config("absorb"), prompt, TURNS)
    assert model.config._attn_implementation == IMPLEMENTATION
    torch.testing.assert_close(absorbed, rebuilt, atol=1e-4, rtol=1e-4)
    assert all(store.decode_path(0) == "absorb" for store in cache.group_stores)


def test_softcapped_attention_keeps_the_rebuild_path():
    model = build_tiny("gemma2")
    prompt = ids(1, 64)
    rebuilt, _ = logits_after(model, config("rebuild"), prompt, TURNS)
    absorbed, cache = logits_after(model, config("absorb"), prompt, TURNS)
    assert model.config._attn_implementation != IMPLEMENTATION
    assert all(store.decode_path(0) == "rebuild" for store in cache.group_stores)
    torch.testing.assert_close(absorbed, rebuilt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("select", "landmarks"), [("head", "mean"), ("shared", "mean"), ("shared", "bounds")])
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_selective_with_a_budget_covering_the_prefix_equals_rebuild(family, select, landmarks):
    model = build_tiny(family)
    prompt = ids(1, 64)
    # No exact chunks and a budget of every chunk: attention sees exactly the rebuilt prefix.
    exact_free = dict(sr_budget=64, sr_sink_chunks=0, sr_local_chunks=0, sr_outlier_chunks=0)  # 64 = 4 budgets
    rebuilt, _ = logits_after(model, config("rebuild"), prompt, TURNS)
    chosen = dict(sr_select=select, sr_landmarks=landmarks)
    selective, cache = logits_after(model, config("selective", **chosen, **exact_free), prompt, TURNS)
    torch.testing.assert_close(selective, rebuilt, atol=1e-4, rtol=1e-4)
    # With exact chunks (outliers differ per head), at full rank, every token is exact either way: a shared pick
    # that is exact for one head must be hidden from it, or that head would attend the chunk twice.
    full = dict(rank_k=1.0, rank_v=1.0)
    rebuilt, _ = logits_after(model, config("rebuild", **full), prompt, TURNS)
    cfg = config("selective", sr_budget=64, sr_outlier_chunks=3, **chosen, **full)
    selective, cache = logits_after(model, cfg, prompt, TURNS)
    torch.testing.assert_close(selective, rebuilt, atol=1e-4, rtol=1e-4)
    assert all(store.decode_path(0) == "selective" for store in cache.group_stores)


def test_a_widened_step_rebuilds_the_widened_budget():
    model = build_tiny("llama")
    prompt = ids(1, 64)
    exact_free = dict(sr_sink_chunks=0, sr_local_chunks=0, sr_outlier_chunks=0)
    rebuilt, _ = logits_after(model, config("rebuild"), prompt, TURNS)
    # A budget of 4 of the 16 chunks, widened 4x wherever its chunks hold less than all of the landmark mass (every
    # step on random weights): every chunk is rebuilt, as with rebuild.
    widened, cache = logits_after(
        model, config("selective", sr_budget=16, sr_widen_below=1.0, sr_widen=4, **exact_free), prompt, TURNS
    )
    torch.testing.assert_close(widened, rebuilt, atol=1e-4, rtol=1e-4)
    assert all(store.decode_path(0) == "selective" for store in cache.group_stores)
    # Each turn (up to 16 tokens take the fast path) is one step on each compressed layer, every one widened.
    steps = len(TURNS) * sum(len(store.layers) for store in cache.group_stores)
    assert (cache.selective_counts.steps, cache.selective_counts.widened) == (steps, steps)
    cache.reset()
    assert cache.selective_counts.steps == 0
    # Unwidened (or widened only below a mass no step falls under), the same budget attends a quarter of the prefix.
    for never in (dict(sr_widen=1), dict(sr_widen_below=0.0)):
        narrow, cache = logits_after(
            model, config("selective", sr_budget=16, **{"sr_widen_below": 1.0, "sr_widen": 4, **never}, **exact_free),
            prompt, TURNS,
        )  # fmt: skip
        assert (narrow - rebuilt).abs().max() > 1e-3
        assert (cache.selective_counts.steps, cache.selective_counts.widened) == (steps, 0)


def test_widened_count_follows_the_landmark_mass_of_the_budget():
    sure = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05]).expand(1, 2, 3, 5)  # (b, H, M, C): 2 chunks hold 0.8
    spread = sure.clone()
    spread[0, 1, 2] = torch.full((5,), 0.2)  # one query row of one head: 2 chunks hold 0.4
    assert widened_count(sure, 2, below=0.5, factor=4) == 2
    assert widened_count(spread, 2, below=0.5, factor=4) == 8
    assert widened_count(spread, 2, below=0.3, factor=4) == 2
    assert widened_count(spread, 2, below=0.0, factor=4) == 2  # 0: never
    assert widened_count(spread, 2, below=0.5, factor=1) == 2
    assert widened_count(spread, 5, below=1.0, factor=4) == 5  # the budget already holds every chunk


def test_selective_at_a_small_budget_still_attends_every_exact_token():
    torch.manual_seed(0)
    batch, heads, tokens, head_dim, chunk = 2, 3, 70, 8, 4  # 17 chunks and 2 trailing tokens
    keys, values = torch.randn(batch, heads, tokens, head_dim), torch.randn(batch, heads, tokens, head_dim)
    index = build_selective_index(keys, values, chunk, sink_chunks=1, local_chunks=2, outlier_chunks=3)
    chunks = index.exact_chunks
    assert chunks.shape == (batch, heads, 6)
    assert (chunks[..., 0] == 0).all() and (chunks[..., -2:] == torch.tensor([15, 16])).all()
    # Exact rows: the exact chunks' tokens, then the 2 trailing tokens of no chunk; values untouched.
    rows = (chunks.unsqueeze(-1) * chunk + torch.arange(chunk)).flatten(2)
    rows = torch.cat([rows, torch.tensor([68, 69]).expand(batch, heads, -1)], dim=-1)
    expected = torch.gather(keys, 2, rows.unsqueeze(-1).expand(-1, -1, -1, head_dim))
    torch.testing.assert_close(index.exact_keys, expected)
    torch.testing.assert_close(index.exact_values, torch.gather(values, 2, rows.unsqueeze(-1).expand_as(expected)))
    # Outliers: the chunks whose least similar key agrees least with their landmark.
    chunked = keys[:, :, :68].reshape(batch, heads, 17, chunk, head_dim)
    means = chunked.mean(dim=3)
    # Landmarks are int4 (two a byte) with one absmax scale each: within half a step of the mean key.
    step = means.abs().amax(-1, keepdim=True) / 7
    assert index.landmarks.dtype == torch.uint8 and index.landmarks.shape[-1] == head_dim // 2
    assert (index.landmark_values() - means).abs().le(step / 2 + 1e-6).all()
    # Scores read from the nibbles equal the dequantized landmarks' (int8 landmarks of older files too).
    query = torch.randn(batch, heads, 3, head_dim)
    expected = torch.matmul(query, index.landmark_values().transpose(-1, -2))
    torch.testing.assert_close(index.landmark_scores(query), expected, rtol=1e-4, atol=1e-4)
    # In 16-bit queries too: no worse than a product with the dequantized landmarks (a mean far from zero).
    for dtype in (torch.bfloat16, torch.float16):
        shifted = (query + 3).to(dtype)
        exact = torch.matmul(shifted.float(), index.landmark_values().transpose(-1, -2))
        reference = torch.matmul(shifted, index.landmark_values().to(dtype).transpose(-1, -2)).float()
        error = (index.landmark_scores(shifted) - exact).abs().max()
        assert error <= 2 * (reference - exact).abs().max() + 1e-2
    old = torch.round(means / (means.abs().amax(-1, keepdim=True) / 127)).to(torch.int8)
    legacy = dataclasses.replace(index, landmarks=old, landmark_scales=means.abs().amax(-1, keepdim=True) / 127)
    torch.testing.assert_close(legacy.landmark_values(), means, rtol=0, atol=float(step.max()) / 17)
    torch.testing.assert_close(
        legacy.landmark_scores(query), torch.matmul(query, legacy.landmark_values().transpose(-1, -2)), rtol=1e-4,
        atol=1e-4,
    )  # fmt: skip
    cos = torch.nn.functional.cosine_similarity(chunked, means.unsqueeze(3), dim=-1).amin(-1)
    cos[:, :, [0, 15, 16]] = float("inf")
    assert torch.equal(chunks[..., 1:4].sort(-1).values, cos.topk(3, largest=False).indices.sort(-1).values)
    # The selection never picks an exact chunk, even when the query points straight at one.
    query = index.landmark_values()[:, :, 0:1].repeat(1, 1, 2, 1) * 50
    picked = select_chunks(query, index, count=2, scaling=1.0)
    assert not (picked.unsqueeze(-1) == chunks.unsqueeze(-2)).any()
    # A shared pick: chunks by their best score over the heads, flagged where a head keeps them exact.
    query = torch.randn(batch, heads, 2, head_dim)
    shared, exact = select_shared_chunks(query, index, count=5, scaling=1.0)
    best = torch.softmax(index.landmark_scores(query), dim=-1).amax(dim=2)
    best.scatter_(-1, chunks, -1.0)
    assert torch.equal(shared.sort(-1).values, best.amax(dim=1).topk(5).indices.sort(-1).values)
    assert torch.equal(exact, (shared.unsqueeze(1).unsqueeze(-1) == chunks.unsqueeze(-2)).any(-1))
    assert not exact.all(dim=1).any()  # 5 picks of 11 chunks no head keeps exact: none is exact for all heads
    # Asked for every chunk, it picks the ones every head keeps exact last, and flags them for every head.
    shared, exact = select_shared_chunks(query, index, count=17, scaling=1.0)
    assert exact[..., -3:].all() and torch.equal(
        shared[..., -3:].sort(-1).values, torch.tensor([0, 15, 16]).expand(2, 3)
    )


def test_bound_landmarks_score_the_best_key_a_chunk_can_hold():
    torch.manual_seed(1)
    batch, heads, tokens, head_dim, chunk = 1, 2, 64, 8, 4
    keys = torch.randn(batch, heads, tokens, head_dim) * 0.1
    spike = torch.randn(heads, head_dim)
    keys[0, :, 37] = spike * 3  # one key that stands out, in chunk 9
    index = build_selective_index(keys, keys, chunk, 0, 0, 0, bounds=True)
    assert index.bounds and index.landmarks.shape == (batch, heads, 16, head_dim)
    query = spike.view(1, heads, 1, head_dim)
    scores = index.landmark_scores(query)  # (b, H, 1, C)
    # The bound is q . centre + |q| . radius of the dequantized box, and at least the best key's score (up to int4
    # rounding of the box, half a step a value).
    chunked = keys.view(batch, heads, 16, chunk, head_dim)
    best = torch.einsum("bhqd,bhctd->bhqct", query, chunked).amax(-1)
    centre = index.landmark_values()
    half = head_dim // 2
    radius = dequantize(index.landmarks[..., half:], index.landmark_scales[..., 1:], 4, head_dim, head_dim,
                        torch.float32)  # fmt: skip
    expected = query @ centre.transpose(-1, -2) + query.abs() @ radius.transpose(-1, -2)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    steps = index.landmark_scales.sum(-1).unsqueeze(2) / 2  # (b, H, 1, C): half a step of centre and radius
    assert (scores >= best - query.abs().sum(-1, keepdim=True) * steps - 1e-4).all()
    # It ranks the spike's chunk first for every head; the mean dilutes the spike by the chunk size.
    assert (scores.argmax(-1) == 9).all()
    means = build_selective_index(keys, keys, chunk, 0, 0, 0)
    assert not means.bounds
    assert (index.landmark_scores(query)[..., 9] > means.landmark_scores(query)[..., 9]).all()


def test_selective_attention_includes_exact_tokens_at_the_smallest_budget():
    # Keys of one sink token made huge: whatever is selected, the output must follow that token's value.
    model = build_tiny("llama")
    prompt = ids(1, 64)
    cfg = config("selective", sr_budget=1)
    _, cache = logits_after(model, cfg, prompt, TURNS[:1])
    store = cache.group_stores[0]
    index = store.selective[0]
    assert store.config.budget_chunks(store.prefix_len) == 1 and index.exact_keys.shape[2] == 3 * 4
    index.exact_values[:, :, 0] = 1e3
    index.exact_keys[:, :, 0] = 0.0
    query = torch.zeros(1, 4, 1, 8)  # every score 0 => uniform weights over what is attended
    tail_k, tail_v = cache.layers[0].tail()
    out = PATHS["selective"]._attend(store, 0, tail_k, tail_v, query, None, 1.0)
    attended = 4 + index.exact_keys.shape[2] + tail_k.shape[2]  # one chunk, the exact rows, the tail
    assert torch.allclose(out[0, 0, :, :], torch.full((4, 8), 1e3 / attended), rtol=1e-3, atol=1.0)


def test_decode_bytes_are_counted():
    model = build_tiny("llama")
    prompt = ids(1, 64)
    _, cache = logits_after(model, config("selective"), prompt, TURNS)
    report = cache.memory_report()
    f32, heads, head_dim = 4, 2, 8
    chunks, exact_chunks, rows = 16, 3, 3 * 4
    for group, store in zip(report.groups, cache.group_stores, strict=True):
        factors = sum(
            t.numel() * f32
            for f in (store.key_factors, store.value_factors)
            for t in (f.token_basis, f.reconstruction)
        )
        # int4 landmarks + one float32 scale each, int64 chunk ids, exact keys and values
        per_layer = heads * (chunks * (head_dim // 2 + f32) + exact_chunks * 8 + 2 * rows * head_dim * f32)
        assert group.held_bytes == factors + 2 * per_layer
    assert report.table_bytes == 2 * 64 * head_dim * f32  # cos and sin of the 64 prefix positions
    assert report.held_bytes == sum(g.held_bytes for g in report.groups) + report.tail_bytes + report.table_bytes
    # The exact tail grows by doubling in preallocated buffers; bytes are the buffers'.
    tails = [layer.keys for layer in cache.layers]
    assert report.tail_bytes == tensor_bytes(tails + [layer.values for layer in cache.layers])
    assert all(t.untyped_storage().nbytes() == heads * 16 * head_dim * f32 for t in tails)


@pytest.mark.parametrize("bounds", [False, True])
@pytest.mark.parametrize(
    ("tokens", "chunk", "sink", "local", "outliers", "dtype"),
    [(64, 4, 1, 1, 1, torch.float32), (67, 8, 1, 2, 3, torch.bfloat16), (30, 4, 4, 4, 9, torch.float16),
     (9, 8, 2, 2, 2, torch.float32), (5, 8, 1, 1, 1, torch.float32), (96, 4, 0, 0, 0, torch.float32)],
)  # fmt: skip
def test_selective_index_bytes_are_the_tensors_bytes(tokens, chunk, sink, local, outliers, dtype, bounds):
    keys = torch.randn(2, 3, tokens, 8, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    index = build_selective_index(keys, keys * 2, chunk, sink, local, outliers, bounds=bounds)
    key_bytes, value_bytes = selective_index_bytes(
        tokens, 3, 8, keys.element_size(), chunk, sink, local, outliers, bounds
    )
    assert 2 * (key_bytes + value_bytes) == tensor_bytes(index.tensors())  # two sequences
    assert 2 * value_bytes == tensor_bytes([index.exact_values])


def test_a_compression_factor_pays_for_the_selective_index():
    model = build_tiny("llama")
    prompt = ids(1, 64)
    targets = dict(rank_k="3x", rank_v="2x", sr_max_share=1.0)
    _, plain = logits_after(model, config("absorb", **targets), prompt, TURNS)
    _, selective = logits_after(model, config("selective", **targets), prompt, TURNS)
    assert all(store.selective for store in selective.group_stores)
    for fast, slow in zip(selective.memory_report().groups, plain.memory_report().groups, strict=True):
        budget = fast.dense_bytes / 2 / 3 + fast.dense_bytes / 2 / 2  # keys at 3x, values at 2x
        assert fast.held_bytes <= budget  # the landmarks and exact chunks are paid within the budget
        assert fast.rank_k < slow.rank_k and fast.rank_v < slow.rank_v
        assert slow.held_bytes <= budget
    # The share of the budget the index takes decides whether it is held at all (sr_max_share).
    share = selective.group_stores[0].index_share(64, torch.float32)
    index = selective.group_stores[0].selective[0]
    per_layer = tensor_bytes(index.tensors())
    assert share == pytest.approx(2 * per_layer / (selective.memory_report().groups[0].dense_bytes * (1 / 6 + 1 / 4)))
    _, full = logits_after(model, config("selective", rank_k=1.0, rank_v=1.0), prompt, TURNS)
    for limit, held in ((share * 1.01, True), (share * 0.99, False)):
        _, cache = logits_after(model, config("selective", **{**targets, "sr_max_share": limit}), prompt, TURNS)
        assert all(bool(store.selective) == held for store in cache.group_stores)
        copy = full.with_ranks(config("selective", **{**targets, "sr_max_share": limit}))
        assert all(bool(store.selective) == held for store in copy.group_stores)


def test_an_index_that_does_not_fit_the_target_is_dropped(caplog):
    # 64 tokens of a tiny model: the 3 exact chunks alone are 19% of the dense bytes, more than keys at 6x allow.
    model = build_tiny("llama")
    tight = config("selective", rank_k="6x", rank_v="3x")
    with caplog.at_level(logging.INFO, logger="xkv.cache"):
        _, cache = logits_after(model, tight, ids(1, 64), TURNS)
    assert "do not fit the target" in caplog.text
    assert all(not store.selective and store.decode_path(0) == "absorb" for store in cache.group_stores)
    assert all(group.compression_factor >= 4 for group in cache.memory_report().groups)  # keys 6x, values 3x
    # A copy at those ranks of a cache that holds the index drops it too, and decodes like the one above.
    _, full = logits_after(model, config("selective", rank_k=1.0, rank_v=1.0), ids(1, 64), TURNS)
    assert all(store.selective for store in full.group_stores)
    copy = full.with_ranks(tight)
    assert all(not store.selective for store in copy.group_stores)
    assert [g.rank_k for g in copy.memory_report().groups] == [g.rank_k for g in cache.memory_report().groups]


def test_a_fold_drops_the_index_and_its_reservation():
    model = build_tiny("llama")
    targets = dict(rank_k="3x", rank_v="2x", sr_max_share=1.0)
    ranks = {}
    for decode in ("absorb", "selective"):
        _, cache = logits_after(model, config(decode, **targets), ids(1, 64), TURNS)
        assert bool(cache.group_stores[0].selective) == (decode == "selective")
        cache.fold(0)
        assert not any(store.selective for store in cache.group_stores)
        ranks[decode] = [(g.rank_k, g.rank_v) for g in cache.memory_report().groups]
    assert ranks["selective"] == ranks["absorb"]


def test_rebuild_workspace_is_counted():
    model = build_tiny("llama")
    _, cache = logits_after(model, config("rebuild"), ids(1, 64), TURNS)
    report = cache.memory_report()
    need = (64 + 5) * 16  # sized at the first turn: one layer's prefix and 5-token tail, D = 16
    assert report.workspace_bytes == 2 * (need + need // 16) * 4  # keys and values; 1/16 headroom holds 2 more
    groups = sum(g.held_bytes for g in report.groups)
    assert report.held_bytes == groups + report.tail_bytes + report.table_bytes + report.workspace_bytes


def test_a_request_left_untaken_is_reported_before_anything_is_stored():
    model = build_tiny("llama")
    cache = XKVCache(model, config("absorb"))
    with torch.no_grad():
        model(ids(1, 64), use_cache=True, **cache_kwargs(cache))
        k = torch.zeros(1, 2, 1, 8)
        cache.update(k, k, 0)  # as if attention had not run through "xkv"
        lengths = [layer.get_seq_length() for layer in cache.layers]
        with pytest.raises(RuntimeError, match="did not run through the 'xkv'"):
            cache.update(k, k, 1)
        assert [layer.get_seq_length() for layer in cache.layers] == lengths
        # A request another cache left behind is dropped, not blamed on this one.
        cache.update(k, k, 0)
        other = XKVCache(model, config("absorb"))
        model(ids(1, 64), use_cache=True, **cache_kwargs(other))
        model(ids(1, 1), use_cache=True, **cache_kwargs(other))


def test_a_copy_at_other_sr_settings_does_not_reuse_the_index():
    model = build_tiny("llama")
    _, cache = logits_after(model, config("selective", rank_k=1.0, rank_v=1.0), ids(1, 64), TURNS)
    same = cache.with_ranks(config("selective"))
    other = cache.with_ranks(config("selective", sr_chunk_size=8))
    assert all(store.selective for store in same.group_stores)
    assert all(not store.selective and store.decode_path(0) == "absorb" for store in other.group_stores)


def test_fast_paths_work_in_generate_and_beam_search():
    model = build_tiny("llama")
    prompt = ids(2, 64)
    mask = torch.ones_like(prompt)
    covering = dict(sr_budget=64, sr_sink_chunks=0, sr_local_chunks=0, sr_outlier_chunks=0)  # every chunk selected
    beam = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    beam.update(return_dict_in_generate=True, output_logits=True, output_scores=True)
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
            **cache_kwargs(XKVCache(model, config("rebuild"))),
        )  # fmt: skip
        # Beams of the exact paths: the rebuild path at the test's ranks, the model's own cache at full rank.
        references = {
            "low rank": model.generate(prompt[:1], **beam, **cache_kwargs(XKVCache(model, config("rebuild")))),
            "full rank": model.generate(prompt[:1], **beam, **cache_kwargs(DynamicCache())),
        }
        for decode in ("absorb", "selective"):
            got = model.generate(
                prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                **cache_kwargs(XKVCache(model, config(decode, **covering))),
            )  # fmt: skip
            assert torch.equal(got, expected)
            for ranks, reference in references.items():
                full = dict(rank_k=1.0, rank_v=1.0) if ranks == "full rank" else {}
                cache = XKVCache(model, config(decode, **covering, **full))
                beams = model.generate(prompt[:1], **beam, **cache_kwargs(cache))
                assert torch.equal(beams.sequences, reference.sequences), (decode, ranks)
                torch.testing.assert_close(torch.stack(beams.logits), torch.stack(reference.logits), atol=1e-4,
                                           rtol=1e-4)  # fmt: skip
                torch.testing.assert_close(beams.sequences_scores, reference.sequences_scores, atol=1e-4, rtol=1e-4)
                assert all(store.decode_path(0) == decode for store in cache.group_stores)
    assert len({tuple(row) for row in references["full rank"].sequences[:, 64:].tolist()}) == 3  # 3 distinct beams


def test_other_caches_are_untouched_by_the_xkv_implementation():
    model = build_tiny("qwen2", seed=3)
    prompt = ids(1, 30)
    with torch.no_grad():
        before = model(prompt, use_cache=True, past_key_values=DynamicCache()).logits
        XKVCache(model, config("selective"))
        assert model.config._attn_implementation == IMPLEMENTATION
        after = model(prompt, use_cache=True, past_key_values=DynamicCache()).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_fallbacks_are_logged(caplog):
    model = build_tiny("llama")
    with caplog.at_level(logging.INFO, logger="xkv"):
        logits_after(model, config("selective", compress_values=False), ids(1, 64), TURNS)
    assert "decodes with 'rebuild' instead of 'selective'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xkv"):
        logits_after(model, config("selective", sr_min_tokens=65), ids(1, 64), TURNS)
    assert "decodes with 'absorb' instead of 'selective'" in caplog.text


def test_bad_decode_settings_name_the_field():
    with pytest.raises(ValueError, match="`decode`"):
        XKVConfig(decode="fast")
    with pytest.raises(ValueError, match="`sr_budget`"):
        XKVConfig(sr_budget=0)
    with pytest.raises(ValueError, match="`sr_budget`"):
        XKVConfig(sr_budget=1.5)
    with pytest.raises(ValueError, match="`sr_chunk_size`"):
        XKVConfig(sr_chunk_size=0)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="`sr_max_share`"):
            XKVConfig(sr_max_share=bad)
    with pytest.raises(ValueError, match="`sr_outlier_chunks`"):
        XKVConfig(sr_outlier_chunks=-1)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="`sr_widen_below`"):
            XKVConfig(sr_widen_below=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="`sr_widen`"):
            XKVConfig(sr_widen=bad)
    with pytest.raises(ValueError, match="`sr_select`"):
        XKVConfig(sr_select="layer")
    with pytest.raises(ValueError, match="`sr_landmarks`"):
        XKVConfig(sr_landmarks="max")


@torch.no_grad()
def test_detach_gives_the_model_back_its_attention_and_the_cache_decodes_with_rebuild():
    model = build_tiny("llama")
    before = model.config._attn_implementation
    prompt = ids(1, 64)
    rebuilt, _ = logits_after(model, config("rebuild"), prompt, TURNS)
    cache = XKVCache(model, config("absorb"))
    model(prompt, use_cache=True, **cache_kwargs(cache))
    assert model.config._attn_implementation == IMPLEMENTATION
    cache.detach_from(model)
    assert model.config._attn_implementation == before
    after = torch.cat([model(t, use_cache=True, **cache_kwargs(cache)).logits for t in TURNS], dim=1)
    torch.testing.assert_close(after, rebuilt, atol=1e-4, rtol=1e-4)
    assert all(store.decode_path(0) == "rebuild" for store in cache.group_stores)
    with pytest.raises(ValueError, match="not the model this cache was built for"):
        cache.detach_from(build_tiny("llama"))


@torch.no_grad()
def test_the_model_is_switched_back_when_the_last_cache_lets_go():
    model = build_tiny("llama")
    before = model.config._attn_implementation
    first, second = XKVCache(model, config("absorb")), XKVCache(model, config("selective"))
    model(ids(1, 64), use_cache=True, **cache_kwargs(first))
    copy = first.with_ranks(config("absorb", rank_k=0.25))
    first.detach_from(model)
    assert model.config._attn_implementation == IMPLEMENTATION  # the second cache and the copy still decode fast
    assert copy.runtime.fast and second.runtime.fast
    second.detach_from(model)
    assert model.config._attn_implementation == IMPLEMENTATION
    with copy:
        pass
    assert model.config._attn_implementation == before
    with XKVCache(model, config("absorb")):
        assert model.config._attn_implementation == IMPLEMENTATION
    assert model.config._attn_implementation == before
