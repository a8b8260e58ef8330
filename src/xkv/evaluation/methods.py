"""Compression methods as the evaluation runs them: one small class per method, looked up by name.

Every method is asked for a target compression factor (dense bytes / bytes held, in the model's dtype) and reports
the factor it measured from the tensors it holds after the context. Every method reuses one dense prefill per
sample: ``full``, ``xkv``, ``svd`` and ``minicache`` only read the finished cache; ``QuantizedCache`` quantizes a
layer's states at its first update, which equals quantizing them afterwards; kvpress presses prune a layer's cache
after its attention, from inputs the prefill captures, which equals pruning during the forward pass (each
equivalence is tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from xkv.adapters import describe_model
from xkv.baselines.minicache import MiniCache
from xkv.baselines.presses import (
    PRESSES,
    PrefillCapture,
    make_press,
    press_forward,
    press_memory_report,
    replay_press,
)
from xkv.baselines.quantized import (
    dequantized_copy,
    quantization_token_multiple,
    quantized_cache,
    quantized_from_dense,
    quantized_memory_report,
    tail_tokens,
)
from xkv.budget import split_factor
from xkv.cache import XKVCache, effective_config, groups_for
from xkv.config import SR_INDEX_FIELDS, UnreachableRatioError, XKVConfig
from xkv.generation import Step, cache_step, chunked_prefill, decode_n_tokens
from xkv.memory import dense_kv_bytes, tensor_bytes


@dataclass
class SampleContext:
    """What every method gets for one sample.

    Attributes:
        model: the causal LM.
        context_ids: ``(1, context_tokens)``, the part that is compressed.
        question_ids: ``(1, question_tokens)``, appended uncompressed (may be empty when the question is compressed).
        stop_ids: tokens that end the answer.
        max_new_tokens: answer length cap.
        dense: per layer ``(keys, values)`` of the context's dense prefill, for methods that reuse it.
        last_logits: ``(1, vocab)`` logits after the context (used when ``question_ids`` is empty).
        capture: the attention layers' inputs during that prefill, for methods with ``needs_capture``.
        scratch: per-sample work a method may reuse across target factors (e.g. full-rank factors).
    """

    model: nn.Module
    context_ids: torch.Tensor
    question_ids: torch.Tensor
    stop_ids: list[int]
    max_new_tokens: int
    dense: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    last_logits: torch.Tensor | None = None
    capture: PrefillCapture | None = None
    scratch: dict[str, Any] = field(default_factory=dict)

    def dense_bytes(self) -> int:
        """Bytes a dense cache of the context holds, in the model's dtype."""
        keys = self.dense[0][0] if self.dense else None
        dtype = keys.dtype if keys is not None else next(self.model.parameters()).dtype
        num_layers = len(self.dense) if self.dense else self.model.config.num_hidden_layers
        dim = keys.shape[1] * keys.shape[-1] if keys is not None else 0
        return dense_kv_bytes(1, self.context_ids.shape[1], num_layers, dim, dtype)


@dataclass
class Outcome:
    """One method's answer for one sample at one target factor.

    Attributes:
        tokens: generated token ids.
        held_bytes: KV bytes held after the context, measured from the tensors.
        dense_bytes: what a dense cache holds for the same context.
        details: method-specific facts (ranks, settings) for the JSONL row.
    """

    tokens: list[int]
    held_bytes: int
    dense_bytes: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def compression_factor(self) -> float:
        """Measured dense / held."""
        return self.dense_bytes / self.held_bytes if self.held_bytes else float("inf")


def greedy_answer(ctx: SampleContext, step: Step) -> list[int]:
    """Greedy answer, feeding the question and then each token through ``step`` (:func:`decode_n_tokens`).

    The question (if any) is fed first; when the question was compressed with the context, the first token comes
    from the prefill's logits.
    """
    logits = step(ctx.question_ids) if ctx.question_ids.shape[1] else ctx.last_logits
    return decode_n_tokens(step, logits, ctx.max_new_tokens, ctx.stop_ids, ctx.context_ids.device).tokens


def answer_through(ctx: SampleContext, cache: Any) -> list[int]:
    """Greedy answer through a cache that already holds the context."""
    return greedy_answer(ctx, cache_step(ctx.model, cache))


class Method:
    """Base class: ``run`` answers one sample at one target compression factor (``xkv eval``).

    ``new_cache`` and ``prefill`` serve ``xkv bench``, which times a method's own cache (no target factor) through
    the same registry (:data:`xkv.bench.BENCH_METHODS` maps its names onto :data:`METHODS`).

    Attributes:
        name: registry name.
        reuses_prefill: whether ``run`` needs ``ctx.dense`` (one shared prefill) instead of prefilling itself.
        needs_capture: whether ``run`` also needs ``ctx.capture`` (the attention inputs of that prefill).
        prefill_chunk: tokens per forward pass when the method prefills a context itself (``None``: one pass).
    """

    name: ClassVar[str]
    reuses_prefill: ClassVar[bool] = True
    needs_capture: ClassVar[bool] = False
    prefill_chunk: ClassVar[int | None] = None

    def __init__(self, **options: Any):
        self.options = options

    def new_cache(self, model: nn.Module, config: XKVConfig | None = None) -> Cache:
        """An empty cache at this method's own settings, to prefill and decode through (``xkv bench``).

        Args:
            model: the causal LM.
            config: base xKV settings for the xKV methods (each sets its decode path and form over them).

        Raises:
            NotImplementedError: for a method that only compresses a finished prefill to a target factor.
        """
        raise NotImplementedError(
            f"method {self.name!r} has no cache of its own to prefill (it needs a target factor)"
        )

    def prefill(
        self, model: nn.Module, context_ids: torch.Tensor, cache: Cache, chunk_size: int | None = None
    ) -> torch.Tensor:
        """Prefill ``context_ids`` into ``cache`` (:func:`chunked_prefill`); last logits ``(batch, vocab)`` out.

        Args:
            model: the causal LM.
            context_ids: ``(batch, tokens)``.
            cache: from :meth:`new_cache`.
            chunk_size: tokens per forward pass; ``prefill_chunk`` by default, else the whole context in one.
        """
        chunk = chunk_size or self.prefill_chunk or context_ids.shape[1]
        return chunked_prefill(model, context_ids, cache, chunk)

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Answer the sample holding about ``1 / factor`` of the dense bytes.

        Raises:
            UnreachableRatioError: if the method cannot reach ``factor``.
        """
        raise NotImplementedError


class FullCache(Method):
    """The uncompressed cache (``factor`` must be 1)."""

    name = "full"

    def new_cache(self, model: nn.Module, config: XKVConfig | None = None) -> Cache:
        """An empty ``DynamicCache``."""
        return DynamicCache()

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Answer through a copy of the dense prefill."""
        cache = DynamicCache()
        for layer_idx, (keys, values) in enumerate(ctx.dense):
            cache.update(keys.clone(), values.clone(), layer_idx)
        held = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
        return Outcome(answer_through(ctx, cache), held, ctx.dense_bytes())


def key_share_of(config: XKVConfig) -> float:
    """How many times harder ``config`` compresses keys than values (2 unless both ranks are one factor each)."""
    if isinstance(config.rank_k, list) or isinstance(config.rank_v, list):
        return 2.0
    k, v = config.rank_setting("k", 0, 1), config.rank_setting("v", 0, 1)
    if k.kind != "factor" or v.kind != "factor":
        return 2.0
    return k.value / v.value


def xkv_config_for(
    factor: float,
    base: XKVConfig | None = None,
    key_share: float | None = None,
    group_sizes: list[int] | None = None,
) -> XKVConfig:
    """Ranks for ``factor`` overall, keys compressed ``key_share`` times harder than values.

    With ``1/f_k + 1/f_v = 2/f`` and ``f_k = key_share * f_v``: ``f_v = f (1 + key_share) / (2 key_share)``.
    ``key_share`` defaults to the base config's split (:func:`key_share_of`): the default config's K@6x / V@3x gives
    2, and at 4x this is that default again (benchmarks/defaults). Below 2.1x the split is narrowed to
    ``factor / (2.1 - factor)`` at most, so values keep a factor of at least 1.05 (at 1.3x: K@1.71x / V@1.05x).
    Every other field comes from ``base``. A base with per-group factor lists (an allocation) keeps its proportions
    and is scaled to ``factor`` overall, each group weighted by its layers (``group_sizes``; equal without them).
    """
    base = base or XKVConfig()
    if isinstance(base.rank_k, list) or isinstance(base.rank_v, list):
        if key_share is not None:
            raise ValueError("a K/V split (`key_share`) does not apply to per-group rank lists (an allocation)")
        return _scaled_allocation(factor, base, group_sizes)
    f_k, f_v = split_factor(factor, key_share_of(base) if key_share is None else key_share)
    # min_tokens=0: the harness asked for this factor, so short contexts are compressed too (or reported unreachable).
    data = {**base.to_dict(), "rank_k": f"{f_k:.4g}x", "rank_v": f"{f_v:.4g}x", "min_tokens": 0}
    return XKVConfig.from_dict(data)


def without_measured_layout(config: XKVConfig) -> dict[str, Any]:
    """Fields that undo what was measured for ``config``'s group layout (auto groups, per-group rank lists).

    For a config run at another group size: contiguous groups, and the default K/V split for list ranks.
    """
    fields: dict[str, Any] = {"grouping": "contiguous", "groups": None} if config.grouping == "auto" else {}
    if isinstance(config.rank_k, list) or isinstance(config.rank_v, list):
        default = XKVConfig()
        fields.update(rank_k=default.rank_k, rank_v=default.rank_v)
    return fields


def _group_sizes(config: XKVConfig | None, model: nn.Module | None) -> list[int] | None:
    """Layers per group of ``config`` on ``model``, for weighting a per-group allocation (``None`` without one)."""
    if model is None or config is None or not (isinstance(config.rank_k, list) or isinstance(config.rank_v, list)):
        return None
    spec = describe_model(model)
    return [group.size for group in groups_for(effective_config(config, spec), spec)]


def _scaled_allocation(factor: float, base: XKVConfig, group_sizes: list[int] | None = None) -> XKVConfig:
    """``base``'s per-group factors (e.g. from :func:`xkv.calibration.allocate_ranks`) scaled to ``factor`` overall.

    Every entry is multiplied by one constant, so the allocation's proportions stay; the overall factor is the
    harmonic mean of the entries weighted by the dense bytes they stand for (the layers of their group).

    Raises:
        ValueError: unless every compressed side is a list of compression factors (``"Nx"``), one per group.
    """
    names = [name for name, on in (("rank_k", base.compress_keys), ("rank_v", base.compress_values)) if on]
    lengths = {len(value) if isinstance(value, list) else None for value in (getattr(base, n) for n in names)}
    if None in lengths or len(lengths) != 1:
        raise ValueError(f"per-group ranks are scaled to a target only as lists of equal length on {names}")
    (count,) = lengths
    assert count is not None
    settings = [[base.rank_setting(name[-1], i, count) for i in range(count)] for name in names]
    entries = [r for side in settings for r in side]
    if any(r.kind != "factor" for r in entries):
        raise ValueError("per-group ranks are scaled to a target only when every entry is a factor such as '6x'")
    weights = group_sizes or [1] * count
    if len(weights) != count:
        raise ValueError(f"the per-group rank lists have {count} entries but the model has {len(weights)} groups")
    weighted = [(w, r) for side in settings for w, r in zip(weights, side, strict=True)]
    overall = sum(w for w, _ in weighted) / sum(w / r.value for w, r in weighted)
    scale = factor / overall
    if any(r.value * scale <= 1 for r in entries):
        raise ValueError(f"scaled to {factor:g}x overall, this allocation would give a group side a factor <= 1")
    scaled = {name: [f"{r.value * scale:.6g}x" for r in side] for name, side in zip(names, settings, strict=True)}
    return XKVConfig.from_dict({**base.to_dict(), **scaled, "min_tokens": 0})


class XKVMethod(Method):
    """xKV at the configuration's group size, ranks derived from the target factor, decoded with the rebuild path.

    The rebuild path gives attention the whole rebuilt prefix, so the answer is decoded through a materialized copy
    (the same attention, at dense speed; tested). Subclasses with another ``decode`` path decode through the real
    cache, since their attention sees something else.
    """

    name = "xkv"
    decode: ClassVar[str] = "rebuild"
    #: Config fields this method sets over the base config (e.g. a storage form).
    overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, label: str | None = None, **options: Any):
        super().__init__(**options)
        self.labelled = label is not None
        if label is not None:  # a method named after a config file (``--methods tuned=best.yaml``)
            self.name = label

    def config_for(self, factor: float, model: nn.Module | None = None) -> XKVConfig:
        """The config run at ``factor`` (ranks from :func:`xkv_config_for`, other fields from the base config).

        A config-file method keeps the file's ``decode``; the registered methods set their own. ``model`` weights
        the groups of a per-group allocation by their layers.
        """
        base = self.options.get("config")
        return self.settings(xkv_config_for(factor, base, group_sizes=_group_sizes(base, model)))

    def settings(self, base: XKVConfig) -> XKVConfig:
        """``base`` with this method's fields over it: its ``overrides`` and ``decode`` (a config file's own)."""
        decode = base.decode if self.labelled else self.decode
        return XKVConfig.from_dict({**base.to_dict(), **self.overrides, "decode": decode})

    def new_cache(self, model: nn.Module, config: XKVConfig | None = None) -> Cache:
        """An empty ``XKVCache`` at :meth:`settings` over ``config`` (else the method's config, else the default)."""
        return XKVCache(model, self.settings(config or self.options.get("config") or XKVConfig()))

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Compress the shared prefill, answer through the rebuilt cache, count the real cache's bytes."""
        config = self.config_for(factor, ctx.model)
        cache = self._compress(ctx, config)
        report = cache.memory_report()
        details = {
            "group_size": config.group_size,
            "rank_k": [g.rank_k for g in report.groups],
            "rank_v": [g.rank_v for g in report.groups],
        }
        if config.factor_form != "model":
            details["factor_form"] = config.factor_form
            details["factor_group_size"] = config.factor_group_size
            details["factor_rotation"] = config.factor_rotation
        # Selective Reconstruction changes what attention sees: decode through the real cache. So do the registered
        # absorb/selective methods (they exist to run those paths end to end); "absorb" in a config file is the
        # rebuild path's attention (tested to 1e-4), decoded through the faster materialized copy.
        if config.decode == "selective" or (not self.labelled and self.decode != "rebuild"):
            details["decode"] = config.decode
            return Outcome(answer_through(ctx, cache), report.held_bytes, report.dense_bytes, details)
        # Decoding through the rebuilt dense copy is the same attention as through the cache (tests/test_cache.py).
        dense = cache.materialize()
        del cache
        return Outcome(answer_through(ctx, dense), report.held_bytes, report.dense_bytes, details)

    def _compress(self, ctx: SampleContext, config: XKVConfig) -> XKVCache:
        """The real cache at ``config``; with exact SVD, one full-rank factorization per sample serves every ratio.

        Truncating the exact full-rank factors equals factoring at the lower rank (``XKVCache.with_ranks``, tested).
        """
        if config.svd != "exact":
            return XKVCache.from_dense(ctx.model, ctx.dense, config)
        # One full-rank factorization per group size serves every decode path; it is built for "selective" so it
        # holds the landmarks, which only copies that decode selectively keep (XKVGroupStore.truncated).
        # The index settings are part of the key: a copy keeps the index only where they agree, so a config with
        # other sr_* settings must get its own factorization (else it would silently decode with "absorb").
        layout = (
            config.group_size, config.grouping, config.groups, config.first_layer, config.last_layer,
            tuple(config.dense_layers), config.compress_keys, config.compress_values,
            *(getattr(config, name) for name in SR_INDEX_FIELDS),
        )  # fmt: skip
        key = f"xkv:full-rank:{layout}"
        full = ctx.scratch.get(key)
        if full is None:
            full_config = XKVConfig.from_dict(  # in the model's dtype: each copy quantizes its own truncation
                {**config.to_dict(), "rank_k": 1.0, "rank_v": 1.0, "decode": "selective", "factor_form": "model"}
            )
            full = ctx.scratch[key] = XKVCache.from_dense(ctx.model, ctx.dense, full_config)
        return full.with_ranks(config)


class XKVAbsorbMethod(XKVMethod):
    """xKV decoded through the real cache with value absorption (keys rebuilt, values never)."""

    name = "xkv-absorb"
    decode = "absorb"


class XKVSelectiveMethod(XKVMethod):
    """xKV decoded through the real cache with Selective Reconstruction (landmarks and exact chunks counted)."""

    name = "xkv-selective"
    decode = "selective"


class XKVInt8Method(XKVMethod):
    """xKV with int8 factors (one float32 scale per 64 values); compression factors count the packed bytes."""

    name = "xkv-int8"
    overrides = {"factor_form": "int8", "factor_group_size": 64}


class XKVInt4Method(XKVMethod):
    """xKV with packed int4 factors (one float32 scale per 64 values); factors count the packed bytes."""

    name = "xkv-int4"
    overrides = {"factor_form": "int4", "factor_group_size": 64}


class XKVChunkedMethod(XKVMethod):
    """xKV with the context fed in chunks of ``prefill_chunk`` (512), each folded into the factors on arrival.

    The first chunk is factored at its end; every later chunk attends to the factored earlier ones plus itself and
    is folded in by an incremental SVD when the next arrives (``fold_tokens`` = the chunk, ``fold_keep`` = 0),
    keeping the ranks of an unbounded prefix meanwhile (``fold_headroom``); the last is folded and the factors
    trimmed to the target after the prefill (``cache.fold(0)``), so the bytes measured hold no exact context.
    Decoded through the real cache.
    """

    name = "xkv-chunked"
    decode = "absorb"
    reuses_prefill = False
    prefill_chunk = 512

    def settings(self, base: XKVConfig) -> XKVConfig:
        """The ``xkv`` settings with folding at every chunk."""
        config = super().settings(base)
        data = {**config.to_dict(), "fold_tokens": self.prefill_chunk, "fold_keep": 0, "fold_headroom": True}
        return XKVConfig.from_dict(data)

    def prefill(
        self, model: nn.Module, context_ids: torch.Tensor, cache: Cache, chunk_size: int | None = None
    ) -> torch.Tensor:
        """Chunk by chunk, each folded on arrival; then the last one too (``cache.fold(0)``): no exact context left."""
        logits = super().prefill(model, context_ids, cache, chunk_size)
        cache.fold(0)
        return logits

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Prefill chunk by chunk through the real cache, fold the last chunk, answer through the cache."""
        config = self.config_for(factor, ctx.model)
        cache = XKVCache(ctx.model, config)
        logits = super().prefill(ctx.model, ctx.context_ids, cache)  # an unreachable rank shows in the chunks
        cache.fold(0)
        report = cache.memory_report()
        details = {
            "group_size": config.group_size,
            "rank_k": [g.rank_k for g in report.groups],
            "rank_v": [g.rank_v for g in report.groups],
            "prefill_chunk": self.prefill_chunk,
        }
        own = replace(ctx, last_logits=logits)
        return Outcome(answer_through(own, cache), report.held_bytes, report.dense_bytes, details)


class SingleLayerSVD(XKVMethod):
    """The paper's single-layer SVD baseline: xKV with G = 1."""

    name = "svd"

    def config_for(self, factor: float, model: nn.Module | None = None) -> XKVConfig:
        """Same ranks rule as xKV, one layer per group (a base's measured groups and allocation do not apply)."""
        return xkv_config_for(factor, self.settings(self.options.get("config") or XKVConfig()))

    def settings(self, base: XKVConfig) -> XKVConfig:
        """``base`` at one layer per group, without its measured layout, decoded with this method's path."""
        single = {**without_measured_layout(base), "group_size": 1, "decode": self.decode}
        return XKVConfig.from_dict({**base.to_dict(), **single})


class MiniCacheMethod(Method):
    """MiniCache (SLERP merging of adjacent layer pairs), starting at the deepest layer that reaches the factor."""

    name = "minicache"

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Merge the shared prefill; unreachable above what merging every pair gives (under 2x)."""
        config = MiniCache.for_compression_factor(ctx.model, factor, int(ctx.context_ids.shape[1]), **self.options)
        if config is None:
            raise UnreachableRatioError(
                f"MiniCache tops out below {factor:g}x (merging layer pairs at most halves them)"
            )
        cache = MiniCache.from_dense(ctx.model, ctx.dense, config)
        report = cache.memory_report()
        dense = cache.materialize()
        del cache
        details = {"start_layer": config.start_layer, "retain_fraction": config.retain_fraction}
        return Outcome(answer_through(ctx, dense), report.held_bytes, report.dense_bytes, details)


class PressMethod(Method):
    """A kvpress pruning press, through kvpress itself (its ``compression_ratio`` is the fraction removed).

    The press is applied to the shared prefill's captured attention inputs (:func:`replay_press`), which leaves
    the same cache as pruning inside the forward pass (tested), then the answer continues at the original positions.
    """

    name = "press"
    press_name: ClassVar[str] = ""
    needs_capture = True

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Prune the captured prefill, answer with positions continuing from the original length."""
        pressed = replay_press(ctx.model, make_press(self.press_name, factor), ctx.capture)
        report = press_memory_report(pressed)
        tokens = greedy_answer(ctx, lambda ids: press_forward(ctx.model, pressed, ids))
        return Outcome(tokens, report.held_bytes, report.dense_bytes, {"kept_tokens": pressed.pressed_length})


def _press_method(press: str) -> type[PressMethod]:
    return type(f"{press.title().replace('_', '')}Method", (PressMethod,), {"name": press, "press_name": press})


class QuantizedMethod(Method):
    """transformers' ``QuantizedCache`` (quanto): the most bits whose predicted factor reaches the target.

    With ``s`` bytes per value in the model's dtype and one scale and one shift per ``q_group_size`` values, ``n``
    bits give ``s / (n/8 + 2 s / q_group_size)``: 6.4x for int4 and 10.7x for int2 on a float32 model. The measured
    factor is reported next to it. Options: ``axis_key``, ``axis_value``, ``q_group_size``, ``residual_length``.
    """

    name = "quantized"

    def new_cache(self, model: nn.Module, config: XKVConfig | None = None, nbits: int = 4) -> Cache:
        """An empty ``nbits`` ``QuantizedCache`` at this method's options (``xkv bench``'s ``quantized-int4``)."""
        return quantized_cache(model, nbits, **self.options)

    def nbits_for(self, factor: float, itemsize: int) -> int | None:
        """4 or 2 bits, whichever is the most that still reaches ``factor``; ``None`` if neither does."""
        group = self.options.get("q_group_size", 64)
        for nbits in (4, 2):
            if itemsize / (nbits / 8 + 2 * itemsize / group) >= factor:
                return nbits
        return None

    def run(self, ctx: SampleContext, factor: float) -> Outcome:
        """Quantize the shared prefill (what an in-forward prefill stores, tested); answer through the residual tail.

        While question plus answer fit in ``residual_length`` the cache never re-quantizes, so decoding through its
        dequantized copy is the same attention; past that, decoding goes through the real cache.
        """
        itemsize = next(ctx.model.parameters()).element_size()
        nbits = self.nbits_for(factor, itemsize)
        if nbits is None:
            raise UnreachableRatioError(f"QuantizedCache int2 tops out below {factor:g}x")
        key = f"{self.name}:{nbits}"
        if key in ctx.scratch:  # e.g. int4 serves both 2x and 4x: the same cache and answer
            return ctx.scratch[key]
        options = {**self.options, "residual_length": self.residual_length(ctx)}
        cache = quantized_from_dense(ctx.model, ctx.dense, nbits, **options)
        report = quantized_memory_report(cache)
        if tail_tokens(cache) + ctx.question_ids.shape[1] + ctx.max_new_tokens < options["residual_length"]:
            cache = dequantized_copy(cache)
        tokens = answer_through(ctx, cache)
        outcome = ctx.scratch[key] = Outcome(
            tokens, report.held_bytes, report.dense_bytes, {"nbits": nbits, **options}
        )
        return outcome

    def residual_length(self, ctx: SampleContext) -> int:
        """The ``residual_length`` option, or else the smallest valid one >= 128 that holds question and answer.

        The full-precision tail then holds the prefill's remainder, the question and the answer: like every other
        method here, question and answer stay exact (the protocol appends the question uncompressed). Bytes are
        measured after the context, where the tail holds only the prefill's remainder, so this choice does not
        change the measured ratio. It also keeps per-channel quantization (``axis=-1``) from re-quantizing a block
        whose length is not a whole number of groups (quanto refuses those).
        """
        if "residual_length" in self.options:
            return int(self.options["residual_length"])
        axes = {
            name: self.options[name] for name in ("axis_key", "axis_value", "q_group_size") if name in self.options
        }
        multiple = quantization_token_multiple(ctx.model, **axes)
        tokens = ctx.context_ids.shape[1]
        needed = tokens % multiple + ctx.question_ids.shape[1] + ctx.max_new_tokens + 1
        return max(128, math.ceil(needed / multiple) * multiple)


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        FullCache,
        XKVMethod,
        XKVAbsorbMethod,
        XKVSelectiveMethod,
        XKVInt8Method,
        XKVInt4Method,
        XKVChunkedMethod,
        SingleLayerSVD,
        MiniCacheMethod,
        QuantizedMethod,
        *(_press_method(press) for press in PRESSES),
    )
}


def build_method(name: str, options: dict[str, Any]) -> Method:
    """The method registered as ``name``, or an xKV method named ``name`` running ``options["config"]``.

    Raises:
        ValueError: for a name that is neither registered nor given a config.
    """
    if name in METHODS:
        return METHODS[name](**options)
    if isinstance(options.get("config"), XKVConfig):
        return XKVMethod(label=name, **options)
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)} or label=config.yaml")
