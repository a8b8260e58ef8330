"""The text the tasks are made of: noise sentences, essay words and word lists.

RULER's noise haystack, essay words (the prose of :mod:`xkv.prompts` or a user's documents: :func:`load_haystack`) and
the ``wonderwords`` word lists, each drawn with the sample's own seeded ``random.Random``.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from xkv.prompts import _sentence

# RULER's noise haystack: five short sentences, repeated.
_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


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
