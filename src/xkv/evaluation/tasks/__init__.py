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

The package holds one module per task family (:mod:`~xkv.evaluation.tasks.needles`,
:mod:`~xkv.evaluation.tasks.tracking`, :mod:`~xkv.evaluation.tasks.extraction`), the text they are made of
(:mod:`~xkv.evaluation.tasks.haystacks`) and the fitting to a token length they share
(:mod:`~xkv.evaluation.tasks.drafting`); this module names the tasks and builds and scores samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from xkv.evaluation.code_tasks import CODE_TASK_NAMES, edit_similarity, lcc_draft, repobench_draft
from xkv.evaluation.realtext import REALTEXT_TASK_NAMES, realtext_draft
from xkv.evaluation.tasks.drafting import _Draft, _fit
from xkv.evaluation.tasks.extraction import _cwe_draft, _fwe_draft
from xkv.evaluation.tasks.haystacks import load_haystack
from xkv.evaluation.tasks.needles import _NIAH, _niah_draft
from xkv.evaluation.tasks.tracking import _vt_draft
from xkv.prompts import _chat_parts

__all__ = [
    "MIN_LENGTH",
    "RULER_TASK_NAMES",
    "TASK_GROUPS",
    "TASK_NAMES",
    "EncodedSample",
    "TaskSample",
    "generate",
    "load_haystack",
    "parse_tasks",
    "score_answer",
    "string_match_all",
]

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

    draft = _draft(task, random.Random(seed), length, spread_depth, haystack)

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


def _draft(
    task: str, rng: random.Random, length: int, spread_depth: float | None, haystack: list[str] | None
) -> _Draft:
    """The task's instance before fitting, every choice drawn from ``rng``; needles at ``spread_depth`` if given."""
    if task in _NIAH:
        drawn_depth = rng.random()  # drawn even when spread, so keys and values depend on the seed alone
        depth = drawn_depth if spread_depth is None else spread_depth
        return _niah_draft(_NIAH[task], rng, length, depth, haystack)
    if task in REALTEXT_TASK_NAMES:
        drawn_depth = rng.random()  # as for the needle tasks: the rest depends on the seed alone
        depth = drawn_depth if spread_depth is None else spread_depth
        return _Draft(**vars(realtext_draft(task, rng, length, depth)))
    if task == "vt":
        return _vt_draft(rng, length)
    if task == "cwe":
        return _cwe_draft(rng, length)
    if task == "fwe":
        return _fwe_draft(rng, length)
    code = lcc_draft(rng, length) if task == "lcc" else repobench_draft(rng, length)
    return _Draft(
        preamble=code.preamble, question=code.question, answers=[code.target],
        render=lambda units, tail: code.render(units), max_units=len(code.lines), tail_limit=lambda units: 0,
        answer_prefix="", source=code.source,
    )  # fmt: skip


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
