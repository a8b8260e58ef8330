"""Every difference between transformers versions that xkv depends on, in one place.

The rest of the package never tests versions. Research notes, section 4:

* 5.2: attention calls ``cache.update(k, v, layer_idx, {"sin", "cos", "cache_position"})`` (RoPE's cos/sin of the
  current tokens passed in); ``get_mask_sizes(cache_position, layer_idx)``; ``generate(past_key_values=...)``.
* 5.23: ``update(k, v, layer_idx)`` with nothing else; ``get_mask_sizes(query_length, layer_idx)``.
* 5.24: ``update(k, v, layer_idx, kwargs={"position_ids": ..., ...})``; ``cache=`` replaces ``past_key_values=``
  in ``forward`` and ``generate`` (the old name warns). The test suite's cache, memory and RoPE tests pass on 5.24.0.
* 5.25: as 5.24 in the cache contract; ``from_pretrained`` kernelizes models by default (hub kernels through the
  ``kernels`` package): :func:`loading_kwargs` turns that off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)

#: Lines the test suite runs on: the whole suite on 5.2.x, the core suite on the newest (``NEWEST_TRANSFORMERS`` in
#: the Makefile). Others may work; xkv warns nowhere and checks the contract at run time instead.
TESTED_TRANSFORMERS = ("5.2.*", "5.25.*")


@dataclass
class UpdateInputs:
    """What one ``Cache.update`` call tells about the incoming tokens, whatever the transformers version.

    Attributes:
        position_ids: ``(batch, tokens)`` positions RoPE used, if the call says so, else ``None``.
        cos: ``(batch, tokens, rot_dim)`` RoPE cos the model applied, if passed (5.2), else ``None``.
        sin: like ``cos``.
    """

    position_ids: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def read_update_inputs(cache_kwargs: dict[str, Any] | None, extra: dict[str, Any]) -> UpdateInputs:
    """Collect positions and RoPE angles from the arguments of ``Cache.update``.

    Args:
        cache_kwargs: the positional dict of 5.2 (``sin``, ``cos``, ``cache_position``), or ``None``.
        extra: keyword arguments (5.24 passes ``kwargs={"position_ids": ...}``).
    """
    inputs = UpdateInputs()
    kwargs = dict(cache_kwargs or {})
    nested = extra.get("kwargs")
    if isinstance(nested, dict):
        kwargs.update(nested)
    kwargs.update({k: v for k, v in extra.items() if k != "kwargs"})
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        inputs.position_ids = kwargs["position_ids"]
    if isinstance(kwargs.get("cos"), torch.Tensor) and isinstance(kwargs.get("sin"), torch.Tensor):
        inputs.cos, inputs.sin = kwargs["cos"], kwargs["sin"]
    return inputs


def query_length(arg: torch.Tensor | int) -> int:
    """Query length from ``get_mask_sizes``' first argument: ``cache_position`` (5.2) or ``query_length`` (5.23+)."""
    if isinstance(arg, torch.Tensor):
        return int(arg.shape[0])
    return int(arg)


def loading_kwargs() -> dict[str, Any]:
    """Keywords for ``from_pretrained`` that keep a model on transformers' own layers, offline.

    From 5.25 ``from_pretrained`` kernelizes models by default (``use_kernels=None`` means on), which needs the
    ``kernels`` package and fetches layers from the hub: offline, or without ``kernels``, loading fails, and a
    kernelized layer is not what the cache's attention hook was tested with. Earlier lines load as they are.
    """
    if Version("5.25") <= TRANSFORMERS_VERSION:
        return {"use_kernels": False}
    return {}


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword that hands a cache to ``model(...)`` or ``model.generate(...)``.

    ``past_key_values`` up to 5.23, ``cache`` from 5.24 (where ``past_key_values`` is deprecated).
    """
    if Version("5.24") <= TRANSFORMERS_VERSION:
        return {"cache": cache}
    return {"past_key_values": cache}


def mla_caches_latent(model: Any) -> bool:
    """Whether this transformers' Multi-head Latent Attention (DeepSeek V2/V3) hands the cache its latent.

    5.24 calls ``cache.update(latent, k_rope, layer_idx)`` with the normalized latent ``(b, 1, T, kv_lora_rank)`` and
    the rotated shared key part ``(b, 1, T, qk_rope_head_dim)``, then expands them per head (``expand_kv``); 5.2
    caches decompressed per-head keys and values. Checked on the model's attention modules, not on a version number.
    """
    for module in model.modules():
        if hasattr(module, "kv_a_proj_with_mqa"):
            return callable(getattr(module, "expand_kv", None))
    return False


def dequantized_for_saving(model: Any) -> Any:
    """Let ``save_pretrained`` write a model loaded from a GGUF file as plain (already dequantised) weights.

    transformers dequantises GGUF tensors while loading, but from 5.23 on it keeps a GGUF quantizer on the model and
    refuses to save it ("quantized with gguf and is not serializable"); 5.2 saves it as it is. The weights are
    plain tensors either way, so dropping the quantizer and its config entry changes no value (logits checked
    identical on 5.24.0).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model
