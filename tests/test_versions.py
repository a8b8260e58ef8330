"""The tested transformers lines are named once in the Makefile; the code and the README say the same."""

import re
from pathlib import Path

from xkv.compat import TESTED_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]


def newest_line() -> str:
    (line,) = re.findall(r"^NEWEST_TRANSFORMERS \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    return line


def test_the_makefile_newest_line_is_the_one_compat_names():
    assert newest_line() in TESTED_TRANSFORMERS
    assert TESTED_TRANSFORMERS[0] == "5.2.*"  # kvpress 0.5.5 pins transformers below 5.3: the main environment


def test_the_readme_names_the_tested_lines():
    readme = (ROOT / "README.md").read_text()
    version = newest_line().removesuffix(".*")
    assert f"transformers {version}.* (xkv installed without its dependency pins" in readme
    assert f"**Tested lines**: 5.2.x (the whole suite) and {version}.0, the newest" in readme
