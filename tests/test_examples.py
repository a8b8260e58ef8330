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
    assert "(4.00x, measured" in proc.stdout
