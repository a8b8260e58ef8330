"""Multi-hop tracing, variable tracking (``vt``): one chain of assignments hidden in RULER's noise haystack.

``VAR A = 12345.``, ``VAR B = VAR A.``, ... (four hops, five variables: RULER's default) sit in order at random
places; the question asks which variables hold the value, and all five names are the answer.
"""

from __future__ import annotations

import random
import string

from xkv.evaluation.tasks.drafting import _Draft, _insertion_renderer
from xkv.evaluation.tasks.haystacks import _noise_pieces

_VT_HOPS = 4  # one chain of four hops: five variables (RULER's default)


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
