"""grouping: auto: groups formed from the measured alignment of the layers' top singular subspaces."""

import random

import pytest
import torch
from transformers import DynamicCache

from xkv import XKVCache, XKVConfig
from xkv.analysis import alignment_groups, alignment_matrix, within_group_score
from xkv.calibration import auto_groups, layer_states
from xkv.compat import cache_kwargs
from xkv.groups import build_groups


def test_alignment_groups_recover_interleaved_clusters():
    # Layers 0, 2, 4, 6 are alike and so are 1, 3, 5, 7: contiguous groups of 4 mix the two kinds.
    similarity = [[1.0 if i == j else (0.9 if i % 2 == j % 2 else 0.1) for j in range(8)] for i in range(8)]
    found = alignment_groups(similarity, 4)
    assert found == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert within_group_score(similarity, found) == pytest.approx(0.9)
    assert within_group_score(similarity, [[0, 1, 2, 3], [4, 5, 6, 7]]) == pytest.approx((2 * 0.9 + 4 * 0.1) / 6)


def test_alignment_groups_keep_contiguous_sizes_and_never_score_below_contiguous():
    rng = random.Random(0)
    n, size = 11, 4
    similarity = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            similarity[i][j] = similarity[j][i] = 1.0 if i == j else rng.random()
    found = alignment_groups(similarity, size)
    assert sorted(len(g) for g in found) == [3, 4, 4]
    assert sorted(x for g in found for x in g) == list(range(n))
    contiguous = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    assert within_group_score(similarity, found) >= within_group_score(similarity, contiguous)
    assert alignment_groups(similarity, size) == found  # deterministic
    with pytest.raises(ValueError, match="square"):
        alignment_groups([[1.0, 0.0]], 2)
    with pytest.raises(ValueError, match="group_size"):
        alignment_groups(similarity, 0)


def test_alignment_matrix_is_one_for_the_same_subspace_and_low_for_independent_layers():
    torch.manual_seed(0)
    basis = torch.randn(64, 4)
    same = [basis @ torch.randn(4, 16), basis @ torch.randn(4, 16)]
    matrix = alignment_matrix([*same, torch.randn(64, 16)], rank=4)
    assert matrix[0][1] == pytest.approx(1.0, abs=1e-6)
    assert matrix[0][2] < 0.3  # about r / T = 4 / 64 for independent subspaces


def test_build_groups_takes_measured_groups_that_cover_the_range():
    groups = build_groups(6, 3, "auto", dense_layers=[5], groups=[[4, 0], [1, 2, 3]])
    assert [g.layers for g in groups] == [(0, 4), (1, 2, 3)]
    with pytest.raises(ValueError, match="cover exactly"):
        build_groups(6, 3, "auto", groups=[[0, 1, 2], [3, 4]])
    with pytest.raises(ValueError, match="needs `groups`"):
        build_groups(6, 3, "auto")


def test_auto_groups_on_a_model_give_a_config_the_cache_serves(tiny_llama, tmp_path):
    ids = torch.randint(0, 99, (1, 48), generator=torch.Generator().manual_seed(3))
    found = auto_groups(
        tiny_llama, ids, XKVConfig(factor_form="model", group_size=2, min_tokens=0, rank_k=1.0, rank_v=1.0), rank=4
    )
    config = found.config
    assert config.grouping == "auto" and sorted(x for g in config.groups for x in g) == [0, 1, 2, 3]
    assert found.score >= found.contiguous_score
    assert len(found.similarity) == 4 and found.similarity[0][0] == pytest.approx(1.0)
    path = tmp_path / "groups.yaml"
    config.save(path)
    assert XKVConfig.load(path) == config
    cache = XKVCache(tiny_llama, config)
    assert [list(g.layers) for g in cache.groups] == config.groups
    with torch.no_grad():
        expected = tiny_llama(ids, **cache_kwargs(DynamicCache())).logits
        got = tiny_llama(ids, **cache_kwargs(cache)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    lower = cache.with_ranks(XKVConfig.from_dict({**config.to_dict(), "rank_k": 2, "rank_v": 2}))
    assert [g.rank_k for g in lower.memory_report().groups] == [2, 2]
    states = layer_states(tiny_llama, ids)
    assert len(states["keys"]) == 4 and states["keys"][0].shape == (48, 16)
    with pytest.raises(ValueError, match="rank"):
        auto_groups(tiny_llama, ids, config, rank=99, states=states)


@pytest.mark.parametrize("form", ["model", "int4"])
def test_allocated_ranks_meet_the_target_and_come_back_from_the_config(tiny_llama, form):
    from xkv.calibration import allocate_ranks

    ids = torch.randint(0, 99, (1, 64), generator=torch.Generator().manual_seed(4))
    layout = XKVConfig(factor_form=form, factor_group_size=16, group_size=2, min_tokens=0, decode="rebuild")
    allocated = allocate_ranks(tiny_llama, ids, 3.0, layout)
    # The default int4 form's "auto" int8 head would take bytes the allocation gave to directions: it is turned off.
    assert allocated.config.factor_head == (0 if form == "int4" else "auto")
    assert allocated.factor >= 3.0
    assert all(0 < e <= 1 + 1e-9 for group in allocated.energy for e in group)  # shares of the energy (full rank: 1)
    assert isinstance(allocated.config.rank_k, list) and len(allocated.config.rank_k) == 2
    cache = XKVCache(tiny_llama, allocated.config)
    with torch.no_grad():
        tiny_llama(ids, **cache_kwargs(cache))
    report = cache.memory_report()
    assert [(g.rank_k, g.rank_v) for g in report.groups] == allocated.ranks  # the stored factors give them back
    held = sum(g.held_bytes for g in report.groups)
    assert sum(g.dense_bytes for g in report.groups) / held == pytest.approx(allocated.factor, rel=1e-6)
    with pytest.raises(ValueError, match="target"):
        allocate_ranks(tiny_llama, ids, 1.0, layout)


def test_a_per_group_allocation_scales_to_each_target():
    from xkv.evaluation.methods import xkv_config_for

    base = XKVConfig(rank_k=["6x", "12x"], rank_v=["3x", "4x"])
    scaled = xkv_config_for(8.0, base)
    factors = [float(f[:-1]) for f in (*scaled.rank_k, *scaled.rank_v)]
    assert len(factors) / sum(1 / f for f in factors) == pytest.approx(8.0, rel=1e-4)
    assert factors[1] / factors[0] == pytest.approx(2.0, rel=1e-4)  # proportions kept
    with pytest.raises(ValueError, match="every entry is a factor"):
        xkv_config_for(8.0, XKVConfig(rank_k=["6x", 12], rank_v=["3x", "4x"]))
    with pytest.raises(ValueError, match="equal length"):
        xkv_config_for(8.0, XKVConfig(rank_k=["6x", "12x"], rank_v="3x"))


def test_auto_groups_average_only_the_factored_sides_and_other_layouts_drop_them(tiny_llama):
    from xkv.evaluation.methods import SingleLayerSVD
    from xkv.evaluation.tune import candidate

    ids = torch.randint(0, 99, (1, 48), generator=torch.Generator().manual_seed(3))
    states = layer_states(tiny_llama, ids)
    keys_only = auto_groups(tiny_llama, ids, XKVConfig(group_size=2, compress_values=False), rank=4, states=states)
    assert keys_only.similarity == alignment_matrix(states["keys"], 4)
    auto = auto_groups(tiny_llama, ids, XKVConfig(group_size=2), rank=4, states=states).config
    single = SingleLayerSVD(config=auto).config_for(4.0)  # one layer per group: the measured groups do not apply
    assert single.group_size == 1 and single.grouping == "contiguous" and single.groups is None
    tried = candidate(auto, 4.0, {"group_size": 4})
    assert tried.grouping == "contiguous" and tried.groups is None
    assert candidate(auto, 4.0, {"factor_form": "int8"}).groups == auto.groups


@pytest.mark.parametrize("form", ["model", "int8", "int4"])
def test_the_written_factor_of_an_allocated_rank_resolves_to_that_rank(form):
    from xkv.budget import resolve_rank
    from xkv.calibration import rank_factor
    from xkv.config import RankSetting
    from xkv.forms import FactorFormat

    fmt = FactorFormat(form, 64)
    checked = 0
    for tokens in (300, 2038, 4000):
        for group_size in (1, 2, 4, 8):
            for dim, itemsize in ((64, 4), (192, 2), (192, 4)):
                bound = min(tokens, group_size * dim)
                for rank in sorted({1, 2, 7, 37, 58, 199, bound // 3, bound - 1, bound} - {0}):
                    if rank > bound or fmt.factor_bytes(tokens, group_size, dim, rank, itemsize) >= (
                        tokens * group_size * dim * itemsize
                    ):
                        continue  # an allocation never gives a side its dense bytes
                    written = float(f"{rank_factor(fmt, tokens, group_size, dim, rank, itemsize):.6g}")
                    setting = RankSetting("factor", written)
                    got = resolve_rank(setting, tokens, group_size, dim, field_name="r", fmt=fmt, itemsize=itemsize)
                    assert got == rank, (tokens, group_size, dim, itemsize, rank)
                    checked += 1
    assert checked > 150


def test_allocation_on_the_svd_baseline_and_tune_falls_back_to_the_default_split(tiny_llama):
    from xkv.evaluation.methods import SingleLayerSVD, xkv_config_for
    from xkv.evaluation.tune import candidate

    listed = XKVConfig(group_size=2, rank_k=["6x", "12x"], rank_v=["3x", "4x"])
    single = SingleLayerSVD(config=listed).config_for(4.0, tiny_llama)
    assert single.group_size == 1 and single.rank_k == "6x" and single.rank_v == "3x"  # the default split at 4x
    assert candidate(listed, 4.0, {"group_size": 4}).rank_k == "6x"
    with pytest.raises(ValueError, match="key_share"):
        candidate(listed, 4.0, {"key_share": 2.0})
    weighted = xkv_config_for(8.0, listed, group_sizes=[3, 1])
    factors = [float(f[:-1]) for f in (*weighted.rank_k, *weighted.rank_v)]
    assert sum((3, 1, 3, 1)) / sum(w / f for w, f in zip((3, 1, 3, 1), factors, strict=True)) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="factor <= 1"):
        xkv_config_for(1.2, listed)
