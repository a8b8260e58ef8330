"""The analysis measures on synthetic data with known answers."""

import pytest
import torch

from xkv.analysis import analyze_layers, energy_curve, linear_cka, subspace_alignment, token_cosine, top_subspace


def test_identical_layers_score_one_and_independent_ones_near_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    y = torch.randn(1024, 16, generator=gen)
    assert token_cosine(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert subspace_alignment(top_subspace(x, 8), top_subspace(x, 8)) == pytest.approx(1.0)
    assert abs(token_cosine(x, y)) < 0.05
    assert linear_cka(x, y) < 0.05
    assert subspace_alignment(top_subspace(x, 8), top_subspace(y, 8)) < 0.05  # random: about r / T
    # CKA ignores an orthogonal change of features, token cosine does not (xKV's premise in one line).
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, x @ q) == pytest.approx(1.0) and abs(token_cosine(x, x @ q)) < 0.9


def test_energy_curves_and_the_layer_analysis():
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(256, 4, generator=gen)
    layers = [basis @ torch.randn(4, 8, generator=gen) for _ in range(4)]  # one shared rank-4 token basis
    curve = energy_curve(layers)
    assert curve[3] == pytest.approx(1.0) and torch.all(curve[1:] >= curve[:-1] - 1e-12)
    result = analyze_layers(layers, rank=4, group_sizes=(1, 2, 4))
    assert all(result.alignment[i][j] == pytest.approx(1.0) for i in range(4) for j in range(4))
    assert sorted(result.energy) == [1, 2, 4] and result.energy[4][3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank"):
        analyze_layers(layers, rank=9)
    with pytest.raises(ValueError, match="one shape"):
        analyze_layers([layers[0], layers[1][:10]], rank=2)
