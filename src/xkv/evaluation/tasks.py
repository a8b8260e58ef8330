"""RULER-style long-context tasks, generated offline from a seed and fitted to a token length.

The tasks follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654), which builds synthetic prompts of any length so that the answer is known and scoring is
a plain string match. ``ruler-lite`` holds its retrieval and aggregation tasks; the question-answering tasks, which
need external data sets, are left out.

Retrieval, needle in a haystack (NIAH): "needles" (``A special magic number for <key> is: <value>.``) are hidden in a
haystack, and the question asks for the value of a key.

- ``niah_single_1``: one needle in a noise haystack (five short sentences repeated); word key, 7-digit value.
- ``niah_single_2``: one needle in an essay haystack (natural text); word key, 7-digit value.
- ``niah_single_3``: as ``niah_single_2`` with a UUID value.
- ``niah_multikey_1``: four needles with different keys in an essay haystack; the question asks for one.
- ``niah_multikey_2``: the haystack is made entirely of distractor needles (one per line) with word keys and
  7-digit values; the question asks for one needle's value.
- ``niah_multikey_3``: as ``niah_multikey_2`` with UUID keys and UUID values.
- ``niah_multivalue``: four needles give four values for the same key; the question asks for all of them.
- ``niah_multiquery``: four needles with different keys; the question asks for all four values.

Multi-hop tracing, variable tracking (``vt``): one chain of four hops, ``VAR A = 12345.``, ``VAR B = VAR A.``, ...,
hidden in order in the noise haystack; the question asks which variables hold the value, and all five names are the
answer.

Aggregation:

- ``cwe`` (common words extraction): a numbered list of words in which ten words appear ``f_c`` times each and the
  others ``f_u < f_c`` times; the answer is the ten common words. RULER uses ``f_c = 30`` and ``f_u = 3``; so that
  short prompts still fit, ``f_c`` here grows with the length (2 at 512 tokens, 30 from 7680 tokens) and ``f_u`` is
  1 to 3.
- ``fwe`` (frequent words extraction): a text of random five-letter "coded words" whose counts follow a Zipf law with
  exponent 2; the answer is the three most frequent words (their counts are kept strictly ordered).

Essay haystacks use the prose that :mod:`xkv.prompts` writes from templates (no external text), or the documents a
user passes as ``haystack`` (see :func:`load_haystack`). Words for keys and word lists come from the ``wonderwords``
lists, drawn with the sample's own seeded ``random.Random``.

Lengths are in the tokenizer's tokens and cover the whole prompt: ``context_ids`` (chat prefix, instructions and
haystack: the part whose KV-cache is compressed) plus ``question_ids`` (blank line, question, end of the user turn and
opening of the assistant turn, then the task's answer prefix as RULER writes one, e.g. "The special magic number for X
mentioned in the text above is": appended uncompressed; only what the model adds is scored). The haystack is fitted by
measuring: a search on the number of haystack units (words, sentences, lines or list entries), interpolating from
measured token counts, finds the longest prompt that is not longer than ``length``; where a unit is coarse (a line of
two UUIDs is ~76 SmolLM2 tokens), a character prefix of the next unit fills the remaining gap. The result is never
above ``length`` and within 2% of it from 512 tokens up (within 1.2% in our checks with SmolLM2's tokenizer); a
4096-token sample takes a few tens of milliseconds, most of it in the tokenizer.

A sample is rebuilt exactly from ``(task, length, seed)`` (and, for needle tasks, ``sample_index`` and
``num_samples_hint`` when they set the depth) with the same tokenizer.

The ``realtext`` group (:mod:`xkv.evaluation.realtext`: ``prose_needle``, ``kv_json``, ``code_passkey``) holds
held-out retrieval tasks on the standard library's documentation and code and on a JSON object, fitted and scored
the same way; their depth is set as for the needle tasks.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from xkv.evaluation.code_tasks import CODE_TASK_NAMES, edit_similarity, lcc_draft, repobench_draft
from xkv.evaluation.realtext import REALTEXT_TASK_NAMES, realtext_draft
from xkv.prompts import _chat_parts, _sentence

RULER_TASK_NAMES: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
#: Every task: RULER's, the code-completion tasks of :mod:`xkv.evaluation.code_tasks`, then the held-out real-text
#: tasks of :mod:`xkv.evaluation.realtext`.
TASK_NAMES: tuple[str, ...] = RULER_TASK_NAMES + CODE_TASK_NAMES + REALTEXT_TASK_NAMES
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "ruler-lite": RULER_TASK_NAMES,
    "code-lite": CODE_TASK_NAMES,
    "realtext": REALTEXT_TASK_NAMES,
}

MIN_LENGTH = 256  # below this the chat template, instructions and question leave too little room for a haystack

# RULER's noise haystack: five short sentences, repeated.
_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_MULTI = 4  # needles in the multi-key, multi-value and multi-query tasks (RULER's setting)
_VT_HOPS = 4  # one chain of four hops: five variables (RULER's default)
_CWE_COMMON = 10  # words to find in cwe
_FWE_TOP = 3  # words to find in fwe
_FWE_ALPHA = 2.0  # Zipf exponent of the coded words' counts
_FWE_WORD_LEN = 5  # one length for every coded word, so no answer is a substring of another word
# Fill with a prefix of the next unit only when the whole units leave more than this fraction of `length` unused;
# finer units (words, sentences, list entries) stop well inside it, so most samples have no partial unit.
_FILL_TOLERANCE = 0.01
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


@dataclass
class TaskSample:
    """One generated task instance, as text.

    Attributes:
        task: the task name (one of ``TASK_NAMES``).
        length: requested total prompt length in tokens (context and question turn together).
        seed: the seed every random choice was drawn from.
        context: the text that gets compressed: instructions and haystack with the needles or the task body.
        question: the question asked after the context.
        answers: every expected value; scoring is the fraction of them found in the prediction.
        answer_prefix: the start of the answer, placed at the opening of the assistant turn so that the model
            continues it with the values (RULER's answer prefixes); only the continuation is scored.
        depth: where the needle sits, as a fraction of the haystack, for needle tasks; ``None`` otherwise.
        source: for code tasks, ``path:line`` of the target line in the standard library; ``None`` otherwise.
    """

    task: str
    length: int
    seed: int
    context: str
    question: str
    answers: list[str]
    depth: float | None
    answer_prefix: str = ""
    source: str | None = None

    @property
    def sample_id(self) -> str:
        """Unique, replayable name: ``"{task}-{length}-{seed}"``."""
        return f"{self.task}-{self.length}-{self.seed}"


@dataclass
class EncodedSample:
    """A sample encoded with a tokenizer's chat template (one user turn: context, blank line, question).

    Attributes:
        sample: the text of the sample.
        context_ids: chat prefix and context (the part whose KV-cache is compressed).
        question_ids: blank line, question, end of the user turn, the assistant turn's opening and the answer
            prefix (appended uncompressed); ``context_ids + question_ids`` is the full prompt.
    """

    sample: TaskSample
    context_ids: list[int]
    question_ids: list[int]


def parse_tasks(spec: str) -> list[str]:
    """Expand a task list such as ``"ruler-lite"`` or ``"niah_single_1,vt"`` into task names.

    Args:
        spec: comma-separated task names and group names (``TASK_GROUPS``); spaces around names are ignored.

    Returns:
        The task names in the order given, each once.

    Raises:
        ValueError: if ``spec`` names no task, or names one that is neither a task nor a group.
    """
    names: list[str] = []
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"`tasks` must name at least one task but got {spec!r}; {_known_tasks()}")
    for part in parts:
        if part in TASK_GROUPS:
            expanded = TASK_GROUPS[part]
        elif part in TASK_NAMES:
            expanded = (part,)
        else:
            raise ValueError(f"unknown task {part!r}; {_known_tasks()}")
        names.extend(name for name in expanded if name not in names)
    return names


def load_haystack(path: str | Path) -> list[str]:
    """Read documents for the essay haystack from a file.

    Args:
        path: a ``.json`` file holding a list of strings or of objects with a string ``"text"`` field (one
            document each), or any other file read as one plain-text document (UTF-8).

    Returns:
        The non-empty documents, in file order.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if the file is not UTF-8, is empty, is not valid JSON (``.json``), or its JSON is not a
            non-empty list of strings or ``{"text": ...}`` objects; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"haystack file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"haystack file {str(path)!r} is not UTF-8 text: {err}") from err
    if path.suffix.lower() != ".json":
        if not text.strip():
            raise ValueError(f"haystack file {str(path)!r} is empty")
        return [text]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"haystack file {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(
            f"haystack file {str(path)!r} must hold a JSON list of strings or of {{'text': ...}} objects "
            f"but holds a {type(data).__name__}"
        )
    docs = []
    for index, item in enumerate(data):
        doc = item.get("text") if isinstance(item, dict) else item
        if not isinstance(doc, str):
            raise ValueError(
                f"haystack file {str(path)!r}: item {index} must be a string or an object with a string 'text' "
                f"field but got {type(item).__name__}"
            )
        if doc.strip():
            docs.append(doc)
    if not docs:
        raise ValueError(f"haystack file {str(path)!r} holds no non-empty document")
    return docs


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's ``string_match_all`` score: the fraction of answers found in the prediction, ignoring case.

    Args:
        prediction: the model's answer.
        answers: the expected values.

    Returns:
        The mean over ``answers`` of ``answer.lower() in prediction.lower()``, in ``[0, 1]``.

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if not answers:
        raise ValueError("`answers` must hold at least one expected value but got []")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def score_answer(task: str, prediction: str, answers: list[str]) -> float:
    """A prediction's score in ``[0, 1]``.

    Code tasks: edit similarity of the answer's first code line with the target (LongBench's ``code_sim_score``);
    the others: RULER's :func:`string_match_all`.
    """
    if task in CODE_TASK_NAMES:
        return edit_similarity(prediction, answers[0])
    return string_match_all(prediction, answers)


def generate(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int,
    *,
    haystack: list[str] | None = None,
    num_samples_hint: int | None = None,
    sample_index: int | None = None,
) -> EncodedSample:
    """Build one sample of a task, fitted to ``length`` tokens, and encode it with the chat template.

    Args:
        task: one of ``TASK_NAMES``.
        tokenizer: the model's tokenizer; lengths are in its tokens, and its chat template (if any) wraps the
            prompt as one user turn.
        length: total prompt length in tokens (context and question turn), >= 256. The result is never longer;
            from 512 tokens up it is within 2% of it (about 1% in practice).
        seed: every random choice (keys, values, haystack, word lists, the depth when not spread) is drawn from
            ``random.Random(seed)``.
        haystack: documents for the essay haystack (``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``,
            ``niah_multivalue``, ``niah_multiquery``), repeated if too short; other tasks ignore it. ``None`` uses
            the generated prose of :mod:`xkv.prompts`.
        num_samples_hint: how many samples the caller draws for this task and length; with ``sample_index`` it
            spreads the needle depth evenly: ``sample_index / (num_samples_hint - 1)`` (0.5 for a single sample).
        sample_index: this sample's position among the ``num_samples_hint`` samples. Without both, the depth is
            drawn from the seed.

    Returns:
        The sample and its token ids; ``len(context_ids) + len(question_ids) <= length``.

    Raises:
        ValueError: for an unknown ``task``, ``length < 256``, only one of ``num_samples_hint`` and
            ``sample_index``, ``num_samples_hint < 1``, ``sample_index`` outside ``[0, num_samples_hint)``, a
            ``haystack`` that is not a non-empty list of non-empty strings, or a ``length`` too short for the task's
            fixed parts with this tokenizer.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; {_known_tasks()}")
    if length < MIN_LENGTH:
        raise ValueError(f"`length` must be >= {MIN_LENGTH} tokens but got {length}")
    spread_depth = _spread_depth(num_samples_hint, sample_index)
    if haystack is not None and (
        not isinstance(haystack, list) or not haystack or not all(isinstance(d, str) and d.strip() for d in haystack)
    ):
        raise ValueError("`haystack` must be a non-empty list of non-empty strings but got " + _preview(haystack))

    rng = random.Random(seed)
    if task in _NIAH:
        drawn_depth = rng.random()  # drawn even when spread, so keys and values depend on the seed alone
        depth = drawn_depth if spread_depth is None else spread_depth
        draft = _niah_draft(_NIAH[task], rng, length, depth, haystack)
    elif task in REALTEXT_TASK_NAMES:
        drawn_depth = rng.random()  # as for the needle tasks: the rest depends on the seed alone
        depth = drawn_depth if spread_depth is None else spread_depth
        draft = _Draft(**vars(realtext_draft(task, rng, length, depth)))
    elif task == "vt":
        draft = _vt_draft(rng, length)
    elif task == "cwe":
        draft = _cwe_draft(rng, length)
    elif task == "fwe":
        draft = _fwe_draft(rng, length)
    else:
        code = lcc_draft(rng, length) if task == "lcc" else repobench_draft(rng, length)
        draft = _Draft(
            preamble=code.preamble, question=code.question, answers=[code.target],
            render=lambda units, tail: code.render(units), max_units=len(code.lines), tail_limit=lambda units: 0,
            answer_prefix="", source=code.source,
        )  # fmt: skip

    if task in CODE_TASK_NAMES:  # raw completion: the model continues the file, as LongBench's LCC prompts it
        before, after = "", ""
    else:
        before, after = _chat_parts(tokenizer, draft.question)
    after += draft.answer_prefix

    def encode(text: str) -> list[int]:
        # verbose=False: the search tries haystacks longer than the model's window and must not warn about them.
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    question_ids = encode(after)
    context, context_ids = _fit(draft, lambda body: encode(before + body), length - len(question_ids), length, task)
    sample = TaskSample(
        task=task,
        length=length,
        seed=seed,
        context=context,
        question=draft.question,
        answers=draft.answers,
        depth=draft.depth,
        answer_prefix=draft.answer_prefix,
        source=draft.source,
    )
    return EncodedSample(sample=sample, context_ids=context_ids, question_ids=question_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Fitting a task to a token budget


@dataclass
class _Draft:
    """A task instance before its haystack is cut to length.

    ``render(units, tail_chars)`` gives the body for the first ``units`` haystack units (needles inserted) followed
    by the first ``tail_chars`` characters of the next unit; ``tail_limit(units)`` is how many characters that next
    unit has (0 where a partial unit is never used). The token count of the body grows with ``units``.
    """

    preamble: str
    question: str
    answers: list[str]
    render: Callable[[int, int], str]
    max_units: int
    tail_limit: Callable[[int], int]
    answer_prefix: str
    depth: float | None = None
    source: str | None = None


def _fit(
    draft: _Draft, encode: Callable[[str], list[int]], budget: int, length: int, task: str
) -> tuple[str, list[int]]:
    """Longest context whose encoding (chat prefix included) fits ``budget`` tokens, with its token ids."""
    cache: dict[tuple[int, int], list[int]] = {}

    def ids(units: int, tail: int = 0) -> list[int]:
        if (units, tail) not in cache:
            cache[units, tail] = encode(draft.preamble + draft.render(units, tail))
        return cache[units, tail]

    if len(ids(0)) > budget:
        raise ValueError(
            f"`length` {length} is too short for task {task!r} with this tokenizer: its instructions, question and "
            f"chat template alone take {len(ids(0)) + length - budget} tokens"
        )
    units = _largest_fitting(lambda n: len(ids(n)), budget, draft.max_units, first_try=64)
    tail = 0
    limit = draft.tail_limit(units)
    if budget - len(ids(units)) > _FILL_TOLERANCE * length and limit > 0:
        tail = _largest_fitting(lambda n: len(ids(units, n)), budget, limit, first_try=limit // 2)
    return draft.preamble + draft.render(units, tail), ids(units, tail)


def _largest_fitting(size: Callable[[int], int], budget: int, upper: int, first_try: int) -> int:
    """Largest ``n`` in ``[0, upper]`` with ``size(n) <= budget``, for a size that grows about linearly with ``n``.

    Each try interpolates from the sizes measured so far, so it lands close to the budget (few encodings, none much
    longer than the budget); after two tries that fail to halve the interval, it bisects. ``size(0) <= budget`` is
    the caller's check. Token counts are not exactly monotone in ``n``; the result always fits.
    """
    lo, size_lo = 0, size(0)
    size_zero = size_lo
    hi, size_hi = upper + 1, None  # hi is never returned; until measured, it is only assumed not to fit
    candidate, slow_steps = first_try, 0
    while hi - lo > 1:
        if slow_steps >= 2:
            candidate = (lo + hi) // 2
        candidate = min(max(candidate, lo + 1), hi - 1)
        width = hi - lo
        measured = size(candidate)
        if measured <= budget:
            lo, size_lo = candidate, measured
        else:
            hi, size_hi = candidate, measured
        slow_steps = slow_steps + 1 if size_hi is not None and 2 * (hi - lo) > width else 0
        if size_hi is not None:  # bracketed: aim just below the budget
            rate = (size_hi - size_lo) / (hi - lo)
            candidate = lo + int((budget - size_lo) / max(rate, 1e-6))
        else:  # not bracketed yet: aim a little past the budget so the next try brackets it
            rate = (size_lo - size_zero) / lo
            candidate = lo + int(1.02 * (budget - size_lo) / max(rate, 1e-6)) + 2
    return lo


def _insertion_renderer(
    pieces: Sequence[str], boundaries: Sequence[int], needles: Sequence[tuple[float, str]]
) -> Callable[[int, int], str]:
    """Render ``pieces[:units]`` with each needle at the boundary nearest its depth, then a prefix of the next piece.

    Args:
        pieces: haystack units, each ending with its own whitespace.
        boundaries: sorted indices ``i`` before which a needle may go (0 always among them).
        needles: ``(depth, text)``; text ends with whitespace. Needles at the same place keep their order.
    """

    def render(units: int, tail: int) -> str:
        slots = sorted((_snap(boundaries, units, depth), order) for order, (depth, _) in enumerate(needles))
        out: list[str] = []
        previous = 0
        for position, order in slots:
            out.extend(pieces[previous:position])
            out.append(needles[order][1])
            previous = position
        out.extend(pieces[previous:units])
        if tail:
            out.append(pieces[units][:tail])
        return "".join(out).rstrip()

    return render


def _snap(boundaries: Sequence[int], units: int, depth: float) -> int:
    """The allowed position nearest ``depth * units``: a boundary inside the first ``units`` pieces, or the end."""
    target = depth * units
    end = bisect.bisect_right(boundaries, units)
    index = bisect.bisect_left(boundaries, target, 0, end)
    candidates = [units]
    if index > 0:
        candidates.append(boundaries[index - 1])
    if index < end:
        candidates.append(boundaries[index])
    return min(candidates, key=lambda position: (abs(position - target), position))


# ---------------------------------------------------------------------------------------------------------------------
# Task builders


@dataclass(frozen=True)
class _NiahConfig:
    """One needle-in-a-haystack variant: where the needles hide and what they hold."""

    haystack: Literal["noise", "essay", "needles"]
    key_kind: Literal["word", "uuid"]
    value_kind: Literal["number", "uuid"]
    num_keys: int = 1  # needles with different keys
    num_values: int = 1  # needles (values) per key
    num_queries: int = 1  # keys the question asks about


_NIAH: dict[str, _NiahConfig] = {
    "niah_single_1": _NiahConfig("noise", "word", "number"),
    "niah_single_2": _NiahConfig("essay", "word", "number"),
    "niah_single_3": _NiahConfig("essay", "word", "uuid"),
    "niah_multikey_1": _NiahConfig("essay", "word", "number", num_keys=_MULTI),
    "niah_multikey_2": _NiahConfig("needles", "word", "number"),
    "niah_multikey_3": _NiahConfig("needles", "uuid", "uuid"),
    "niah_multivalue": _NiahConfig("essay", "word", "number", num_values=_MULTI),
    "niah_multiquery": _NiahConfig("essay", "word", "number", num_keys=_MULTI, num_queries=_MULTI),
}


def _niah_draft(
    config: _NiahConfig, rng: random.Random, length: int, depth: float, haystack: list[str] | None
) -> _Draft:
    """Needles, question and haystack of one NIAH variant; the first needle sits at ``depth``, the others anywhere."""
    kind = "number" if config.value_kind == "number" else "UUID"
    used: set[str] = set()
    keys = [_draw_key(rng, config.key_kind, used) for _ in range(config.num_keys)]
    values = [[_draw_value(rng, config.value_kind, used) for _ in range(config.num_values)] for _ in keys]
    needles = [(key, value) for key, key_values in zip(keys, values, strict=True) for value in key_values]
    depths = [depth] + [rng.random() for _ in needles[1:]]
    queried = keys[: config.num_queries]
    answers = [value for key, key_values in zip(keys, values, strict=True) if key in queried for value in key_values]

    if config.num_queries > 1:
        names = ", ".join(queried[:-1]) + f" and {queried[-1]}"
        question = f"What are the special magic {kind}s for {names} mentioned in the text above?"
        question += f" Answer with the {kind}s only."
        answer_prefix = f"The special magic {kind}s for {names} mentioned in the text above are"
    elif config.num_values > 1:
        question = f"What are all the special magic {kind}s for {keys[0]} mentioned in the text above?"
        question += f" Answer with the {kind}s only."
        answer_prefix = f"The special magic {kind}s for {keys[0]} mentioned in the text above are"
    else:
        question = f"What is the special magic {kind} for {keys[0]} mentioned in the text above?"
        question += f" Answer with the {kind} only."
        answer_prefix = f"The special magic {kind} for {keys[0]} mentioned in the text above is"
    preamble = (
        f"The text below hides some special magic {kind}s. Remember them: a question about them follows the text.\n\n"
    )

    separator = "\n" if config.haystack == "needles" else " "
    if config.haystack == "noise":
        pieces = _noise_pieces(length)
        boundaries: list[int] = list(range(len(pieces) + 1))
    elif config.haystack == "needles":
        # Every unit is a distractor line; a line costs >= 8 tokens in any tokenizer we know, so this is enough.
        count = length // 8 + 1
        pieces = [
            f"A special magic {kind} for {_draw_key(rng, config.key_kind, used)} is: "
            f"{_draw_value(rng, config.value_kind, used)}.\n"
            for _ in range(count)
        ]
        boundaries = list(range(len(pieces) + 1))
    else:
        pieces = _essay_pieces(rng, length, haystack)
        boundaries = [0] + [i + 1 for i, piece in enumerate(pieces) if "\n" in piece or _SENTENCE_END.search(piece)]
    needle_texts = [
        (d, f"A special magic {kind} for {key} is: {value}.{separator}")
        for d, (key, value) in zip(depths, needles, strict=True)
    ]
    return _Draft(
        preamble=preamble,
        question=question,
        answers=answers,
        render=_insertion_renderer(pieces, boundaries, needle_texts),
        max_units=len(pieces) - 1,  # keep one piece for the tail
        tail_limit=lambda units: len(pieces[units].rstrip()) if units < len(pieces) else 0,
        answer_prefix=answer_prefix,
        depth=depth,
    )


def _vt_draft(rng: random.Random, length: int) -> _Draft:
    """Variable tracking: one chain of assignments, in order, at random places in the noise haystack."""
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    depths = sorted(rng.random() for _ in statements)
    pieces = _noise_pieces(length)
    return _Draft(
        preamble=(
            "The text below hides a chain of variable assignments. Follow every assignment: a question about them "
            "follows the text.\n\n"
        ),
        question=(
            f"Which variables are assigned the value {value} in the text above, directly or through other variables? "
            "Answer with the variable names only."
        ),
        answer_prefix=(
            f"According to the chain of assignments in the text above, {len(names)} variables are assigned the "
            f"value {value}, they are:"
        ),
        answers=names,
        render=_insertion_renderer(
            pieces, range(len(pieces) + 1), [(d, s + " ") for d, s in zip(depths, statements, strict=True)]
        ),
        max_units=len(pieces) - 1,
        tail_limit=lambda units: 0,
    )


def _cwe_draft(rng: random.Random, length: int) -> _Draft:
    """Common words extraction: ten words repeated ``f_c`` times among words repeated ``f_u`` times."""
    common_count = min(30, max(2, length // 256))  # RULER's 30 from 7680 tokens; fewer so short prompts fit
    rare_count = min(3, max(1, common_count // 4))  # RULER's 3, kept below common_count
    pool = _word_pool("noun", "adjective", "verb")
    max_units = length // 2  # an entry ("12. word") takes >= 2 tokens
    words = rng.sample(pool, min(len(pool), _CWE_COMMON + math.ceil(max_units / rare_count)))
    common, rare = words[:_CWE_COMMON], words[_CWE_COMMON:]
    order_seed = rng.getrandbits(64)

    def render(units: int, tail: int) -> str:
        entries = common * common_count + [rare[i // rare_count] for i in range(units)]
        random.Random(order_seed).shuffle(entries)
        return "\n".join(f"{i}. {word}" for i, word in enumerate(entries, start=1))

    return _Draft(
        preamble=(
            "Below is a numbered list of words. Some words appear much more often than the others; keep track of "
            "them: a question about them follows the list.\n\n"
        ),
        question=f"What are the {_CWE_COMMON} most common words in the list above? Answer with the words only.",
        answer_prefix=f"The {_CWE_COMMON} words that appear most often in the list are:",
        answers=common,
        render=render,
        max_units=min(max_units, rare_count * len(rare)),
        tail_limit=lambda units: 0,
    )


def _fwe_draft(rng: random.Random, length: int) -> _Draft:
    """Frequent words extraction: coded words with Zipf-distributed counts; the top three must be found."""
    vocab_size = math.isqrt(length) + 8  # counts fall below one well before this rank
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(_FWE_WORD_LEN))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    weights = [rank**-_FWE_ALPHA for rank in range(1, vocab_size + 1)]
    total_weight = sum(weights)
    order_seed = rng.getrandbits(64)

    def render(units: int, tail: int) -> str:
        counts = [int(units * weight / total_weight) for weight in weights]
        # Keep the top words strictly ahead of each other and of the rest, so the answer is never a tie.
        counts[_FWE_TOP - 1] = max(counts[_FWE_TOP - 1], 1)
        for rank in range(_FWE_TOP - 2, -1, -1):
            counts[rank] = max(counts[rank], counts[rank + 1] + 1)
        for rank in range(_FWE_TOP, vocab_size):
            counts[rank] = min(counts[rank], counts[_FWE_TOP - 1] - 1)
        words = [word for word, count in zip(vocab, counts, strict=True) for _ in range(count)]
        random.Random(order_seed).shuffle(words)
        return " ".join(words)

    return _Draft(
        preamble=(
            "Below is a coded text made of made-up words. Some words appear much more often than the others; keep "
            "track of them: a question about them follows the text.\n\n"
        ),
        question=(
            f"What are the {_FWE_TOP} most frequently appearing coded words in the text above? "
            "Answer with the words only."
        ),
        answer_prefix=f"According to the coded text above, the {_FWE_TOP} most frequently appearing words are:",
        answers=vocab[:_FWE_TOP],
        render=render,
        max_units=length,  # a word takes >= 1 token
        tail_limit=lambda units: 0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Haystacks, keys and values


def _noise_pieces(length: int) -> list[str]:
    """RULER's noise sentences, repeated: ``length`` of them is more than any prompt of ``length`` tokens holds."""
    return [_NOISE[i % len(_NOISE)] + " " for i in range(length + 1)]


def _essay_pieces(rng: random.Random, length: int, haystack: list[str] | None) -> list[str]:
    """Words (each with its trailing whitespace) of natural text: more than ``length`` tokens' worth."""
    needed = length + 1  # every word takes at least one token
    pieces: list[str] = []
    if haystack is None:
        while len(pieces) < needed:
            pieces.extend(word + " " for word in _sentence(rng).split())
        return pieces
    docs = list(haystack)
    rng.shuffle(docs)
    doc_pieces = [re.findall(r"\S+\s*", doc.strip() + "\n\n") for doc in docs]
    while len(pieces) < needed:
        for words in doc_pieces:
            pieces.extend(words)
    return pieces


def _draw_key(rng: random.Random, kind: str, used: set[str]) -> str:
    """A key not in ``used`` (and add it): an adjective-noun pair or a UUID."""
    while True:
        if kind == "uuid":
            key = _draw_uuid(rng)
        else:
            key = f"{rng.choice(_word_pool('adjective'))}-{rng.choice(_word_pool('noun'))}"
        if key not in used:
            used.add(key)
            return key


def _draw_value(rng: random.Random, kind: str, used: set[str]) -> str:
    """A value not in ``used`` (and add it): a 7-digit number or a UUID."""
    while True:
        value = _draw_uuid(rng) if kind == "uuid" else str(rng.randint(1_000_000, 9_999_999))
        if value not in used:
            used.add(value)
            return value


def _draw_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@functools.cache
def _word_pool(*categories: str) -> list[str]:
    """Sorted single lowercase words of the ``wonderwords`` lists (profanity removed), for seeded draws."""
    try:
        from wonderwords import Defaults, RandomWord, filter_profanity
    except ImportError as err:
        raise ImportError("RULER-style tasks draw words from wonderwords: pip install wonderwords") from err
    lists = {"noun": Defaults.NOUNS, "adjective": Defaults.ADJECTIVES, "verb": Defaults.VERBS}
    words = RandomWord(enhanced_prefixes=False, **{c: lists[c] for c in categories}).filter(
        include_categories=list(categories), regex="[a-z]{3,}"
    )
    return sorted(set(filter_profanity(words)))


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks


def _spread_depth(num_samples_hint: int | None, sample_index: int | None) -> float | None:
    """Evenly spread depth for sample ``sample_index`` of ``num_samples_hint``; ``None`` when neither is given."""
    if num_samples_hint is None and sample_index is None:
        return None
    if num_samples_hint is None or sample_index is None:
        raise ValueError(
            "`num_samples_hint` and `sample_index` must be given together but got "
            f"num_samples_hint={num_samples_hint}, sample_index={sample_index}"
        )
    if num_samples_hint < 1:
        raise ValueError(f"`num_samples_hint` must be >= 1 but got {num_samples_hint}")
    if not 0 <= sample_index < num_samples_hint:
        raise ValueError(f"`sample_index` must be in [0, {num_samples_hint - 1}] but got {sample_index}")
    return 0.5 if num_samples_hint == 1 else sample_index / (num_samples_hint - 1)


def _known_tasks() -> str:
    return f"known tasks: {', '.join(TASK_NAMES)}; groups: {', '.join(TASK_GROUPS)}"


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
