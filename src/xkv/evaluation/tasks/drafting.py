"""Fitting a task to a token budget: a draft of a task instance, and the search that cuts its haystack to length.

Every task family builds a :class:`_Draft` (instructions, question, answers and a ``render`` of the body for a number
of haystack units); :func:`_fit` finds the longest body whose encoding fits the budget, measuring token counts and
interpolating between them, then fills a remaining gap with a character prefix of the next unit.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Fill with a prefix of the next unit only when the whole units leave more than this fraction of `length` unused;
# finer units (words, sentences, list entries) stop well inside it, so most samples have no partial unit.
_FILL_TOLERANCE = 0.01


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
