import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_runs_and_answers():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    expected = next(line for line in proc.stdout.splitlines() if line.startswith("expected:")).split()[-1]
    assert proc.stdout.count(expected) >= 3  # both answers and the expected line
    # int4 factors drop directions whose rounding would cost more than they hold, so 4x measures at least 4x.
    assert float(proc.stdout.split(" held (")[1].split("x, measured")[0]) >= 4.0


@pytest.mark.slow
def test_kvpress_pipeline_example_answers_from_the_factors():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "kvpress_pipeline.py")], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer: " in proc.stdout and "8056020" in proc.stdout.split("answer: ")[1].splitlines()[0]
    factor = float(proc.stdout.split("context: ")[1].split("x")[0])
    assert 4.0 <= factor <= 6.0
