"""Aggregation, word extraction: common words (``cwe``) in a numbered list and frequent coded words (``fwe``).

``cwe``: ten words appear ``f_c`` times each among others that appear ``f_u < f_c`` times; ``fwe``: made-up
five-letter words whose counts follow a Zipf law, the three most frequent strictly ahead of the rest.
"""

from __future__ import annotations

import math
import random
import string

from xkv.evaluation.tasks.drafting import _Draft
from xkv.evaluation.tasks.haystacks import _word_pool

_CWE_COMMON = 10  # words to find in cwe
_FWE_TOP = 3  # words to find in fwe
_FWE_ALPHA = 2.0  # Zipf exponent of the coded words' counts
_FWE_WORD_LEN = 5  # one length for every coded word, so no answer is a substring of another word


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
