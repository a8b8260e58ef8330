"""Configuration of an xKV cache: which layers are grouped, and how hard keys and values are compressed.

A rank is given in one of four forms (per side, keys and values separately):

* an ``int`` ``r >= 1``: that many singular vectors are kept for every group;
* a ``float`` in ``(0, 1]``: that fraction of the group's full rank ``min(tokens, group_size * dim)``;
* a string ``"<factor>x"`` such as ``"8x"``: the largest rank whose bytes are at most ``1/factor`` of the dense
  group in the model's dtype, derived from the number of tokens ``T`` when the group is factored; in the model's
  dtype that is ``G*T*D / (T*r + r*G*D)``, in a quantized ``factor_form`` the packed values and scales count;
* a list of the above, one entry per layer group.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from xkv.forms import FactorFormat

RankValue = int | float | str
RankSpec = RankValue | list[RankValue]


#: Ways attention reads a factored prefix at decode (``XKVConfig.decode``).
DECODE_PATHS = ("rebuild", "absorb", "selective")
#: The fields that shape the Selective Reconstruction index a prefill builds: a copy at other ranks may keep the
#: index only where these agree (``XKVGroupStore.truncated``), and work shared across configs is keyed by them.
SR_INDEX_FIELDS = ("sr_chunk_size", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks", "sr_landmarks")


class UnreachableRatioError(ValueError):
    """A rank or compression factor that the data at hand cannot give (too few tokens, a rank above the data's).

    A ``ValueError``, raised when the shape of the data is known (at the first prefill); the evaluation reports it
    as "unreachable" instead of substituting another ratio.
    """


_FACTOR_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RankSetting:
    """A single rank setting in parsed form.

    Attributes:
        kind: ``"rank"`` (absolute), ``"fraction"`` (of the full rank) or ``"factor"`` (target compression factor).
        value: the number given.
    """

    kind: Literal["rank", "fraction", "factor"]
    value: float

    def __str__(self) -> str:
        if self.kind == "rank":
            return str(int(self.value))
        if self.kind == "factor":
            return f"{self.value:g}x"
        return f"{self.value:g}"


def parse_niter(value: Any, field_name: str) -> float:
    """Power iterations of the randomized SVD: a multiple of 0.5 in ``[0, 1e6)``.

    A whole number comes back an int (``1.0`` and ``1`` are one setting).

    Raises:
        ValueError: naming ``field_name``, for anything else (bools, strings, NaN, 0.3, negatives).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0 <= value < 1e6)
        or 2 * value != int(2 * value)
    ):
        raise ValueError(f"`{field_name}` must be a multiple of 0.5 in [0, 1e6) (e.g. 0, 0.5, 1) but got {value!r}")
    return int(value) if float(value).is_integer() else float(value)


def parse_rank(value: Any, field_name: str) -> RankSetting:
    """Parse one rank setting (not a list).

    Args:
        value: an int rank, a float fraction in (0, 1], or a string such as ``"8x"``.
        field_name: the config field, used in error messages (e.g. ``"rank_k[2]"``).

    Returns:
        The parsed setting.

    Raises:
        ValueError: if the value is out of range or not one of the accepted forms; the message names the field.
    """
    if isinstance(value, bool):
        raise ValueError(f"`{field_name}` must be an int, a float in (0, 1] or a string like '8x', but got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"`{field_name}` as a rank must be >= 1 but got {value}")
        return RankSetting("rank", float(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"`{field_name}` as a fraction of the full rank must be in (0, 1] but got {value}")
        return RankSetting("fraction", value)
    if isinstance(value, str):
        match = _FACTOR_RE.match(value)
        if match is None:
            raise ValueError(
                f"`{field_name}` must be an int rank, a float fraction in (0, 1] or a compression factor "
                f"such as '8x', but got {value!r}"
            )
        factor = float(match.group(1))
        if factor <= 1.0:
            raise ValueError(f"`{field_name}` as a compression factor must be > 1 but got {value!r}")
        return RankSetting("factor", factor)
    raise ValueError(
        f"`{field_name}` must be an int, a float in (0, 1] or a string like '8x', but got {type(value).__name__} "
        f"{value!r}"
    )


@dataclass(frozen=True)
class XKVConfig:
    """Settings of an :class:`~xkv.cache.XKVCache`.

    The storage form, SVD and decode path were chosen on calibration seeds only (``benchmarks/heldout/README.md``,
    "Choosing the default"): int4 factors, the exact SVD and ``absorb`` answered every calibration sample the full
    cache answered at 4x. The layout comes from the needle benchmark in ``benchmarks/defaults`` (README, "Why these
    defaults"): on the embedded SmolLM2-135M at 4k tokens and 4x overall, groups of 8 layers with keys compressed
    twice as hard as values (keys 6x, values 3x) answered 16/20 against 18/20 for the full cache; equal key/value
    ranks answered 11/20, groups of 4 14/20 and single-layer SVD 0/20. Pre-RoPE keys are far more redundant across
    layers than values (research notes, section 3), so keys take the higher factor.

    Attributes:
        group_size: G, layers whose caches share one token basis. The last group may be shorter.
        grouping: ``"contiguous"`` groups adjacent layers; ``"stride"`` groups layers ``j, j+n, j+2n, ...``
            (n = number of groups). Stride groups finish only near the last layer, so more layers are held dense
            during prefill. ``"auto"``: the layer groups in ``groups``, formed to maximise the measured alignment
            of the layers' top singular subspaces on a calibration prompt (:func:`xkv.calibration.auto_groups`); like
            stride groups, a group that is not contiguous holds its earlier layers dense until its last one arrives.
        groups: with ``grouping: auto``, the groups as lists of layers (each at most ``group_size`` layers; they
            must cover the compressed range except ``dense_layers``); ``None`` otherwise.
        first_layer: first compressed layer (0-based). Layers before it keep a dense cache.
        last_layer: last compressed layer (inclusive); ``None`` means the model's last layer.
        dense_layers: layers of that range kept dense (e.g. a first layer unlike the others); the groups are formed
            over the rest, so a group may span a dense layer.
        rank_k: rank of the keys (module docstring lists the accepted forms).
        rank_v: rank of the values.
        compress_keys: if ``False``, keys of compressed layers are kept exact.
        compress_values: if ``False``, values of compressed layers are kept exact.
        svd: ``"exact"`` (``torch.linalg.svd``), ``"gram"`` (the exact SVD's leading directions from the
            eigendecomposition of the ``G*D x G*D`` Gram matrix: cost independent of the rank) or ``"randomized"``
            (seeded randomized range finder, Halko et al.).
        svd_oversample: extra random directions of the randomized SVD.
        svd_niter: power iterations of the randomized SVD, a multiple of 0.5: each whole one is two more passes over
            the group's matrix; a half one ends the sketch on the feature side, one pass fewer
            (:func:`xkv.factorization.cross_layer_svd`).
        svd_seed: seed of the randomized SVD's test matrix, so factors are reproducible.
        min_tokens: a first prefill shorter than this is kept exact (no group is factored; ``memory_report()``
            shows 1x), so short chat prompts behave like a dense cache instead of getting tiny ranks.
        decode: how attention reads the factored prefix at decode: ``"rebuild"`` (every layer's prefix rebuilt into
            a reused workspace: the fallback every model gets), ``"absorb"`` (keys rebuilt, values absorbed:
            ``(p @ U_v) @ B_v``) or ``"selective"`` (Selective Reconstruction: only the chunks the query needs are
            rebuilt, values absorbed). The two fast paths run through the ``"xkv"`` attention implementation
            (:mod:`xkv.attention`), which the cache sets on the model.
        sr_chunk_size: tokens per chunk of Selective Reconstruction; each chunk keeps one landmark (its mean
            post-RoPE key) per layer and KV head.
        sr_budget: compressed tokens rebuilt per step and KV head: an int (tokens) or a float in (0, 1] (fraction
            of the prefix); rounded up to whole chunks.
        sr_min_tokens: prefixes shorter than this decode with ``"absorb"`` instead of ``"selective"``: there the
            budget is a large part of the prefix, and landmarks and exact chunks would cost bytes for little speed.
        sr_sink_chunks: first chunks of the prefix kept exact (attention sinks).
        sr_local_chunks: last chunks of the prefix kept exact (the most recent context).
        sr_outlier_chunks: further chunks kept exact per layer and KV head: those whose keys agree least with
            their landmark.
        sr_max_share: the largest fraction of a group's byte budget (from ``rank_k``/``rank_v`` factors) that
            Selective Reconstruction's landmarks and exact chunks may take; beyond it the group holds no index and
            decodes with ``"absorb"`` (logged), since the factors would lose the rank the index takes. ``1.0``
            allows any share that leaves rank 1.
        sr_select: ``"head"``: each KV head picks its own chunks (as ShadowKV does); ``"shared"``: the layer's KV
            heads pick one set together (a chunk ranks by its best score over the heads), so each picked row of the
            token basis is gathered, unpacked and multiplied once for all heads instead of once per head.
        sr_widen_below: where, at a decode step of a layer, the ``sr_budget`` chunks the landmarks rank first hold
            less than this share of some query row's softmax over the landmarks (the attention is spread, or the
            landmarks are unsure), that layer's step rebuilds ``sr_widen`` times the budget; 0 never widens.
        sr_widen: the budget's multiple on a widened step (an int >= 1).
        sr_landmarks: what ranks a chunk: ``"mean"`` (its mean post-RoPE key, scored ``q . mean``) or ``"bounds"``
            (the per-channel box of its keys, scored by the largest ``q . k`` the box allows, as Quest does: a
            single key that stands out is not averaged away). Bounds take twice the landmark bytes.
        factor_form: storage of the factors (:mod:`xkv.forms`): ``"model"`` (the model's dtype), ``"int8"`` or
            ``"int4"`` (packed two a byte), with float32 scales. Compression factors in ``rank_k``/``rank_v``
            count the bytes of this form, so a quantized form buys rank at the same factor.
        factor_group_size: values per scale of a quantized form, along the rank axis of the token basis and the
            feature axis of the reconstruction matrices.
        factor_rotation: ``"none"`` or ``"hadamard"``: rotate blocks of ``factor_group_size`` values by a
            Hadamard matrix before quantizing (spreads outliers; undone on the small matrices at read time).
        factor_head: ``"int4"`` only: leading directions (largest singular values) stored in int8. ``"auto"``
            picks, for a compression-factor rank, the split of the byte budget between int8 and int4 directions
            with the least estimated error from the spectrum (:func:`xkv.forms.choose_head`); an int fixes it
            (for a factor rank the total rank then follows from the budget; an explicit rank keeps its rank).
            Where the matrix's shape caps a factor's int4 rank (``min(T, G*D)``), the side's whole byte budget is
            split, so the int8 head grows (up to every direction) and the side meets its factor.
        fold_tokens: when every layer of a factored group holds this many exact tail tokens (a decode, later turns,
            or the chunks of a prefill fed in a forward loop), the oldest are folded into the group's factors by an
            incremental SVD (:func:`xkv.factorization.append_rows`), re-resolving the ranks at the new length; 0
            never folds (the tail grows with the generation).
        fold_keep: newest tail tokens kept exact at each fold.
        fold_headroom: with folding on, the first factorization and every automatic fold keep the ranks a prefix of
            unbounded length would get (for a compression factor ``f``, about ``G*D/f`` directions per side), and
            :meth:`XKVCache.fold` trims to the ranks of the actual length. Ranks resolved at a short prefix are
            small, and directions a fold drops are gone for good: for a context fed in chunks this keeps the early
            chunks about as well as a one-shot prefill (benchmarks/memory/README.md), for at most ``G*D*G*D/f``
            values per group side more until the final ``fold()``.
    """

    # 8 adjacent layers: the largest group measured, and the best at 4x (benchmarks/defaults). On calibration seeds
    # (benchmarks/heldout/README.md, "Choosing the default") groups of 4 lost one answer (of the 22 the full cache
    # gave) that groups of 8 kept; at equal bytes, with keys 3x as hard as values ("Groups of 4 at equal bytes",
    # calib-tuned-4x*), they lost 2 and gained 1 of 60 UUID samples where groups of 8 lost none.
    group_size: int = 8
    grouping: Literal["contiguous", "stride", "auto"] = "contiguous"
    groups: list[list[int]] | None = None
    first_layer: int = 0
    last_layer: int | None = None
    dense_layers: list[int] = field(default_factory=list)
    # Keys at 6x, values at 3x: 4x overall (2 / (1/6 + 1/3) = 4); the best 4x split in benchmarks/defaults. On
    # calibration samples at 6.5x, splits of 1.5 to 3 were within noise of it by answer KL, 1 and 4 twice as far
    # (benchmarks/heldout/README.md, "The K/V split on calibration samples").
    rank_k: RankSpec = "6x"
    rank_v: RankSpec = "3x"
    compress_keys: bool = True
    compress_values: bool = True
    # Exact: with int4 factors at 4x the ranks are high (keys ~800, values ~1100 of 1536 at 2k on SmolLM2), where the
    # randomized and Gram routes cost about the same and answered the same on calibration seeds (benchmarks/heldout/
    # README.md, "Choosing the default"; the chosen combination in calib-default); exact is the reference itself.
    # Confirmed on report seeds: benchmarks/heldout/README.md, "Report" (report-2k, report-4k, report-2k-ruler).
    svd: Literal["exact", "randomized", "gram"] = "exact"
    svd_oversample: int = 10
    svd_niter: float = 1
    svd_seed: int = 0
    # Measured at 4x on SmolLM2 (benchmarks/min_tokens): compressed, needle prompts of 512 tokens kept 20% against
    # 90% for the full cache, 768 tokens 60% against 80%, 1024 tokens 75% against 85%, 2048 tokens 70% against 70%.
    # Shorter prefixes stay exact (they are small anyway).
    min_tokens: int = 1024
    # "absorb": exact attention over the factors. On calibration seeds (benchmarks/heldout/README.md, "Choosing the
    # default") Selective Reconstruction lost 3 of the 22 answers "absorb" kept with the same int8 factors (and, with
    # the former float32 factors, 4 of 10 prose_needle answers); "absorb" decodes slower (benchmarks/decode/README.md).
    # On report seeds (benchmarks/heldout/README.md, "Report", report-2k) selective lost 5 of 40 where absorb lost 0.
    # Selective Reconstruction in chunks of 2 (the sr_* below) answers as many of the five tasks' calibration samples
    # as "absorb" but lost 4 UUIDs "absorb" kept and gained 2, on 2k niah_single_3 seeds 1005-1064 (benchmarks/heldout/
    # README.md, "Chunks of 2"; calib-c2), so "absorb" stays, and "selective" is the fast setting.
    decode: Literal["rebuild", "absorb", "selective"] = "absorb"
    # The sr_* settings serve decode="selective" (the fast setting, not the default). Re-chosen on calibration seeds
    # on 2026-12-03 (benchmarks/heldout/README.md, "Chunks of 2"), except sr_budget and sr_min_tokens.
    # Chunks of 2: with chunks of 4 the mean key of a chunk ranks it worse than its tokens' own scores (on two
    # calibration samples the answer's KL divergence from the full cache was 0.073 and 0.057 with chunks of 4, 0.007
    # and 0.005 with chunks of 2; "absorb" 0.001: benchmarks/heldout/answer_kl.py, answer-kl/). Chunks of 8 had lost
    # the 4k demo's needle digits (benchmarks/decode/README.md, sr_demo_seeds.txt). Report seeds, after the choice
    # ("The fast setting on report seeds": report-2k-c2, report-4k-c2-*): decode="selective" keeps 88.0 on five 2k
    # tasks (the default 88.0; chunks of 4 lost 5 of the 40 real-text samples) and 70.0 on 4k real text (72.5).
    sr_chunk_size: int = 2
    # 128 tokens: rebuilding a token costs several times reading a dense one (r_k > head_dim), so the budget sets the
    # step's cost; 128 kept the step near the dense one at 4k and 7k (benchmarks/decode/README.md). On calibration
    # seeds one shared pick of 384 tokens (as many rows gathered as per-head picks of 128) answered 51 UUID samples
    # (3 of the full cache's 52 lost, 2 gained) against per-head picks' 50 and absorb's 52, at about a sixth more
    # per step (benchmarks/heldout/README.md, "Shared picks with a wider budget"): not taken.
    sr_budget: int | float = 128
    # 4 budgets: below it SR rebuilds a quarter of the prefix or more while its tables cost ~5% of the dense bytes.
    sr_min_tokens: int = 1024
    # The exact tokens of the former chunks of 4 (4 sink, 4 local, 8 outlier tokens), in chunks of 2.
    sr_sink_chunks: int = 2
    sr_local_chunks: int = 2
    sr_outlier_chunks: int = 4
    # 1/4: chunks of 2 double the landmarks; on SmolLM2 in float32 the index takes 17% of the 4x budget at 2k and 16%
    # at 4k (26% and 23% at 6x; 30-35% at 8x, where groups hold none and decode with "absorb"). Chunks of 4 under 1/8
    # lost more answers (above).
    sr_max_share: float = 0.25
    # "head": on calibration seeds (benchmarks/heldout/README.md, "Selective Reconstruction on the default's
    # factors", calib-shared-4x/8x) shared picks lost two more answers at 8x (19 against 21 of 23); with chunks of 2
    # they lost 3 UUIDs the full cache answered on seeds 1005-1027 where per-head picks lost 2 ("Chunks of 2"). They
    # decode faster (0.90-1.06x against 1.15-1.24x the dense step at 4k with chunks of 4: benchmarks/decode/README.md).
    sr_select: Literal["head", "shared"] = "head"
    sr_widen_below: float = 0.0
    sr_widen: int = 4
    # "mean": bound landmarks answered 10 of the 23 calibration samples the full cache answered (calib-bounds-4x).
    sr_landmarks: Literal["mean", "bounds"] = "mean"
    # int4 (int8 for the leading directions, factor_head="auto"): at 4x it answered every calibration sample the full
    # cache answered, as did int8; the model-dtype form with the same SVD and decode lost 4 of 10 on code_passkey
    # (benchmarks/heldout/README.md, calib-2k: other samples, same seeds). Report seeds ("Report", 4x measuring
    # 4.00x): 87.5 = full at 2k real text, 72.5 vs 67.5 at 4k, 78.0 vs 80.5 on RULER-lite 2k (niah_single_3 65 vs 75).
    # int4 buys twice int8's rank per byte, which a 16-bit model needs to keep that margin.
    factor_form: Literal["model", "int8", "int4"] = "int4"
    factor_group_size: int = 64
    factor_rotation: Literal["none", "hadamard"] = "none"
    # "auto": on SmolLM2 at 8x, int8 for the leading directions cut the relative error of int4 factors from 0.231 to
    # 0.052 (keys at 12x) and from 0.195 to 0.075 (values at 6x) at equal bytes (benchmarks/frontier/README.md).
    # Spending a shape-capped side's whole budget (4x measures 4.00x, not 4.89x) answered 75 of the 75 calibration
    # samples the full cache answered, against 74 (benchmarks/heldout/README.md, "The value side spends its bytes").
    factor_head: int | Literal["auto"] = "auto"
    fold_tokens: int = 0
    fold_keep: int = 32
    fold_headroom: bool = False
    _parsed_k: list[RankSetting] | RankSetting = field(init=False, repr=False, compare=False)
    _parsed_v: list[RankSetting] | RankSetting = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_layout(self)
        _check_decoding(self)
        _check_form(self)
        for name in ("rank_k", "rank_v"):  # tuples become lists, so a config equals its YAML/JSON round trip
            if isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, list(getattr(self, name)))
        # Frozen dataclass: the parsed forms are set once here (`dataclasses.replace` builds and checks anew).
        object.__setattr__(self, "_parsed_k", _parse_side("rank_k", self.rank_k))
        object.__setattr__(self, "_parsed_v", _parse_side("rank_v", self.rank_v))

    @property
    def factor_format(self) -> FactorFormat:
        """The storage form of the factors."""
        return FactorFormat(self.factor_form, self.factor_group_size, self.factor_rotation)

    def budget_chunks(self, prefix_len: int, chunk_size: int | None = None) -> int:
        """Chunks Selective Reconstruction rebuilds per step for a prefix of ``prefix_len`` tokens (at least 1).

        ``chunk_size`` defaults to ``sr_chunk_size``.
        """
        budget = self.sr_budget
        tokens = int(budget) if isinstance(budget, numbers.Integral) else math.ceil(float(budget) * prefix_len)
        return max(1, math.ceil(tokens / (chunk_size or self.sr_chunk_size)))

    def rank_setting(self, side: Literal["k", "v"], group_idx: int, num_groups: int) -> RankSetting:
        """The rank setting of one side for one group.

        Args:
            side: ``"k"`` for keys, ``"v"`` for values.
            group_idx: index of the group.
            num_groups: number of groups the model has under this config (to check per-group lists).

        Raises:
            ValueError: if a per-group list does not have one entry per group.
        """
        parsed = {"k": self._parsed_k, "v": self._parsed_v}[side]
        if isinstance(parsed, list):
            if len(parsed) != num_groups:
                raise ValueError(
                    f"`rank_{side}` lists {len(parsed)} ranks but this model has {num_groups} layer groups "
                    "under this config: give one rank per group"
                )
            return parsed[group_idx]
        return parsed

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """The user-facing fields as plain data (what :meth:`from_dict` reads back)."""
        data = asdict(self)
        return {f.name: data[f.name] for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XKVConfig:
        """Build a config from plain data, rejecting unknown keys.

        Raises:
            ValueError: for an unknown key (named in the message) or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"an xkv config must be a mapping of field names to values but got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (``.json``), chosen by the file suffix.

        Raises:
            ValueError: for any other suffix.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"config file must end in .yaml, .yml or .json but got {str(path)!r}")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: str | Path) -> XKVConfig:
        """Read a config written by :meth:`save` (or by hand) from YAML or JSON.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: for a bad suffix, unparsable content, unknown keys or invalid values; the message names the
                file.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"config file must end in .yaml, .yml or .json but got {str(path)!r}")
        text = path.read_text()
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"cannot parse config file {str(path)!r}: {err}") from err
        if data is None:
            data = {}
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"invalid config file {str(path)!r}: {err}") from err


def _check_layout(config: XKVConfig) -> None:
    """Which layers are grouped and how: the int fields, groups, layer range, dense layers, sides."""
    for name in (
        "group_size", "first_layer", "svd_oversample", "svd_seed", "min_tokens", "sr_chunk_size",
        "sr_min_tokens", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks", "fold_tokens", "fold_keep",
        "sr_widen",
    ):  # fmt: skip
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an int but got {value!r}")
    if config.group_size < 1:
        raise ValueError(f"`group_size` must be >= 1 but got {config.group_size}")
    if config.grouping not in ("contiguous", "stride", "auto"):
        raise ValueError(f"`grouping` must be one of ['contiguous', 'stride', 'auto'] but got {config.grouping!r}")
    _check_groups(config)
    if config.first_layer < 0:
        raise ValueError(f"`first_layer` must be >= 0 but got {config.first_layer}")
    if config.last_layer is not None:
        if isinstance(config.last_layer, bool) or not isinstance(config.last_layer, int):
            raise ValueError(f"`last_layer` must be an int or None but got {config.last_layer!r}")
        if config.last_layer < config.first_layer:
            raise ValueError(
                f"`last_layer` must be >= `first_layer` ({config.first_layer}) but got {config.last_layer}"
            )
    if isinstance(config.dense_layers, tuple):
        object.__setattr__(config, "dense_layers", list(config.dense_layers))
    if not isinstance(config.dense_layers, list) or any(
        isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in config.dense_layers
    ):
        raise ValueError(f"`dense_layers` must be a list of layer indices >= 0 but got {config.dense_layers!r}")
    if len(set(config.dense_layers)) != len(config.dense_layers):
        raise ValueError(f"`dense_layers` lists a layer twice: {config.dense_layers}")
    for name in ("compress_keys", "compress_values"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"`{name}` must be true or false but got {getattr(config, name)!r}")


def _check_groups(config: XKVConfig) -> None:
    """``groups`` against ``grouping`` and ``group_size``; tuples become lists."""
    groups = config.groups
    if groups is None:
        if config.grouping == "auto":
            raise ValueError(
                "`grouping: auto` needs `groups`, the layer groups measured on a calibration prompt "
                "(xkv.calibration.auto_groups, or `xkv analyze --group-size G`)"
            )
        return
    if config.grouping != "auto":
        raise ValueError(f"`groups` is read with `grouping: auto` only, but grouping is {config.grouping!r}")
    if isinstance(groups, tuple):
        groups = list(groups)
    if not isinstance(groups, list) or not groups or not all(isinstance(g, (list, tuple)) and g for g in groups):
        raise ValueError(f"`groups` must be a non-empty list of non-empty lists of layers but got {groups!r}")
    groups = [list(g) for g in groups]  # tuples become lists, so a config equals its YAML/JSON round trip
    layers = [layer for group in groups for layer in group]
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
        raise ValueError(f"`groups` must hold layer indices >= 0 but got {groups!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`groups` lists a layer twice: {groups}")
    if max(len(g) for g in groups) > config.group_size:
        raise ValueError(f"`groups` has a group larger than `group_size` ({config.group_size}): {groups}")
    object.__setattr__(config, "groups", groups)


def _check_decoding(config: XKVConfig) -> None:
    """The SVD, ``min_tokens``, the decode path, Selective Reconstruction and folding fields."""
    if config.svd not in ("exact", "randomized", "gram"):
        raise ValueError(f"`svd` must be one of ['exact', 'randomized', 'gram'] but got {config.svd!r}")
    if config.svd_oversample < 0:
        raise ValueError(f"`svd_oversample` must be >= 0 but got {config.svd_oversample}")
    object.__setattr__(config, "svd_niter", parse_niter(config.svd_niter, "svd_niter"))
    if config.min_tokens < 0:
        raise ValueError(f"`min_tokens` must be >= 0 but got {config.min_tokens}")
    if config.decode not in DECODE_PATHS:
        raise ValueError(f"`decode` must be one of {list(DECODE_PATHS)} but got {config.decode!r}")
    if config.sr_chunk_size < 1:
        raise ValueError(f"`sr_chunk_size` must be >= 1 but got {config.sr_chunk_size}")
    if not isinstance(config.fold_headroom, bool):
        raise ValueError(f"`fold_headroom` must be true or false but got {config.fold_headroom!r}")
    if config.fold_tokens and config.fold_keep >= config.fold_tokens:
        raise ValueError(
            f"`fold_keep` ({config.fold_keep}) must be below `fold_tokens` ({config.fold_tokens}): a fold must fold"
        )
    for name in ("sr_min_tokens", "sr_sink_chunks", "sr_local_chunks", "sr_outlier_chunks", "fold_tokens",
                 "fold_keep"):  # fmt: skip
        if getattr(config, name) < 0:
            raise ValueError(f"`{name}` must be >= 0 but got {getattr(config, name)}")
    share = config.sr_max_share
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"`sr_max_share` must be a number in [0, 1] but got {share!r}")
    below = config.sr_widen_below
    if isinstance(below, bool) or not isinstance(below, numbers.Real) or not 0.0 <= float(below) <= 1.0:
        raise ValueError(f"`sr_widen_below` must be a number in [0, 1] but got {below!r}")
    if config.sr_widen < 1:
        raise ValueError(f"`sr_widen` must be >= 1 but got {config.sr_widen}")
    if config.sr_select not in ("head", "shared"):
        raise ValueError(f"`sr_select` must be one of ['head', 'shared'] but got {config.sr_select!r}")
    if config.sr_landmarks not in ("mean", "bounds"):
        raise ValueError(f"`sr_landmarks` must be one of ['mean', 'bounds'] but got {config.sr_landmarks!r}")
    budget = config.sr_budget
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"`sr_budget` must be an int (tokens) or a float in (0, 1] but got {budget!r}")
    if isinstance(budget, numbers.Integral) and budget < 1:
        raise ValueError(f"`sr_budget` as tokens must be >= 1 but got {budget}")
    if not isinstance(budget, numbers.Integral) and not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"`sr_budget` as a fraction of the prefix must be in (0, 1] but got {budget}")


def _check_form(config: XKVConfig) -> None:
    """The storage form of the factors (``FactorFormat`` names the field) and ``factor_head``."""
    FactorFormat(config.factor_form, config.factor_group_size, config.factor_rotation)  # raises naming the field
    head = config.factor_head
    if head != "auto" and (isinstance(head, bool) or not isinstance(head, int) or head < 0):
        raise ValueError(f"`factor_head` must be 'auto' or an int >= 0 but got {head!r}")


def _parse_side(name: str, spec: Any) -> list[RankSetting] | RankSetting:
    if isinstance(spec, tuple):
        spec = list(spec)
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"`{name}` as a per-group list must not be empty")
        return [parse_rank(item, f"{name}[{i}]") for i, item in enumerate(spec)]
    return parse_rank(spec, name)
