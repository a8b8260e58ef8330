"""Positions, padding and RoPE: the one owner of where a token sits and how its key is rotated.

Keys are factored before RoPE (xKV, section 3), so RoPE is removed at the prefill and applied again where keys are
rebuilt. Conventions follow transformers' ``apply_rotary_pos_emb``: rotate-half pairs dimension ``i`` with
``i + rot_dim/2``, and a partial rotary embedding (Phi-3) rotates only the first ``cos.shape[-1]`` dimensions. One
rotate-half product (:func:`rope_rows`) serves every out-of-place rotation; :func:`apply_rope_` is its in-place form
for the rebuild workspace. The angles of the prefix positions are built once per cache (:class:`PrefixAngles`).
"""

from __future__ import annotations

import torch
from torch import nn

from xkv.compat import UpdateInputs


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (bf16 cos/sin lose ~3 digits over a 4k-token rotation), else unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate rows of ``x`` ``(..., n, hd)`` by angles ``(..., n, rot)`` broadcast to its leading shape.

    ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`` on the two halves of the first ``rot`` dimensions, in float32 (float64
    stays); the rest of ``x`` passes through. Returns ``x``'s shape and dtype.
    """
    rot = cos.shape[-1]
    half = rot // 2
    x_rot = _upcast(x[..., :rot])
    out = x_rot * cos
    out[..., :half].addcmul_(x_rot[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x_rot[..., :half], sin[..., half:])
    out = out.to(x.dtype)
    return torch.cat((out, x[..., rot:]), dim=-1) if rot < x.shape[-1] else out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the angles behind ``cos``/``sin``.

    Args:
        x: ``(batch, heads, tokens, head_dim)``.
        cos: ``(batch, tokens, rot_dim)``, ``rot_dim <= head_dim``, broadcast over heads.
        sin: like ``cos``.

    Returns:
        ``(batch, heads, tokens, head_dim)`` in the dtype of ``x``; the math runs in float32 (float64 stays).
    """
    return rope_rows(x, _upcast(cos).unsqueeze(1), _upcast(sin).unsqueeze(1))


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`apply_rope` for the same ``cos``/``sin``.

    Each dimension pair is multiplied by ``[[c, -s], [s, c]]``; its inverse is ``[[c, s], [-s, c]] / (c^2 + s^2)``
    (the denominator is the square of RoPE's attention scaling, 1 for plain RoPE): a rotation by ``-s``, scaled.

    Args:
        x: post-RoPE keys ``(batch, heads, tokens, head_dim)``.
        cos: ``(batch, tokens, rot_dim)``.
        sin: like ``cos``.

    Returns:
        Pre-RoPE keys, same shape and dtype as ``x``; the math runs in float32 (float64 stays).
    """
    cos, sin = _upcast(cos).unsqueeze(1), _upcast(sin).unsqueeze(1)
    scale = cos * cos + sin * sin
    return rope_rows(x, cos / scale, -sin / scale)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens)`` positions of a left-padded batch: ``0, 1, ...`` from each first real token, 0 on padding.

    As ``generate`` numbers them; ``attention_mask`` is ``(batch, tokens)``, 0 on padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_padding(
    inputs: UpdateInputs, angles: RotaryAngles | None, batch: int, tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Left padding per sequence of a first prefill, read from its RoPE positions; ``None`` if there is none.

    Each sequence must sit at positions ``0..n-1`` after its ``T - n`` padding tokens (what ``generate`` gives a
    left-padded batch); padding rows may carry any position. Positions come from ``position_ids`` (5.24) or are
    matched from the cos/sin the model applied (5.2); without either, ``0..T-1`` is assumed.

    Returns:
        ``(batch,)`` int64 padding counts, or ``None`` if every sequence starts at position 0 at index 0.

    Raises:
        ValueError: for positions of any other pattern (custom ``position_ids``, a shifted start).
    """
    index = torch.arange(tokens, device=device).unsqueeze(0)
    if inputs.position_ids is not None:
        positions = inputs.position_ids.to(device).expand(batch, tokens)
        pads = tokens - 1 - positions[:, -1]
        valid = bool(((pads >= 0) & (pads < tokens)).all())
        if valid:
            real = index >= pads.unsqueeze(1)
            valid = bool(torch.equal(positions[real], (index - pads.unsqueeze(1))[real]))
    elif inputs.cos is not None and inputs.sin is not None and angles is not None:
        cos, sin = angles(index)  # (1, T, rot)
        given_cos, given_sin = inputs.cos.float().to(device), inputs.sin.float().to(device)
        if given_cos.shape[-1] != cos.shape[-1] or given_cos.shape[-2] != tokens:
            valid, pads = False, torch.zeros(batch, dtype=torch.long, device=device)
        else:
            given_cos, given_sin = given_cos.expand(batch, -1, -1), given_sin.expand(batch, -1, -1)
            # the last token's angles name its position: the nearest row of the table (RoPE's slowest frequency
            # turns by far less than a full circle over T tokens, so rows are distinct)
            gap = (given_cos[:, -1:] - cos).square().sum(-1) + (given_sin[:, -1:] - sin).square().sum(-1)
            pads = tokens - 1 - gap.argmin(-1)
            rows = (index - pads.unsqueeze(1)).clamp(min=0)
            real = (index >= pads.unsqueeze(1)).unsqueeze(-1)
            tol = 1e-4 if inputs.cos.dtype in (torch.float32, torch.float64) else 2e-2
            valid = bool(
                ((given_cos - cos[0][rows]).abs().le(tol) | ~real).all()
                and ((given_sin - sin[0][rows]).abs().le(tol) | ~real).all()
            )
    else:
        return None
    if not valid:
        # Positions are known from position_ids; from cos/sin only their match against 0..T-1, which failed.
        seen = f" (the last of {tokens} at {int(positions[:, -1].max())})" if inputs.position_ids is not None else ""
        raise ValueError(
            "XKVCache needs each sequence of the first prefill at RoPE positions 0..n-1 after its left padding "
            f"(as generate() gives a left-padded batch); the model used other positions{seen}. Custom position_ids "
            "are not supported, and transformers 5.2's generate(prefill_chunk_size=...) "
            "gives a first chunk the positions of the prompt's last tokens: prefill the context in one call, in "
            "chunks with xkv.generation.chunked_prefill, or use generate's chunked prefill on transformers >= 5.24."
        )
    return pads.long() if bool(pads.any()) else None


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
