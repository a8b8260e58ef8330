"""Retrieval, needle in a haystack (NIAH): the eight ``niah_*`` variants of RULER (Hsieh et al. 2024).

"Needles" (``A special magic number for <key> is: <value>.``) are hidden in a haystack of noise sentences, essay
words or distractor needles, and the question asks for the value of one key, all values of a key, or the values of
several keys.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from typing import Literal

from xkv.evaluation.tasks.drafting import _Draft, _insertion_renderer
from xkv.evaluation.tasks.haystacks import _essay_pieces, _noise_pieces, _word_pool

_MULTI = 4  # needles in the multi-key, multi-value and multi-query tasks (RULER's setting)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


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
