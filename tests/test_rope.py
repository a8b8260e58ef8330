import torch

from tests.conftest import build_tiny
from xkv.positions import RotaryAngles, apply_rope, unapply_rope


def test_unrotate_then_rotate_is_identity_with_the_models_rope():
    model = build_tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    angles = RotaryAngles(model.model.rotary_emb)
    gen = torch.Generator().manual_seed(0)
    keys = 20 * torch.randn(2, 2, 300, 8, generator=gen)  # post-RoPE keys up to ~|60|
    cos, sin = angles(torch.arange(300).unsqueeze(0).expand(2, -1))
    torch.testing.assert_close(apply_rope(unapply_rope(keys, cos, sin), cos, sin), keys, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(unapply_rope(apply_rope(keys, cos, sin), cos, sin), keys, atol=2e-5, rtol=1e-6)


def test_scaled_and_partial_rope_invert():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 50, 16, generator=gen)
    theta = torch.rand(1, 50, 4, generator=gen) * 100
    scale = 1.3  # YaRN-style attention scaling multiplies cos and sin
    cos = torch.cat([theta.cos(), theta.cos()], dim=-1) * scale
    sin = torch.cat([theta.sin(), theta.sin()], dim=-1) * scale
    rotated = apply_rope(x, cos, sin)  # rotates 8 of 16 dims
    torch.testing.assert_close(rotated[..., 8:], x[..., 8:])
    torch.testing.assert_close(unapply_rope(rotated, cos, sin), x, atol=1e-5, rtol=1e-5)


def test_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_tiny("llama")
    cos, sin = RotaryAngles(model.model.rotary_emb)(torch.arange(40).unsqueeze(0))
    x = torch.randn(1, 2, 40, 8)
    _, expected = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)
