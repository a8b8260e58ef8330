import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xkv import compression_factor, cross_layer_svd, relative_error
from xkv.budget import full_rank, rank_for_compression_factor, resolve_rank
from xkv.config import parse_rank
from xkv.forms import FactorFormat


def make_layers(seed, batch, tokens, dim, group_size, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, dim, generator=gen, dtype=dtype) for _ in range(group_size)]


dims = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 2),
        "tokens": st.integers(2, 24),
        "dim": st.integers(1, 8),
        "group_size": st.integers(1, 4),
    }
)


@settings(deadline=None, max_examples=50)
@given(d=dims, data=st.data())
def test_shapes_and_full_rank_reconstruction(d, data):
    layers = make_layers(**d)
    bound = full_rank(d["tokens"], d["group_size"], d["dim"])
    rank = data.draw(st.integers(1, bound))
    factors = cross_layer_svd(layers, rank)
    assert factors.token_basis.shape == (d["batch"], d["tokens"], rank)
    assert factors.reconstruction.shape == (d["batch"], d["group_size"], rank, d["dim"])
    assert factors.token_basis.is_contiguous() and factors.reconstruction.is_contiguous()
    full = cross_layer_svd(layers, bound)
    for slot, layer in enumerate(layers):
        torch.testing.assert_close(full.layer(slot), layer, atol=1e-10, rtol=0)


@settings(deadline=None, max_examples=50)
@given(d=dims)
def test_error_falls_monotonically_with_rank(d):
    layers = make_layers(**d)
    errors = [relative_error(layers, cross_layer_svd(layers, r)) for r in range(1, full_rank(**_shape(d)) + 1)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-10


def _shape(d):
    return {"tokens": d["tokens"], "group_size": d["group_size"], "dim": d["dim"]}


@settings(deadline=None, max_examples=50)
@given(d=dims, data=st.data())
def test_eckart_young(d, data):
    layers = make_layers(**d)
    rank = data.draw(st.integers(1, full_rank(**_shape(d))))
    factors = cross_layer_svd(layers, rank)
    stacked = torch.cat(layers, dim=-1)
    s = torch.linalg.svdvals(stacked)
    for b in range(d["batch"]):
        err = sum(float((layers[g][b] - factors.layer(g)[b]).pow(2).sum()) for g in range(d["group_size"]))
        assert math.isclose(err, float(s[b, rank:].pow(2).sum()), rel_tol=1e-8, abs_tol=1e-9)


@settings(deadline=None, max_examples=30)
@given(d=dims, data=st.data())
def test_identical_layers_share_one_layers_error(d, data):
    one = make_layers(**{**d, "group_size": 1})
    rank = data.draw(st.integers(1, full_rank(d["tokens"], 1, d["dim"])))
    alone = relative_error(one, cross_layer_svd(one, rank))
    copies = one * d["group_size"]
    assert math.isclose(relative_error(copies, cross_layer_svd(copies, rank)), alone, rel_tol=1e-7, abs_tol=1e-9)


def test_randomized_close_to_exact_and_seeded():
    layers = make_layers(0, 1, 200, 16, 4, dtype=torch.float32)
    # Low-rank signal plus noise: the regime KV caches are in.
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(1, 200, 12, generator=gen)
    layers = [basis @ torch.randn(1, 12, 16, generator=gen) + 0.01 * layer for layer in layers]
    exact = relative_error(layers, cross_layer_svd(layers, 12))
    rand_a = cross_layer_svd(layers, 12, method="randomized", seed=3)
    rand_b = cross_layer_svd(layers, 12, method="randomized", seed=3)
    assert torch.equal(rand_a.token_basis, rand_b.token_basis)
    assert relative_error(layers, rand_a) <= exact * 1.05 + 1e-6


def _decaying(seed, tokens, dim, group_size):
    """Layers whose concatenation has a geometrically decaying spectrum (as KV caches do), float64."""
    gen = torch.Generator().manual_seed(seed)
    width = group_size * dim
    inner = min(tokens, width)
    left = torch.linalg.qr(torch.randn(tokens, inner, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(width, inner, generator=gen, dtype=torch.float64)).Q
    matrix = (left * torch.logspace(0, -3, inner, dtype=torch.float64)) @ right.T
    return list(matrix.unsqueeze(0).split(dim, dim=-1))


def _halko_qr_every_product(layers, rank, seed):
    """Algorithm 4.4 of Halko et al. with one power iteration and a QR after every product: the reference."""
    matrix = torch.cat(layers, dim=-1)
    generator = torch.Generator().manual_seed(seed)  # the test matrix cross_layer_svd(seed=seed) draws
    test = torch.randn(1, matrix.shape[-1], rank + 10, generator=generator, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test).Q
    basis = torch.linalg.qr(matrix.mT @ basis).Q
    basis = torch.linalg.qr(matrix @ basis).Q
    return basis


def test_randomized_spans_halko_subspace_and_half_iterations_order_the_error():
    layers = _decaying(0, 300, 16, 4)
    rank = 12
    factors = {n: cross_layer_svd(layers, rank, method="randomized", niter=n, seed=5) for n in (0, 0.5, 1, 1.5)}
    errors = {n: relative_error(layers, f) for n, f in factors.items()}
    exact = relative_error(layers, cross_layer_svd(layers, rank))
    # Each half iteration (one more pass over the matrix) brings the error closer to the exact SVD's.
    assert exact <= errors[1.5] <= errors[1] <= errors[0.5] <= errors[0]
    assert errors[0.5] - exact < 0.25 * (errors[0] - exact)
    # Orthonormalizing only the short side spans Halko's subspace: the token bases project alike.
    reference = _halko_qr_every_product(layers, rank, seed=5)
    ours = torch.linalg.qr(factors[1].token_basis).Q
    projected = reference.mT @ ours  # (1, w, rank): ours lies in the reference's span
    assert torch.allclose(projected.norm(dim=1), torch.ones(1, rank, dtype=torch.float64), atol=1e-8)


def test_randomized_on_a_wide_group():
    layers = _decaying(1, 40, 32, 3)  # 40 tokens, 96 features: the short side is the tokens
    for niter in (0.5, 1):
        factors = cross_layer_svd(layers, 8, method="randomized", niter=niter)
        assert factors.token_basis.shape == (1, 40, 8) and factors.reconstruction.shape == (1, 3, 8, 32)
        assert relative_error(layers, factors) <= relative_error(layers, cross_layer_svd(layers, 8)) * 1.05


@pytest.mark.parametrize("niter", [0.5, 1])
def test_randomized_factors_a_sequence_alike_alone_in_a_batch_and_left_padded(niter):
    first, second = _decaying(2, 120, 16, 3), _decaying(3, 120, 16, 3)
    alone = cross_layer_svd(second, 10, method="randomized", niter=niter)
    batch = cross_layer_svd(
        [torch.cat([a, b]) for a, b in zip(first, second, strict=True)], 10, method="randomized", niter=niter
    )
    assert torch.allclose(batch.layer(0)[1:], alone.layer(0), atol=1e-10)  # its place in the batch does not matter
    padded = cross_layer_svd(
        [torch.nn.functional.pad(x, (0, 0, 7, 0)) for x in second], 10, method="randomized", niter=niter
    )
    for slot in range(3):  # seven zero rows in front change the product only by rounding
        assert torch.allclose(padded.layer(slot)[:, 7:], alone.layer(slot), atol=1e-10)
        assert padded.layer(slot)[:, :7].abs().max() < 1e-10


@pytest.mark.parametrize("niter", [-1, 0.3, float("nan")])
def test_randomized_rejects_bad_niter(niter):
    with pytest.raises(ValueError, match="multiple of 0.5"):
        cross_layer_svd(_decaying(0, 60, 8, 2), 3, method="randomized", niter=niter)


def test_dtype_kept_and_bad_inputs():
    layers = make_layers(0, 1, 10, 4, 2, dtype=torch.float32)
    assert cross_layer_svd(layers, 3).token_basis.dtype == torch.float32
    assert cross_layer_svd(layers, 3, out_dtype=torch.bfloat16).reconstruction.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 8\]"):
        cross_layer_svd(layers, 9)
    with pytest.raises(ValueError, match="layer 1 of the group"):
        cross_layer_svd([layers[0], layers[1][:, :5]], 2)
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        cross_layer_svd([torch.zeros(3, 4)], 1)
    with pytest.raises(ValueError, match="method"):
        cross_layer_svd(layers, 2, method="qr")


@pytest.mark.parametrize("factor", [1.5, 2.0, 4.0, 8.0, 16.0])
@pytest.mark.parametrize(("tokens", "group_size", "dim"), [(4096, 8, 192), (2048, 4, 192), (1000, 1, 64)])
def test_rank_for_factor_is_the_largest_that_reaches_it(factor, tokens, group_size, dim):
    rank = rank_for_compression_factor(tokens, group_size, dim, factor)
    assert compression_factor(tokens, group_size, dim, rank) >= factor
    assert compression_factor(tokens, group_size, dim, rank + 1) < factor


def test_resolve_rank_errors_name_the_field():
    with pytest.raises(ValueError, match=r"rank_k for group 2.*\[1, 10\]"):
        resolve_rank(parse_rank(11, "rank_k"), 10, 2, 8, field_name="rank_k for group 2")
    with pytest.raises(ValueError, match="rank_v for group 0.*cannot reach"):
        resolve_rank(parse_rank("20x", "rank_v"), 10, 2, 8, field_name="rank_v for group 0")
    assert resolve_rank(parse_rank(1.0, "r"), 10, 2, 8, field_name="r") == 10
    assert resolve_rank(parse_rank(0.01, "r"), 10, 2, 8, field_name="r") == 1


@pytest.mark.parametrize("reserved", [0, 1000, 250_000])
@pytest.mark.parametrize("form", ["model", "int8"])
def test_reserved_bytes_come_out_of_the_budget(reserved, form):
    fmt = FactorFormat(form, 64)
    tokens, group_size, dim, factor = 2048, 8, 192, 4.0
    budget = group_size * tokens * dim * 4 / factor
    rank = rank_for_compression_factor(tokens, group_size, dim, factor, fmt, 4, reserved)
    assert fmt.factor_bytes(tokens, group_size, dim, rank, 4) + reserved <= budget
    assert fmt.factor_bytes(tokens, group_size, dim, rank + 1, 4) + reserved > budget
    assert rank_for_compression_factor(tokens, group_size, dim, factor, fmt, 4, budget) == 0
    with pytest.raises(ValueError, match="Selective Reconstruction's index"):
        resolve_rank(parse_rank("4x", "rank_k"), tokens, group_size, dim, field_name="rank_k", fmt=fmt,
                     reserved_bytes=budget)  # fmt: skip


@pytest.mark.parametrize(("tokens", "dim", "group_size"), [(300, 16, 4), (40, 32, 3)])  # tall, then wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_route_reaches_the_exact_svd_error(tokens, dim, group_size, dtype):
    layers = [x.to(dtype) for x in _decaying(2, tokens, dim, group_size)]
    for rank in (1, 5, 20):
        exact = relative_error(layers, cross_layer_svd(layers, rank))
        gram = cross_layer_svd(layers, rank, method="gram")
        assert gram.token_basis.shape == (1, tokens, rank) and gram.reconstruction.shape == (1, group_size, rank, dim)
        assert gram.token_basis.dtype == dtype
        # the optimal rank-r error (Eckart-Young): equal up to rounding, never below it by more than rounding
        assert relative_error(layers, gram) == pytest.approx(exact, rel=1e-4, abs=1e-6)


def test_gram_route_ignores_zero_rows_and_rank_deficient_input():
    layers = _decaying(3, 50, 8, 2)
    alone = cross_layer_svd(layers, 6, method="gram")
    padded = cross_layer_svd([torch.nn.functional.pad(x, (0, 0, 5, 0)) for x in layers], 6, method="gram")
    torch.testing.assert_close(padded.token_basis[:, 5:].abs(), alone.token_basis.abs(), atol=1e-9, rtol=1e-6)
    assert torch.equal(padded.token_basis[:, :5], torch.zeros_like(padded.token_basis[:, :5]))
    low = [torch.ones(1, 30, 4, dtype=torch.float64) * (i + 1) for i in range(2)]  # rank 1
    factors = cross_layer_svd(low, 3, method="gram")
    assert torch.isfinite(factors.token_basis).all() and relative_error(low, factors) < 1e-9
