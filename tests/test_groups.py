import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xkv import build_groups


@settings(deadline=None, max_examples=100)
@given(
    num_layers=st.integers(1, 40),
    group_size=st.integers(1, 10),
    grouping=st.sampled_from(["contiguous", "stride"]),
    data=st.data(),
)
def test_groups_partition_the_range(num_layers, group_size, grouping, data):
    first = data.draw(st.integers(0, num_layers - 1))
    last = data.draw(st.integers(first, num_layers - 1))
    groups = build_groups(num_layers, group_size, grouping, first, last)
    layers = sorted(layer for g in groups for layer in g.layers)
    assert layers == list(range(first, last + 1))
    assert all(1 <= g.size <= group_size for g in groups)
    assert [g.index for g in groups] == list(range(len(groups)))


def test_contiguous_and_stride_shapes():
    assert [g.layers for g in build_groups(30, 8)][-1] == (24, 25, 26, 27, 28, 29)
    assert [g.layers for g in build_groups(6, 2, "stride")] == [(0, 3), (1, 4), (2, 5)]


def test_range_errors():
    with pytest.raises(ValueError, match="first_layer"):
        build_groups(4, 2, first_layer=4)
    with pytest.raises(ValueError, match="last_layer"):
        build_groups(4, 2, first_layer=2, last_layer=1)
    with pytest.raises(ValueError, match="grouping"):
        build_groups(4, 2, grouping="x")
