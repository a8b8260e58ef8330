"""Which seeds may choose a setting and which may report one: the calibration/report split.

Every task family draws a sample from its seed, so seeds split the data in two (``benchmarks/README.md``,
"Choose on calibration, report on held-out"):

- ``report``: seeds 0-19 of every family (RULER-lite, code-lite and the real-text families). The tables report on
  them; no default, ``xkv tune`` search or ``sr_*`` setting is chosen on them.
- ``calibration``: seeds 1000 and up of every family. Settings are chosen on them only.

``xkv eval`` records the split of its seeds in ``plan.json`` (``"split"``): ``report`` or ``calibration`` when every
seed of the run is in that split, ``mixed`` otherwise (seeds of both, or seeds 20-999, which belong to neither).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

#: Seeds the reported tables use (every family).
REPORT_SEEDS = range(0, 20)
#: Seeds from this one up are for choosing settings (every family).
CALIBRATION_FIRST_SEED = 1000

Split = Literal["report", "calibration", "mixed"]


def seed_split(seeds: Iterable[int]) -> Split:
    """The split a run's seeds belong to.

    Args:
        seeds: the sample seeds of a run (the same for every task and length).

    Returns:
        ``"report"`` if every seed is in ``REPORT_SEEDS``, ``"calibration"`` if every seed is at least
        ``CALIBRATION_FIRST_SEED``, else ``"mixed"``.

    Raises:
        ValueError: if ``seeds`` is empty.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("`seeds` must hold at least one seed but got none")
    if all(seed in REPORT_SEEDS for seed in seeds):
        return "report"
    if all(seed >= CALIBRATION_FIRST_SEED for seed in seeds):
        return "calibration"
    return "mixed"
