"""Rank budgets from plain numbers (xkv.budget): the K/V split of a target and the index's share of the bytes."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xkv.budget import index_reservations, side_budgets, split_factor
from xkv.config import parse_rank


@given(st.floats(1.05, 64.0), st.floats(0.25, 8.0))
def test_the_split_meets_the_target_and_keeps_values_above_1x(factor, key_share):
    f_k, f_v = split_factor(factor, key_share)
    assert 2 / (1 / f_k + 1 / f_v) == pytest.approx(factor, rel=1e-9)
    assert f_v >= 1.05 - 1e-9 or key_share <= 1
    if factor >= 2.1:
        assert f_k / f_v == pytest.approx(key_share, rel=1e-9)


def test_the_default_split_at_4x_is_k6_v3():
    assert split_factor(4.0, 2.0) == pytest.approx((6.0, 3.0))


@given(st.lists(st.just(0.0) | st.floats(1.0, 1e9), min_size=1, max_size=3), st.floats(0.0, 1e8))
def test_reservations_share_the_index_in_proportion(budgets, index_bytes):
    shares = index_reservations(budgets, index_bytes)
    assert len(shares) == len(budgets)
    if sum(budgets) > 0:
        assert math.fsum(shares) == pytest.approx(index_bytes, rel=1e-9, abs=1e-6)
        for share, budget in zip(shares, budgets, strict=True):
            assert share == 0.0 if budget == 0 or index_bytes == 0 else share > 0
    else:
        assert shares == [0.0] * len(budgets)


def test_side_budgets_count_only_compression_factors():
    settings = [parse_rank("4x", "rank_k"), parse_rank(16, "rank_v")]
    assert side_budgets(settings, 8, 100, 192, 4) == [8 * 100 * 192 * 4 / 4, 0.0]
