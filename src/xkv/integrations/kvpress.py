"""xKV as a kvpress press: ``pipe(context, question=..., press=XKVPress(config))``.

kvpress's pipeline prefills the context into a ``DynamicCache`` inside ``with press(model):`` and then answers
through that same cache object. :class:`XKVPress` hands the prefill an :class:`~xkv.cache.XKVCache` instead (a
forward pre-hook on the decoder, for that one call) and, once the context is in, gives the pipeline's cache the
compressed layers, so the answer is decoded from the factors: nothing dense is written back. The cache of the last
prefill stays on the press (``press.cache``, ``press.memory_report()``).

Needs ``kvpress`` (``pip install 'xkv[eval]'``), which pins transformers below 5.3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import DynamicCache

from xkv.cache import XKVCache
from xkv.config import XKVConfig
from xkv.memory import MemoryReport

try:
    from kvpress import BasePress
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("xkv.integrations.kvpress needs kvpress: pip install 'xkv[eval]'") from err


@dataclass
class XKVPress(BasePress):
    """Cross-layer SVD compression (xKV) in kvpress's pipeline; the answer decodes from the stored factors.

    One question per pipeline call: kvpress removes each answer from the cache by slicing dense layers, which the
    compressed layers do not follow (``questions=[...]`` would see the earlier answers). The model stays on the
    ``"xkv"`` attention implementation afterwards (it computes what ``"sdpa"`` does for every other cache), since
    the pipeline decodes after the press's block has closed.

    Attributes:
        config: the xKV settings (ranks, groups, decode path).
        cache: the :class:`XKVCache` of the last prefill (``None`` before the first).
    """

    config: XKVConfig = field(default_factory=XKVConfig)
    cache: XKVCache | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.config.fold_tokens:
            # The pipeline decodes through its DynamicCache, which never calls XKVCache's fold hook.
            raise ValueError("XKVPress does not fold tails: use `fold_tokens=0` (kvpress answers one question)")

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """Within the block, the decoder's next prefill into an empty ``DynamicCache`` goes through xKV."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        handles = []
        swapped: list[DynamicCache] = []  # the pipeline's cache, while its prefill runs through xKV

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            cache = kwargs.get("past_key_values")
            if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
                return None  # not the pipeline's fresh cache: leave the call alone
            self.cache = XKVCache(model, self.config)
            swapped.append(cache)
            return args, {**kwargs, "past_key_values": self.cache}

        def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if swapped and self.cache is not None:
                swapped.pop().layers = self.cache.layers  # the pipeline decodes through the compressed layers

        handles.append(decoder.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(decoder.register_forward_hook(after, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def memory_report(self) -> MemoryReport:
        """Bytes held by the last prefill's cache, measured from its tensors.

        Raises:
            RuntimeError: before the press has compressed anything.
        """
        if self.cache is None:
            raise RuntimeError("XKVPress has not compressed a context yet")
        return self.cache.memory_report()
