"""Attention over a factored prefix without rebuilding it whole: value absorption and Selective Reconstruction.

Pure tensor code (no transformers): the cache hands these functions the factors of a layer, its exact tail and the
query; :mod:`xkv.attention` reaches them through transformers' ``AttentionInterface``.

Shapes: ``b`` batch, ``H`` KV heads, ``R`` query heads per KV head (GQA), ``q`` query tokens, ``T`` prefix tokens,
``L`` tail tokens (the query's own tokens last), ``r`` rank, ``hd`` head dim, ``D = H * hd``. Queries are grouped
per KV head, ``(b, H, R*q, hd)``, so keys and values are never repeated for GQA.

* **Value absorption** (xKV, "absorb"): the prefix's values are ``U_v @ B_v`` and the attention output is
  ``p @ V = (p @ U_v) @ B_v``: the ``(T, D)`` values are never rebuilt; ``p @ U_v`` costs ``R*q*T*r`` per KV head.
* **Selective Reconstruction** (xKV v2, after ShadowKV): the prefix is split into chunks of ``c`` tokens, each with
  a landmark (its mean post-RoPE key). A few chunks are kept exact: the first (attention sinks), the last (local
  context) and the outliers (keys least like their landmark). At each step the query is scored against the
  landmarks and only the top chunks for a token budget are rebuilt (``U[idx] @ B_l``, RoPE at their positions);
  attention runs over them, the exact chunks and the tail. Two options: the layer's KV heads may pick one set
  together (``shared``: each picked row of ``U`` is unpacked and multiplied once for all heads), and a chunk may be
  ranked by the per-channel box of its keys instead of their mean (``bounds``: ``q . centre + |q| . radius``, the
  largest score a key in the box can reach, after Quest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xkv.forms import StoredFactors, dequantize, gather_chunks, quantize
from xkv.positions import rope_rows


def group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(b, Hq, q, hd)`` -> ``(b, H, R*q, hd)``: query head ``i`` belongs to KV head ``i // R`` (``repeat_kv``)."""
    batch, num_heads, tokens, head_dim = query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")
    return query.reshape(batch, num_kv_heads, num_heads // num_kv_heads * tokens, head_dim)


def ungroup_output(out: torch.Tensor, num_heads: int, tokens: int) -> torch.Tensor:
    """``(b, H, R*q, hd)`` -> ``(b, q, Hq, hd)``, the layout transformers' attention functions return."""
    batch, _, _, head_dim = out.shape
    return out.reshape(batch, num_heads, tokens, head_dim).transpose(1, 2).contiguous()


def per_head(reconstruction: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """One layer's ``B_l`` ``(b, r, D)`` -> ``(b, H, r, hd)`` (features are head-major: ``h * hd + d``)."""
    batch, rank, dim = reconstruction.shape
    return reconstruction.view(batch, rank, num_kv_heads, dim // num_kv_heads).permute(0, 2, 1, 3)


def tail_mask(
    attention_mask: torch.Tensor | None,
    prefix_len: int,
    tail_len: int,
    tokens: int,
    repeats: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Additive mask ``(b or 1, 1, R*q, L)`` of the tail for grouped queries; ``None`` when nothing is masked.

    Uses the model's mask where it gives one; else the causal pattern of the ``q`` newest tail tokens, built on
    ``device``. The prefix is masked apart (:func:`prefix_mask`).
    """
    if attention_mask is not None:
        cols = attention_mask[..., prefix_len : prefix_len + tail_len]  # (b, 1|Hq, q, L)
        if cols.dtype == torch.bool:
            cols = torch.zeros(cols.shape, dtype=torch.float32, device=cols.device).masked_fill(~cols, -math.inf)
        cols = cols[:, :1].float()
        return cols.repeat(1, 1, repeats, 1)
    if tokens == 1:
        return None
    rows = torch.arange(tokens, device=device) + (tail_len - tokens)
    allowed = torch.arange(tail_len, device=device).unsqueeze(0) <= rows.unsqueeze(1)  # (q, L)
    mask = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf)
    return mask.repeat(repeats, 1).view(1, 1, repeats * tokens, tail_len)


def prefix_mask(
    attention_mask: torch.Tensor | None, real_rows: torch.Tensor | None, prefix_len: int, tokens: int, repeats: int
) -> torch.Tensor | None:
    """Additive mask of the prefix for grouped queries: the model's where it gives one, else the left padding's.

    Args:
        attention_mask: the model's mask ``(b, 1|Hq, q, kv)`` (bool or additive), or ``None``.
        real_rows: ``(b, T)`` bool, ``False`` on left padding, or ``None`` for an unpadded prefix.
        prefix_len: ``T``.
        tokens: queries ``q``.
        repeats: query heads per KV head ``R``.

    Returns:
        ``(b, 1, R*q, T)`` (``(b, 1, 1, T)`` from the padding alone) float32, or ``None`` when nothing is masked.
    """
    if attention_mask is not None:
        return tail_mask(attention_mask, 0, prefix_len, tokens, repeats)
    if real_rows is None:
        return None
    hidden = torch.zeros(real_rows.shape, dtype=torch.float32, device=real_rows.device)
    return hidden.masked_fill(~real_rows, -math.inf).view(real_rows.shape[0], 1, 1, prefix_len)


def check_prefix_visible(attention_mask: torch.Tensor | None, prefix_len: int) -> None:
    """Raise if the model's mask hides part of the compressed prefix (these paths assume it never does)."""
    if attention_mask is None or prefix_len == 0:
        return
    cols = attention_mask[..., :prefix_len]
    visible = cols.all() if cols.dtype == torch.bool else bool((cols == 0).all())
    if not visible:
        raise ValueError(
            "the attention mask hides tokens of the compressed prefix, which Selective Reconstruction does not "
            "support (decode='absorb' or 'rebuild' follow any mask)"
        )


def softmax_blocks(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """One softmax over score blocks concatenated along the last axis, in float32; returned split the same way."""
    sizes = [block.shape[-1] for block in blocks]
    probs = torch.softmax(torch.cat([block.float() for block in blocks], dim=-1), dim=-1)
    return list(probs.split(sizes, dim=-1))


def attend_absorbed(
    grouped_query: torch.Tensor,
    prefix_keys: torch.Tensor,
    value_factors: StoredFactors,
    slot: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    prefix_mask: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the prefix's values absorbed into the factors.

    Args:
        grouped_query: ``(b, H, M, hd)`` with ``M = R*q``.
        prefix_keys: ``(b, H, T, hd)`` post-RoPE keys of the prefix (rebuilt, any strides).
        value_factors: the group's value factors (any storage form).
        slot: the layer's position in its group.
        tail_keys: ``(b, H, L, hd)`` post-RoPE.
        tail_values: ``(b, H, L, hd)``.
        scaling: the score scale (``1/sqrt(hd)`` for most models).
        mask: additive ``(·, 1, M, L)`` tail mask or ``None``.
        prefix_mask: additive ``(b, 1, M or 1, T)`` mask of the prefix (left padding), ``None`` if all is visible.
        basis: ``value_factors.basis()`` already read (e.g. unpacked once for the group), or ``None`` to read it.

    Returns:
        ``(b, H, M, hd)``.
    """
    batch, heads, rows, _ = grouped_query.shape
    scores_prefix = torch.matmul(grouped_query, prefix_keys.transpose(-1, -2)) * scaling  # (b, H, M, T)
    if prefix_mask is not None:
        scores_prefix = scores_prefix + prefix_mask
    scores_tail = torch.matmul(grouped_query, tail_keys.transpose(-1, -2)) * scaling  # (b, H, M, L)
    if mask is not None:
        scores_tail = scores_tail + mask
    probs_prefix, probs_tail = softmax_blocks([scores_prefix, scores_tail])
    basis = value_factors.basis() if basis is None else basis  # (b, T, r)
    mixed = torch.matmul(probs_prefix.to(basis.dtype).reshape(batch, heads * rows, -1), basis)  # (b, H*M, r)
    recon = per_head(value_factors.matrix(slot), heads)  # (b, H, r, hd)
    out = torch.matmul(mixed.view(batch, heads, rows, -1), recon)
    return out + torch.matmul(probs_tail.to(tail_values.dtype), tail_values)


@dataclass
class SelectiveIndex:
    """What Selective Reconstruction keeps for one layer of a factored group (bytes counted by the cache).

    Attributes:
        chunk_size: tokens per chunk ``c``.
        landmarks: ``(b, H, C, ceil(hd / 2))`` uint8: the mean post-RoPE key of each of the ``C = T // c`` chunks
            in int4, two a byte (:func:`xkv.forms.quantize`; they only rank chunks: in the model's dtype they would
            cost ``1 / (2c)`` of the dense cache, as much as the factors at 8x with ``c = 8``). With bounds
            (``sr_landmarks="bounds"``) ``(b, H, C, 2 * ceil(hd / 2))``: the centre ``(max + min) / 2`` of the
            chunk's keys per channel, then the radius ``(max - min) / 2``. Indexes saved before int4 hold
            ``(b, H, C, hd)`` int8 and are read as such.
        landmark_scales: ``(b, H, C, 1)`` float32, one absmax scale per landmark (``(b, H, C, 2)`` with bounds:
            the centre's, then the radius's).
        exact_chunks: ``(b, H, E)`` int64 chunk indices kept exact per KV head (sinks, local, outliers), sorted.
        exact_keys: ``(b, H, E*c + rest, hd)`` post-RoPE keys of those chunks, then of the ``T % c`` last tokens.
        exact_values: ``(b, H, E*c + rest, hd)`` values, same rows.
    """

    chunk_size: int
    landmarks: torch.Tensor
    landmark_scales: torch.Tensor
    exact_chunks: torch.Tensor
    exact_keys: torch.Tensor
    exact_values: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held."""
        return [self.landmarks, self.landmark_scales, self.exact_chunks, self.exact_keys, self.exact_values]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SelectiveIndex:
        """A copy with ``fn`` applied to every tensor (batch edits)."""
        return SelectiveIndex(self.chunk_size, *(fn(t) for t in self.tensors()))

    @property
    def bounds(self) -> bool:
        """Whether the landmarks are per-channel bounds (centre and radius) rather than means."""
        return self.landmark_scales.shape[-1] == 2

    def landmark_values(self) -> torch.Tensor:
        """``(b, H, C, hd)`` float32 landmarks (the centres, with bounds), dequantized."""
        if self.landmarks.dtype == torch.int8:
            return self.landmarks.float() * self.landmark_scales
        head_dim = self.exact_keys.shape[-1]
        packed = self.landmarks[..., : (head_dim + 1) // 2]
        return dequantize(packed, self.landmark_scales[..., :1], 4, head_dim, head_dim, torch.float32)

    def landmark_scores(self, grouped_query: torch.Tensor) -> torch.Tensor:
        """``(b, H, M, C)`` float32 chunk scores for ``grouped_query`` ``(b, H, M, hd)``.

        Means: ``q . landmark``. Bounds: the largest ``q . k`` any key inside the chunk's per-channel box can reach,
        ``q . centre + |q| . radius`` (Quest's bound, as two products instead of a max per channel).
        """
        if self.landmarks.dtype == torch.int8:
            raw = torch.matmul(grouped_query, self.landmarks.to(grouped_query.dtype).transpose(-1, -2))
            return raw.float() * self.landmark_scales.transpose(-1, -2)
        half = (self.exact_keys.shape[-1] + 1) // 2
        scores = _packed_scores(grouped_query, self.landmarks[..., :half], self.landmark_scales[..., :1])
        if self.bounds:
            reach = _packed_scores(grouped_query.abs(), self.landmarks[..., half:], self.landmark_scales[..., 1:])
            scores = scores + reach
        return scores

    @property
    def num_chunks(self) -> int:
        """``C``, chunks of the prefix (the last ``T % c`` tokens are exact and belong to none)."""
        return self.landmarks.shape[-2]


def _packed_scores(query: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(b, H, M, C)`` float32 ``query . v`` for int4 rows ``v`` packed two a byte ``(b, H, C, ceil(hd/2))``.

    Read from the nibbles without interleaving them back: ``s * (q_even . (low - 8) + q_odd . (high - 8))``.
    """
    dtype, head_dim = query.dtype, query.shape[-1]
    if head_dim % 2:
        values = dequantize(packed, torch.ones_like(scales), 4, head_dim, head_dim, dtype)
        return torch.matmul(query, values.transpose(-1, -2)).float() * scales.transpose(-1, -2)
    scales = scales.transpose(-1, -2)  # (b, H, 1, C)
    # One product over [low | high] nibbles against [q_even | q_odd]. In 16-bit queries the nibbles are centred first
    # (exact), so no large terms cancel; in float32 the cancellation is harmless and two ops cheaper.
    nibbles = torch.cat([packed & 15, packed >> 4], dim=-1)  # (b, H, C, hd)
    split = torch.cat([query[..., 0::2], query[..., 1::2]], dim=-1)
    if dtype in (torch.float32, torch.float64):
        raw = torch.matmul(split, nibbles.to(dtype).transpose(-1, -2))
        raw = raw - 8.0 * query.sum(dim=-1, keepdim=True)
    else:
        raw = torch.matmul(split, (nibbles.to(torch.int8) - 8).to(dtype).transpose(-1, -2))
    return raw.float() * scales


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(b, H, N, d)`` rows at ``index`` ``(b, H, n)`` -> ``(b, H, n, d)``."""
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def build_selective_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    chunk_size: int,
    sink_chunks: int,
    local_chunks: int,
    outlier_chunks: int,
    bounds: bool = False,
) -> SelectiveIndex:
    """Landmarks and exact chunks of one layer, from its exact prefill states.

    Args:
        keys: ``(b, H, T, hd)`` post-RoPE keys of the prefix.
        values: ``(b, H, T, hd)``.
        chunk_size: ``c``.
        sink_chunks: first chunks kept exact (attention sinks).
        local_chunks: last chunks kept exact (the most recent context).
        outlier_chunks: further chunks kept exact per KV head: those whose least similar key has the lowest cosine
            to the chunk's landmark (ShadowKV's outlier rule).
        bounds: landmarks as per-channel bounds of the chunk's keys (centre and radius, ``sr_landmarks="bounds"``)
            instead of their mean; outliers are still judged against the mean.

    Returns:
        The index; when ``sink + local + outlier`` reach ``C`` every chunk is exact.
    """
    batch, heads, tokens, head_dim = keys.shape
    num_chunks = tokens // chunk_size
    body = num_chunks * chunk_size
    chunked = keys[:, :, :body].reshape(batch, heads, num_chunks, chunk_size, head_dim)
    landmarks = chunked.float().mean(dim=3)  # (b, H, C, hd)
    fixed = [*range(min(sink_chunks, num_chunks)), *range(max(0, num_chunks - local_chunks), num_chunks)]
    fixed_set = sorted(set(fixed))
    fixed_index = torch.tensor(fixed_set, dtype=torch.long, device=keys.device).expand(batch, heads, -1)
    num_outliers = min(outlier_chunks, num_chunks - len(fixed_set))
    if num_outliers > 0:
        cosine = torch.nn.functional.cosine_similarity(chunked.float(), landmarks.unsqueeze(3), dim=-1)
        worst = cosine.min(dim=-1).values  # (b, H, C): the least similar key of each chunk
        worst[:, :, fixed_set] = math.inf
        outliers = worst.topk(num_outliers, dim=-1, largest=False).indices
        exact_chunks = torch.cat([fixed_index, outliers], dim=-1).sort(dim=-1).values
    else:
        exact_chunks = fixed_index.clone()
    if bounds:
        low, high = chunked.float().amin(dim=3), chunked.float().amax(dim=3)
        centre, centre_scales = quantize((high + low) / 2, 4, head_dim)
        radius, radius_scales = quantize((high - low) / 2, 4, head_dim)
        quantized, scales = torch.cat([centre, radius], dim=-1), torch.cat([centre_scales, radius_scales], dim=-1)
    else:
        quantized, scales = quantize(landmarks, 4, head_dim)  # int4, one scale per landmark
    rows = (exact_chunks.unsqueeze(-1) * chunk_size + torch.arange(chunk_size, device=keys.device)).flatten(2)
    rest = torch.arange(body, tokens, device=keys.device).expand(batch, heads, -1)
    rows = torch.cat([rows, rest], dim=-1)
    return SelectiveIndex(
        chunk_size=chunk_size,
        landmarks=quantized,
        landmark_scales=scales.view(batch, heads, num_chunks, 2 if bounds else 1),
        exact_chunks=exact_chunks.contiguous(),
        exact_keys=_gather_rows(keys, rows).contiguous(),
        exact_values=_gather_rows(values, rows).contiguous(),
    )


def selective_index_bytes(
    tokens: int,
    heads: int,
    head_dim: int,
    itemsize: int,
    chunk_size: int,
    sink_chunks: int,
    local_chunks: int,
    outlier_chunks: int,
    bounds: bool = False,
) -> tuple[int, int]:
    """Bytes :func:`build_selective_index` holds for one layer and one sequence: ``(keys' share, values' share)``.

    The keys' share is the int4 landmarks, their float32 scales, the int64 chunk ids and the exact keys; the
    values' share the exact values. Rank targets subtract them (``XKVGroupStore.check_ranks``), so a compression
    factor counts every byte Selective Reconstruction keeps.

    Args:
        tokens: ``T``, the prefix.
        heads: KV heads.
        head_dim: ``hd``.
        itemsize: bytes per value of the model's dtype (the exact chunks' dtype).
        chunk_size: ``c``.
        sink_chunks: first chunks kept exact.
        local_chunks: last chunks kept exact.
        outlier_chunks: further chunks kept exact (as many as are left).
        bounds: landmarks as bounds (twice the int4 values and scales of means).
    """
    num_chunks = tokens // chunk_size
    fixed = len(set(range(min(sink_chunks, num_chunks))) | set(range(max(0, num_chunks - local_chunks), num_chunks)))
    exact = fixed + max(0, min(outlier_chunks, num_chunks - fixed))
    rows = exact * chunk_size + tokens - num_chunks * chunk_size
    landmark = ((head_dim + 1) // 2 + 4) * (2 if bounds else 1)
    key_bytes = heads * (num_chunks * landmark + exact * 8 + rows * head_dim * itemsize)
    return key_bytes, heads * rows * head_dim * itemsize


def landmark_probs(grouped_query: torch.Tensor, index: SelectiveIndex, scaling: float) -> torch.Tensor:
    """``(b, H, M, C)``: each query row's softmax over the chunks' landmark scores (what ranks the chunks)."""
    return torch.softmax(index.landmark_scores(grouped_query) * scaling, dim=-1)


def widened_count(probs: torch.Tensor, count: int, below: float, factor: int) -> int:
    """``count``, or ``count * factor`` where the landmarks are unsure of their picks.

    Where some query row's ``count`` most likely chunks hold less than ``below`` of its landmark softmax mass
    ``probs`` ``(b, H, M, C)``, the attention is spread (or the landmarks rank badly), and a step that rebuilds only
    ``count`` chunks misses much of it: the step rebuilds ``factor`` times as many. One host sync per call.
    """
    if below <= 0.0 or factor <= 1 or count >= probs.shape[-1]:
        return count
    held = probs.topk(count, dim=-1).values.sum(dim=-1)  # (b, H, M)
    return count * factor if bool(held.min() < below) else count


def select_chunks(
    grouped_query: torch.Tensor,
    index: SelectiveIndex,
    count: int,
    scaling: float,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``count`` compressed chunks each KV head attends most, ``(b, H, count)`` (in no particular order).

    A chunk scores ``softmax(q . landmarks * scaling)`` (``probs``, computed here if not given) maxed over the query
    heads of its KV head and the query tokens; exact chunks are never picked (they are attended anyway).
    """
    if probs is None:
        probs = landmark_probs(grouped_query, index, scaling)
    best = probs.amax(dim=2)  # (b, H, C)
    best.scatter_(-1, index.exact_chunks, -1.0)
    return best.topk(count, dim=-1).indices


def select_shared_chunks(
    grouped_query: torch.Tensor,
    index: SelectiveIndex,
    count: int,
    scaling: float,
    probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` compressed chunks the layer's KV heads attend most together, for one shared rebuild.

    Each chunk scores as in :func:`select_chunks` per KV head, then its best score over the heads ranks it. A chunk
    one head keeps exact may still be picked for the others; one every head keeps exact ranks last, so it is picked
    only when ``count`` exceeds the other chunks (then it is hidden from every head: wasted work, never a wrong
    answer, and no host sync to count the chunks left).

    Returns:
        ``(chunks, exact)``: chunk ids ``(b, k)`` and ``(b, H, k)`` bool, ``True`` where a picked chunk is exact for
        that head (its rebuilt copy must be hidden there, or the head would attend it twice).
    """
    if probs is None:
        probs = landmark_probs(grouped_query, index, scaling)
    best = probs.amax(dim=2)  # (b, H, C)
    best.scatter_(-1, index.exact_chunks, -1.0)
    chunks = best.amax(dim=1).topk(count, dim=-1).indices  # (b, k); -1 where every head keeps the chunk exact
    exact = best.gather(-1, chunks.unsqueeze(1).expand(-1, best.shape[1], -1)) < 0
    return chunks, exact


def _rebuild_chunks(
    grouped_query: torch.Tensor,
    index: SelectiveIndex,
    key_factors: StoredFactors,
    slot: int,
    angles: torch.Tensor | None,
    count: int,
    scaling: float,
    shared: bool,
    probs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``count`` chunks by their landmark ``probs`` ``(b, H, M, C)``, rebuild their post-RoPE keys, score them.

    Returns:
        ``(chunks, scores)``: chunk ids ``(b, H, k)`` per head or ``(b, 1, k)`` shared; scores ``(b, H, M, k*c)``,
        ``-inf`` where a shared chunk is exact for the head.
    """
    c, heads = index.chunk_size, grouped_query.shape[1]
    hidden: torch.Tensor | None = None
    if shared:
        picked, exact = select_shared_chunks(grouped_query, index, count, scaling, probs)
        chunks = picked.unsqueeze(1)  # (b, 1, k): one gather and one product serve every head
        rows = key_factors.chunk_rows(chunks, c)[:, 0]  # (b, n, r_k)
        keys = torch.matmul(rows, key_factors.matrix(slot))  # (b, n, D)
        keys = keys.view(keys.shape[0], keys.shape[1], heads, -1).transpose(1, 2)  # (b, H, n, hd) pre-RoPE
        blocked = exact.repeat_interleave(c, dim=-1).unsqueeze(2)  # (b, H, 1, n); built always: no host sync
        hidden = torch.zeros(blocked.shape, dtype=torch.float32, device=blocked.device)
        hidden = hidden.masked_fill(blocked, -math.inf)
    else:
        chunks = select_chunks(grouped_query, index, count, scaling, probs)  # (b, H, k)
        rows = key_factors.chunk_rows(chunks, c)  # (b, H, n, r_k)
        keys = torch.matmul(rows, per_head(key_factors.matrix(slot), heads))  # (b, H, n, hd) pre-RoPE
    if angles is not None:
        picked_angles = gather_chunks(angles, chunks, c)  # (b, H or 1, n, 2*rot): one gather for cos and sin
        rot = angles.shape[-1] // 2
        keys = rope_rows(keys, picked_angles[..., :rot], picked_angles[..., rot:])
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2)) * scaling
    return chunks, scores if hidden is None else scores + hidden


def attend_selective(
    grouped_query: torch.Tensor,
    index: SelectiveIndex,
    key_factors: StoredFactors,
    value_factors: StoredFactors,
    slot: int,
    angles: torch.Tensor | None,
    budget_chunks: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    shared: bool = False,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selective Reconstruction: attention over the top chunks (rebuilt), the exact chunks and the tail.

    Args:
        grouped_query: ``(b, H, M, hd)``.
        index: the layer's landmarks and exact chunks.
        key_factors: the group's key factors (pre-RoPE).
        value_factors: the group's value factors (absorbed, never rebuilt).
        slot: the layer's position in its group.
        angles: ``(T, 2*rot)`` float32 cos then sin of the prefix positions (``None`` for a model without RoPE).
        budget_chunks: compressed chunks rebuilt per KV head (clipped to those not exact).
        tail_keys: ``(b, H, L, hd)``.
        tail_values: ``(b, H, L, hd)``.
        scaling: score scale.
        mask: additive tail mask or ``None``.
        shared: pick the chunks once for all KV heads of the layer (:func:`select_shared_chunks`): each picked
            row of ``U`` is gathered and unpacked once instead of once per head, and the keys are rebuilt in one
            product; each head attends the same number of chunks. ``False``: each head picks its own.
        probs: the landmark softmax :func:`landmark_probs` ``(b, H, M, C)`` if the caller has it (it chose the
            budget from it, :func:`widened_count`); computed here otherwise.

    Returns:
        ``(b, H, M, hd)``.
    """
    heads = grouped_query.shape[1]
    # Shared picks may take chunks some heads keep exact (hidden from those heads).
    count = min(budget_chunks, index.num_chunks - (0 if shared else index.exact_chunks.shape[-1]))
    blocks_k, blocks_v = [index.exact_keys, tail_keys], [index.exact_values, tail_values]
    scores = [torch.matmul(grouped_query, k.transpose(-1, -2)) * scaling for k in blocks_k]
    if mask is not None:
        scores[-1] = scores[-1] + mask
    if count > 0:
        ranked = landmark_probs(grouped_query, index, scaling) if probs is None else probs
        chunks, chunk_scores = _rebuild_chunks(
            grouped_query, index, key_factors, slot, angles, count, scaling, shared, ranked
        )
        scores.insert(0, chunk_scores)
    weights = softmax_blocks(scores)
    out = torch.matmul(weights[-2].to(blocks_v[0].dtype), blocks_v[0])
    out = out + torch.matmul(weights[-1].to(blocks_v[1].dtype), blocks_v[1])
    if count > 0:
        basis_v = value_factors.chunk_rows(chunks, index.chunk_size)  # (b, H or 1, n, r_v)
        mixed = torch.matmul(weights[0].to(basis_v.dtype), basis_v)  # (b, H, M, r_v)
        out = out + torch.matmul(mixed, per_head(value_factors.matrix(slot), heads))
    return out
