"""Left-padded batches: each sequence keeps its own RoPE positions, padding never enters a basis."""

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import TINY_FAMILIES, build_tiny
from xkv import XKVCache, XKVConfig
from xkv.compat import UpdateInputs, cache_kwargs
from xkv.generation import greedy_generate
from xkv.positions import RotaryAngles, left_padding

FULL = {"rank_k": 1.0, "rank_v": 1.0, "factor_form": "model"}  # full rank in the model dtype: exact
PADS = (0, 11)  # the second sequence is 11 tokens shorter


def padded_batch(tokens: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2, tokens)`` ids and mask: sequence b left-padded by ``PADS[b]`` (pad id 0)."""
    ids = torch.randint(1, 99, (len(PADS), tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b, pad in enumerate(PADS):
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def forward(model, cache, ids, mask):
    """All logits of ``ids`` after what ``cache`` holds, positions counted from each sequence's first real token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[1] - ids.shape[1] :]
    return model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache)).logits


def run(model, cache, ids, mask, steps=20):
    """Prefill and ``steps`` greedy decode steps; the real rows' prefill logits and each step's logits."""
    out = [forward(model, cache, ids, mask)]
    for _ in range(steps):
        token = out[-1][:, -1:].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out.append(forward(model, cache, token, mask))
    real = mask[:, : ids.shape[1]].bool()
    return [out[0][b, real[b]] for b in range(ids.shape[0])], torch.cat(out[1:], dim=1)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("decode", ["rebuild", "absorb"])
def test_full_rank_padded_batch_matches_the_models_own_cache(family, decode):
    model = build_tiny(family)
    ids, mask = padded_batch()
    own = DynamicCache(config=model.config)
    xkv = XKVCache(model, XKVConfig(min_tokens=0, group_size=2, decode=decode, **FULL))
    with torch.no_grad():
        (exp_prefill, exp_steps), (got_prefill, got_steps) = run(model, own, ids, mask), run(model, xkv, ids, mask)
    for expected, got in zip(exp_prefill, got_prefill, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_steps, exp_steps, atol=1e-4, rtol=1e-4)
    assert xkv.runtime.pads.tolist() == list(PADS)


@pytest.mark.parametrize("decode", ["rebuild", "absorb"])
def test_padded_sequence_gets_what_it_gets_alone_at_the_same_ranks(tiny_llama, decode):
    ids, mask = padded_batch()
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=6, rank_v=7, svd="exact", decode=decode)
    batched, alone = XKVCache(tiny_llama, config), XKVCache(tiny_llama, config)
    pad = PADS[1]
    with torch.no_grad():
        _, steps = run(tiny_llama, batched, ids, mask)
        _, steps_alone = run(tiny_llama, alone, ids[1:, pad:], mask[1:, pad:])
    torch.testing.assert_close(steps[1:], steps_alone, atol=1e-4, rtol=1e-4)
    for store, store_alone in zip(batched.group_stores, alone.group_stores, strict=True):
        for factors, factors_alone in ((store.key_factors, store_alone.key_factors),
                                       (store.value_factors, store_alone.value_factors)):  # fmt: skip
            assert factors.basis()[1, :pad].abs().max() == 0  # padding rows: zero in the token basis
            for slot in range(store.group.size):
                rebuilt, rebuilt_alone = factors.layer(slot)[1, pad:], factors_alone.layer(slot)[0]
                torch.testing.assert_close(rebuilt, rebuilt_alone, atol=1e-4, rtol=1e-4)


def test_padding_survives_beam_reorder_and_greedy_batches_equal_each_sequence_alone(tiny_llama):
    ids, mask = padded_batch()
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=6, rank_v=7, svd="exact")
    got = greedy_generate(tiny_llama, ids, XKVCache(tiny_llama, config), 12, attention_mask=mask)
    assert len(got.sequences) == 2
    for b, pad in enumerate(PADS):
        alone = greedy_generate(tiny_llama, ids[b : b + 1, pad:], XKVCache(tiny_llama, config), 12)
        assert got.sequences[b] == alone.tokens
    with pytest.raises(ValueError, match="batch of one"):
        _ = got.tokens
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, **FULL))
    with torch.no_grad():
        forward(tiny_llama, cache, ids, mask)
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.runtime.pads.tolist() == [PADS[1], PADS[1], PADS[0]]
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.runtime.pads.tolist() == [PADS[1]]


def test_greedy_stops_each_sequence_at_its_own_stop_token(tiny_llama):
    ids, mask = padded_batch()
    free = greedy_generate(tiny_llama, ids, DynamicCache(), 8, attention_mask=mask).sequences
    stop = free[0][2]  # the first sequence stops before its third token; the other goes on unless it meets it
    got = greedy_generate(tiny_llama, ids, DynamicCache(), 8, [stop], attention_mask=mask).sequences
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])
    with pytest.raises(ValueError, match="attention_mask"):
        greedy_generate(tiny_llama, ids, DynamicCache(), 8, attention_mask=mask[:, 1:])


def test_generate_beam_search_and_sampling_on_a_padded_batch(tiny_llama):
    ids, mask = padded_batch()
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "pad_token_id": 0, "return_dict_in_generate": True}
    beams = {
        "num_beams": 2,
        "num_return_sequences": 2,
        "do_sample": False,
        "output_scores": True,
        "output_logits": True,
    }
    sampling = {"do_sample": True, "top_k": 20, "temperature": 2.0, "output_logits": True}
    with torch.no_grad():
        expected = tiny_llama.generate(ids, **beams, **kwargs, **cache_kwargs(DynamicCache()))
        xkv = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, **FULL))
        got = tiny_llama.generate(ids, **beams, **kwargs, **cache_kwargs(xkv))
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4, rtol=1e-4)
        # Sampling: the same seed before each call, so a cache that gives the same logits draws the same tokens.
        greedy = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, do_sample=False)
        torch.manual_seed(0)
        expected = tiny_llama.generate(ids, **sampling, **kwargs, **cache_kwargs(DynamicCache()))
        xkv = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, **FULL))
        torch.manual_seed(0)
        got = tiny_llama.generate(ids, **sampling, **kwargs, **cache_kwargs(xkv))
    assert not torch.equal(expected.sequences, greedy)  # it sampled
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    assert xkv.runtime.pads.tolist() == list(PADS) and xkv.group_stores[0].decode_path(0) == "absorb"


def test_left_padding_is_read_from_positions_or_from_angles(tiny_llama):
    tokens, batch = 12, 2
    positions = torch.tensor([list(range(tokens)), [1, 1, 1] + list(range(tokens - 3))])
    from_positions = left_padding(UpdateInputs(position_ids=positions), None, batch, tokens, torch.device("cpu"))
    assert from_positions.tolist() == [0, 3]
    angles = RotaryAngles(tiny_llama.model.rotary_emb)
    cos, sin = angles(positions)
    from_angles = left_padding(UpdateInputs(cos=cos, sin=sin), angles, batch, tokens, torch.device("cpu"))
    assert from_angles.tolist() == [0, 3]
    plain = torch.arange(tokens).expand(batch, -1)
    assert left_padding(UpdateInputs(position_ids=plain), None, batch, tokens, torch.device("cpu")) is None
    repeated = list(range(tokens - 1)) + [tokens - 2]  # last position 10: one pad, but row 1 is at 1, not 0
    for bad in (plain + 5, torch.tensor([list(range(tokens)), repeated])):
        with pytest.raises(ValueError, match="after its left padding"):
            left_padding(UpdateInputs(position_ids=bad), None, batch, tokens, torch.device("cpu"))
        cos, sin = angles(bad)
        with pytest.raises(ValueError, match="after its left padding"):
            left_padding(UpdateInputs(cos=cos, sin=sin), angles, batch, tokens, torch.device("cpu"))


def test_a_padded_cache_is_not_saved(tiny_llama, tmp_path):
    ids, mask = padded_batch()
    cache = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, **FULL))
    with torch.no_grad():
        forward(tiny_llama, cache, ids, mask)
    with pytest.raises(ValueError, match="left-padded"):
        cache.save(tmp_path / "padded.xkv")
    assert not (tmp_path / "padded.xkv").exists()


def test_reordered_padded_batch_decodes_like_the_models_own_cache_reordered(tiny_llama):
    ids, mask = padded_batch()
    own = DynamicCache()
    xkv = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, **FULL))
    order = torch.tensor([1, 1, 0])
    with torch.no_grad():
        for cache in (own, xkv):
            forward(tiny_llama, cache, ids, mask)
            cache.reorder_cache(order)
        mask = torch.cat([mask[order], mask.new_ones(3, 1)], dim=1)
        token = torch.tensor([[5], [7], [9]])
        expected, got = (forward(tiny_llama, cache, token, mask) for cache in (own, xkv))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    xkv.batch_select_indices(torch.tensor([2]))  # only the unpadded sequence is left: no padding to mind
    assert xkv.runtime.pads is None


@pytest.mark.parametrize("decode", ["rebuild", "absorb"])
def test_a_mask_without_positions_is_followed(tiny_llama, decode):
    """A forward loop that passes the mask but not position_ids: the model rotates at 0..T-1; the cache follows."""
    ids, mask = padded_batch()
    own = DynamicCache()
    xkv = XKVCache(tiny_llama, XKVConfig(min_tokens=0, group_size=2, decode=decode, **FULL))
    with torch.no_grad():
        for step in range(4):
            chunk = ids if step == 0 else torch.full((2, 1), 3 + step)
            mask = mask if step == 0 else torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            expected, got = (tiny_llama(chunk, attention_mask=mask, **cache_kwargs(c)).logits for c in (own, xkv))
            real = mask[:, -chunk.shape[1] :].bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert xkv.runtime.pads is None  # nothing said the batch was padded: positions were 0..T-1


def test_from_dense_takes_the_padding_mask(tiny_llama):
    ids, mask = padded_batch()
    config = XKVConfig(min_tokens=0, group_size=2, rank_k=6, rank_v=7, svd="exact")
    dense, during = DynamicCache(), XKVCache(tiny_llama, config)
    with torch.no_grad():
        forward(tiny_llama, dense, ids, mask)
        forward(tiny_llama, during, ids, mask)
    after = XKVCache.from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], config, mask)
    assert after.runtime.pads.tolist() == list(PADS)
    for a, b in zip(after.group_stores, during.group_stores, strict=True):
        for slot in range(a.group.size):
            torch.testing.assert_close(a.rebuild_keys(slot), b.rebuild_keys(slot), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        XKVCache.from_dense(tiny_llama, [(layer.keys, layer.values) for layer in dense.layers], config, mask[:, 1:])
