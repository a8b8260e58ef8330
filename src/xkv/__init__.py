"""xkv: cross-layer SVD compression of the KV-cache (xKV, arXiv 2503.18893) for Hugging Face transformers.

Importing this package changes nothing global (no patching, no logging setup).
"""

from xkv.adapters import SUPPORTED_MODEL_TYPES, ModelSpec, describe_model
from xkv.cache import NonFiniteStatesError, XKVCache, XKVGroupStore, XKVLayer
from xkv.config import UnreachableRatioError, XKVConfig
from xkv.factorization import LowRankFactors, cross_layer_svd, relative_error
from xkv.groups import LayerGroup, build_groups
from xkv.memory import GroupMemory, MemoryReport, compression_factor, tensor_bytes

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnreachableRatioError",
    "GroupMemory",
    "LayerGroup",
    "LowRankFactors",
    "MemoryReport",
    "ModelSpec",
    "NonFiniteStatesError",
    "XKVCache",
    "XKVConfig",
    "XKVGroupStore",
    "XKVLayer",
    "build_groups",
    "compression_factor",
    "cross_layer_svd",
    "describe_model",
    "relative_error",
    "tensor_bytes",
]
