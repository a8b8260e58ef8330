"""What xkv needs to know about a model's attention, per architecture: layer count, KV shape and RoPE module.

Architectures are listed by ``config.model_type``. Each one listed here applies RoPE to keys before
``Cache.update`` (so keys are un-rotated for factoring and rotated again when rebuilt). Sliding-window layers
(Gemma 2 and 3, or any model whose ``layer_types`` name them) are never factored: they keep transformers' own
sliding-window cache layer, bounded by the window, and groups are formed over the full-attention layers only, so a
group never mixes the two kinds. Gemma 3 rotates its two kinds with different RoPE bases; xkv uses the full-attention
one.

Multi-head Latent Attention (DeepSeek V2 and V3) is served where transformers caches the latent (5.24: the cache
gets the normalized latent ``c_kv`` and the rotated shared key part ``k_pe``; see
:func:`xkv.compat.mla_caches_latent`): the latent, which carries no RoPE, is factored across layers and ``k_pe`` is
kept exact, as in the paper (rank 512 over groups of 4 latents on DeepSeek-Coder-V2-Lite). Lines that cache
decompressed per-head keys and values (5.2) are refused, as is a model without an entry here
(:class:`NotImplementedError`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xkv.compat import TRANSFORMERS_VERSION, mla_caches_latent

#: model_type -> attribute path of the rotary module from the model's base (``model.model``).
_ROTARY_PATHS: dict[str, str] = {
    "gemma2": "rotary_emb",
    "gemma3_text": "rotary_emb",
    "llama": "rotary_emb",
    "mistral": "rotary_emb",
    "phi3": "rotary_emb",
    "qwen2": "rotary_emb",
    "qwen3": "rotary_emb",
}
#: model_type -> the ``layer_type`` argument its rotary module takes for full-attention layers (one module, one RoPE
#: base per layer kind).
_ROTARY_LAYER_TYPE: dict[str, str] = {"gemma3_text": "full_attention"}

#: Multi-head Latent Attention: the cache's "keys" are the latent, its "values" the shared rotated key part.
_LATENT_ATTENTION = ("deepseek_v2", "deepseek_v3")

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted((*_ROTARY_PATHS, *_LATENT_ATTENTION)))

#: RoPE variants whose frequencies depend on the sequence length seen so far.
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class ModelSpec:
    """The attention geometry of a decoder-only model.

    Attributes:
        model_type: ``config.model_type``.
        num_layers: decoder layers.
        num_kv_heads: key/value heads per layer.
        head_dim: features per head.
        rotary_emb: the module producing RoPE cos/sin from ``(x, position_ids)``; ``None`` if keys carry no RoPE.
        rotary_layer_type: a third argument for ``rotary_emb`` (Gemma 3: ``"full_attention"``), or ``None``.
        sliding_layers: layers with sliding-window attention (never factored; they keep a sliding-window layer).
        sliding_window: their window in tokens, or ``None`` without such layers.
        attention_softcap: the attention-logit softcapping (Gemma 2: ``tanh(s / c) * c``), or ``None``.
        value_head_dim: features per head of what the cache holds as values, where it differs from ``head_dim``.
        latent_attention: Multi-head Latent Attention: the cache's keys are the latent ``c_kv`` (one head of
            ``kv_lora_rank`` features, no RoPE: factored) and its values the rotated shared key part ``k_pe`` (one
            head of ``qk_rope_head_dim``: kept exact).
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rotary_emb: nn.Module | None
    rotary_layer_type: str | None = None
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    attention_softcap: float | None = None
    value_head_dim: int | None = None
    latent_attention: bool = False

    @property
    def kv_dim(self) -> int:
        """D, features of one layer's keys (or values) per token: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        """Features of one layer's values per token (``kv_dim`` unless ``value_head_dim`` says otherwise)."""
        return self.num_kv_heads * (self.value_head_dim or self.head_dim)


def describe_model(model: nn.Module) -> ModelSpec:
    """Read a transformers causal LM's attention geometry.

    Args:
        model: e.g. a ``LlamaForCausalLM``.

    Raises:
        NotImplementedError: for an architecture without an adapter; the message lists the supported ones.
        ValueError: if the model lacks the attributes its architecture should have.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"expected a transformers model with a `config`, got {type(model).__name__}")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    if model_type in _LATENT_ATTENTION:
        return _describe_latent_attention(model, text_config, model_type)
    if model_type not in _ROTARY_PATHS:
        raise NotImplementedError(
            f"xkv has no adapter for model_type {model_type!r} yet; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    window = getattr(text_config, "sliding_window", None)
    if not getattr(text_config, "use_sliding_window", True):
        window = None
    sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention") if window else ()
    unknown = sorted({kind for kind in layer_types} - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotImplementedError(f"{model_type} with layer types {unknown} is not supported")
    if window and not layer_types:
        raise NotImplementedError(
            f"{model_type} with sliding_window={window} and no `layer_types` (every layer sliding) is not supported: "
            "set sliding_window=None, or use_sliding_window=False, to run it with full attention"
        )
    if len(sliding) == text_config.num_hidden_layers:
        raise NotImplementedError(f"{model_type}: every layer uses sliding-window attention, none to compress")
    rope = getattr(text_config, "rope_parameters", None) or {}
    layer_type = _ROTARY_LAYER_TYPE.get(model_type)
    if layer_type is not None and not window and any(kind != layer_type for kind in layer_types):
        raise NotImplementedError(
            f"{model_type} without a sliding window still rotates its {sorted(set(layer_types) - {layer_type})} "
            "layers with their own RoPE base, which xkv does not factor yet: keep `sliding_window` set"
        )
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    rope_type = rope.get("rope_type", "default")
    if rope_type in _POSITION_DEPENDENT_ROPE:
        # These recompute RoPE's frequencies from the current length, so a prefix rotated again later would not
        # match the rotation its keys were cached with.
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported yet (frequencies change with length)")
    base = getattr(model, "model", model)
    rotary = getattr(base, _ROTARY_PATHS[model_type], None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary module at `.model.{_ROTARY_PATHS[model_type]}`")
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return ModelSpec(
        model_type=model_type,
        num_layers=text_config.num_hidden_layers,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rotary_emb=rotary,
        rotary_layer_type=layer_type,
        sliding_layers=sliding,
        sliding_window=window if sliding else None,
        attention_softcap=getattr(text_config, "attn_logit_softcapping", None),
    )


def _describe_latent_attention(model: nn.Module, config, model_type: str) -> ModelSpec:
    """DeepSeek V2/V3: the latent is what gets factored (see the module docstring)."""
    if not mla_caches_latent(model):
        raise NotImplementedError(
            f"{model_type} (Multi-head Latent Attention) needs a transformers whose attention caches the latent "
            f"(tested: 5.24); transformers {TRANSFORMERS_VERSION} caches decompressed per-head keys and values, which "
            "xkv does not factor"
        )
    return ModelSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_kv_heads=1,
        head_dim=config.kv_lora_rank,
        rotary_emb=None,  # the latent carries no RoPE; k_pe is kept as the model rotated it
        value_head_dim=config.qk_rope_head_dim,
        latent_attention=True,
    )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's parameters (the dtype of its KV-cache)."""
    return next(model.parameters()).dtype


def layer_devices(model: nn.Module) -> dict[int, str] | None:
    """Decoder layer -> the device its attention runs on, from accelerate's ``model.hf_device_map``; ``None`` without.

    A layer's attention module (the one with ``layer_idx``) takes the device of the longest map entry that is it or
    one of its ancestors (``"model.layers.3.self_attn"`` over ``"model.layers.3"`` over ``"model"`` over ``""``).
    """
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    devices: dict[int, str] = {}
    for name, module in model.named_modules():
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int) or layer in devices:
            continue
        owners = [entry for entry in device_map if entry == "" or name == entry or name.startswith(entry + ".")]
        if owners:
            devices[layer] = str(device_map[max(owners, key=len)])
    return devices
