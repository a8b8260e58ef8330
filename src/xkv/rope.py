"""Rotary position embedding (RoPE) applied and removed, so keys can be factored before RoPE (xKV, section 3).

Conventions follow transformers' ``apply_rotary_pos_emb``: ``rotate_half`` pairs dimension ``i`` with
``i + rot_dim/2``, and a partial rotary embedding (Phi-3) rotates only the first ``cos.shape[-1]`` dimensions.
"""

from __future__ import annotations

import torch
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (bf16 cos/sin lose ~3 digits over a 4k-token rotation), else unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the angles behind ``cos``/``sin``.

    Args:
        x: ``(batch, heads, tokens, head_dim)``.
        cos: ``(batch, tokens, rot_dim)``, ``rot_dim <= head_dim``, broadcast over heads.
        sin: like ``cos``.

    Returns:
        ``(batch, heads, tokens, head_dim)`` in the dtype of ``x``; the math runs in float32 (float64 stays).
    """
    rot_dim = cos.shape[-1]
    cos, sin = _upcast(cos).unsqueeze(1), _upcast(sin).unsqueeze(1)
    x_rot, x_pass = _upcast(x[..., :rot_dim]), x[..., rot_dim:]
    rotated = (x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` for the same ``cos``/``sin``.

    Each dimension pair is multiplied by ``[[c, -s], [s, c]]``; its inverse is ``[[c, s], [-s, c]] / (c^2 + s^2)``
    (the denominator is the square of RoPE's attention scaling, 1 for plain RoPE).

    Args:
        x: post-RoPE keys ``(batch, heads, tokens, head_dim)``.
        cos: ``(batch, tokens, rot_dim)``.
        sin: like ``cos``.

    Returns:
        Pre-RoPE keys, same shape and dtype as ``x``; the math runs in float32 (float64 stays).
    """
    rot_dim = cos.shape[-1]
    cos, sin = _upcast(cos).unsqueeze(1), _upcast(sin).unsqueeze(1)
    x_rot, x_pass = _upcast(x[..., :rot_dim]), x[..., rot_dim:]
    unrotated = ((x_rot * cos - rotate_half(x_rot) * sin) / (cos * cos + sin * sin)).to(x.dtype)
    return torch.cat((unrotated, x_pass), dim=-1) if x_pass.shape[-1] else unrotated


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens)`` positions of a left-padded batch: ``0, 1, ...`` from each first real token, 0 on padding.

    As ``generate`` numbers them; ``attention_mask`` is ``(batch, tokens)``, 0 on padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RotaryAngles:
    """cos/sin of the model's own rotary module at given positions, always in float32.

    Args:
        rotary_emb: the model's rotary module (``model.model.rotary_emb``), called as ``rotary_emb(x, position_ids)``.
        layer_type: passed as a third argument where one module serves several layer kinds (Gemma 3).
    """

    def __init__(self, rotary_emb: nn.Module, layer_type: str | None = None):
        self.rotary_emb = rotary_emb
        self.layer_type = layer_type

    @torch.no_grad()
    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin, each ``(batch, tokens, rot_dim)`` float32, for ``position_ids`` ``(batch, tokens)``."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        extra = () if self.layer_type is None else (self.layer_type,)
        cos, sin = self.rotary_emb(probe, position_ids, *extra)
        return cos.float(), sin.float()


class PrefixAngles:
    """cos/sin of positions ``0..T-1``, computed once and shared by every layer and decode step.

    The prefix of an xKV cache always sits at positions ``0..T-1`` (checked at the first prefill), so its RoPE
    angles are the same for all layers and steps: recomputing them per layer and step cost about 0.9 ms at T=4096
    (research notes, section 11). The table is held (and counted by ``memory_report()``) while the cache lives.

    Args:
        angles: the model's RoPE at given positions.
    """

    def __init__(self, angles: RotaryAngles):
        self.angles = angles
        self.joint: torch.Tensor | None = None  # (T, 2 * rot_dim) float32: cos then sin, gathered in one go
        # transformers' default RoPE builds cos/sin as cat(freqs, freqs): both halves equal, so RoPE can run in place
        self.halves_equal = False

    def get(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(length, rot_dim)`` float32 cos and sin of positions ``0..length-1`` (views of the table)."""
        joint = self.joint_table(length, device)
        rot = joint.shape[-1] // 2
        return joint[:, :rot], joint[:, rot:]

    def joint_table(self, length: int, device: torch.device) -> torch.Tensor:
        """``(length, 2 * rot_dim)``: cos and sin side by side (a view of the table, grown when needed)."""
        if self.joint is None or self.joint.shape[0] < length or self.joint.device != device:
            cos, sin = self.angles(torch.arange(length, device=device).unsqueeze(0))
            self.joint = torch.cat([cos[0], sin[0]], dim=-1).contiguous()
            half = cos.shape[-1] // 2
            self.halves_equal = bool(
                torch.equal(cos[..., :half], cos[..., half : 2 * half])
                and torch.equal(sin[..., :half], sin[..., half : 2 * half])
            )
        return self.joint[:length]

    def tensors(self) -> list[torch.Tensor]:
        """The tables held (empty before the first use)."""
        return [self.joint] if self.joint is not None else []

    def reset(self) -> None:
        """Drop the tables."""
        self.joint = None


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x`` ``(batch, tokens, heads, head_dim)`` in place, ``cos``/``sin`` ``(tokens, rot_dim)`` float32.

    Only for float32/float64 ``x`` and tables whose halves are equal (:attr:`PrefixAngles.halves_equal`): then
    ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`` needs one half-size temporary instead of six prefix-sized ones.
    """
    half = cos.shape[-1] // 2
    c = cos[:, :half].unsqueeze(1).to(x.dtype)  # (tokens, 1, half)
    s = sin[:, :half].unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    first = x1.clone()
    x1.mul_(c).addcmul_(x2, s, value=-1.0)
    x2.mul_(c).addcmul_(first, s)
