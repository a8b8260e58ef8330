"""Code completion tasks in the manner of LongBench's LCC and RepoBench-P, built offline from Python's own library.

The paper's MLA result is on code completion (LongBench LCC and RepoBench-P, scored by edit similarity). Both are
rebuilt here from the source files of the running interpreter's standard library (PSF licence), so no data set is
downloaded and a sample is rebuilt exactly from ``(task, length, seed)`` on the same Python:

- ``lcc``: one long file; the context is the lines before a target line, as many as fit the length; the model writes
  the next line.
- ``repobench_p``: other files of the same package as cross-file context (as many lines as fit), then the last
  ``IN_FILE_LINES`` lines of the current file before the target line, each file under a ``# Path:`` header; the model
  writes the next line.

Both are prompted as raw completion, without the chat template: the context (instructions, then the code) is the
compressed part, nothing is appended, and the model continues the file from the start of the target line (with the
chat template and a question, SmolLM2-135M opened new code blocks instead). A target is a line whose first token
is a name or keyword (so never a comment, a blank line or a line inside a docstring; it may continue a bracketed
statement) with at least 8 characters. Scoring follows LongBench's ``code_sim_score``: the
first line of the answer that is not a fence or comment, compared with the target by an edit similarity in
``[0, 1]`` (``difflib``'s ratio, close to the Levenshtein ratio LongBench uses); exact match is reported beside it.
"""

from __future__ import annotations

import difflib
import io
import random
import sysconfig
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: Code tasks, and the group that names them for ``--tasks``.
CODE_TASK_NAMES: tuple[str, ...] = ("lcc", "repobench_p")
#: Lines of the current file right before the target in ``repobench_p`` (kept whole, after the cross-file part).
IN_FILE_LINES = 30
#: Characters of code per token assumed when choosing a file long enough for the length (measured: ~3.3 on
#: SmolLM2's tokenizer); generous, so the fit never runs short of lines.
_CHARS_PER_TOKEN = 5
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip",
                 "__pycache__", "config-3.11-x86_64-linux-gnu"}  # fmt: skip


@dataclass
class CodeDraft:
    """A code task before it is cut to length: ``lines_before`` grow from the end (lcc) or ``cross`` from the start.

    Attributes:
        preamble: instructions.
        lines: the units: for ``lcc`` the file's lines before the target, for ``repobench_p`` the cross-file lines.
        from_end: ``True`` if a context of ``n`` units is the *last* ``n`` of ``lines`` (lcc).
        suffix: text after the units (the current file's header and its last lines for ``repobench_p``).
        question: the request after the context.
        target: the line to write (stripped).
        source: ``path:line`` of the target in the standard library (1-based).
    """

    preamble: str
    lines: list[str]
    from_end: bool
    suffix: str
    question: str
    target: str
    source: str

    def render(self, units: int) -> str:
        """The context body for ``units`` units."""
        part = self.lines[len(self.lines) - units :] if self.from_end else self.lines[:units]
        return "".join(part) + self.suffix


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def _python_files() -> tuple[Path, ...]:
    """Every ``.py`` file of the standard library outside tests and GUI demos, sorted (so seeds pick the same)."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in _SKIPPED_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        files.append(path)
    return tuple(files)


@cache
def _statement_lines(path: Path) -> tuple[int, ...]:
    """0-based indices of lines that start a code statement with a name or keyword (at least 8 characters)."""
    lines = _read_lines(path)
    starts = set()
    first_on_line: set[int] = set()
    skipped = (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER)
    try:
        for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            row = token.start[0]
            if row in first_on_line or token.type in skipped or row > len(lines):
                continue
            first_on_line.add(row)
            line = lines[row - 1]
            at_indent = token.start[1] == len(line) - len(line.lstrip())
            if token.type == tokenize.NAME and at_indent and len(line.strip()) >= 8:
                starts.add(row - 1)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return ()
    return tuple(sorted(starts))


def _read_lines(path: Path) -> list[str]:
    """Lines split at newlines only, as ``tokenize`` counts them (``str.splitlines`` also splits at form feeds)."""
    return io.StringIO(path.read_text(encoding="utf-8"), newline=None).readlines()


def _pick_target(rng: random.Random, path: Path, need_chars: int) -> int | None:
    """A statement line of ``path`` with at least ``need_chars`` characters before it, or ``None``."""
    lines = _read_lines(path)
    before = [0]
    for line in lines:
        before.append(before[-1] + len(line))
    candidates = [i for i in _statement_lines(path) if before[i] >= need_chars]
    return rng.choice(candidates) if candidates else None


def lcc_draft(rng: random.Random, length: int) -> CodeDraft:
    """An LCC-style sample: a long file cut before a target line."""
    need = _CHARS_PER_TOKEN * length
    files = [p for p in _python_files() if p.stat().st_size >= need + 2000]
    if not files:
        raise ValueError(f"no standard-library file is long enough for a {length}-token lcc sample")
    for _ in range(100):
        path = rng.choice(files)
        index = _pick_target(rng, path, need)
        if index is not None:
            break
    else:  # pragma: no cover - every file this long has statements that far in
        raise ValueError(f"found no target line for a {length}-token lcc sample")
    lines = _read_lines(path)
    return CodeDraft(
        preamble="Please complete the code given below.\n\n",
        lines=lines[:index],
        from_end=True,
        suffix="",
        question="Next line of code: write only the line that comes next in the code above.",
        target=lines[index].strip(),
        source=f"{path.relative_to(stdlib_root())}:{index + 1}",
    )


def repobench_draft(rng: random.Random, length: int) -> CodeDraft:
    """A RepoBench-P-style sample: sibling modules of a package as context, then the current file's last lines."""
    packages: dict[Path, list[Path]] = {}
    for path in _python_files():
        if path.parent != stdlib_root():
            packages.setdefault(path.parent, []).append(path)
    need = _CHARS_PER_TOKEN * length
    usable = [
        (folder, files) for folder, files in sorted(packages.items())
        if len(files) >= 3 and sum(p.stat().st_size for p in files) >= need + 4000
    ]  # fmt: skip
    for _ in range(100):
        folder, files = rng.choice(usable)
        current = rng.choice(files)
        index = _pick_target(rng, current, 200)
        if index is not None and index >= IN_FILE_LINES:
            break
    else:  # pragma: no cover
        raise ValueError(f"found no target line for a {length}-token repobench_p sample")
    root = stdlib_root()
    cross: list[str] = []
    for other in sorted(files):
        if other == current:
            continue
        cross.append(f"# Path: {other.relative_to(root)}\n")
        cross.extend(_read_lines(other))
        if not cross[-1].endswith("\n"):
            cross[-1] += "\n"
    lines = _read_lines(current)
    suffix = f"# Path: {current.relative_to(root)}\n" + "".join(lines[index - IN_FILE_LINES : index])
    return CodeDraft(
        preamble="Please complete the code given below, using the other files of its package above it.\n\n",
        lines=cross,
        from_end=False,
        suffix=suffix,
        question="Next line of code: write only the line that comes next in the last file above.",
        target=lines[index].strip(),
        source=f"{current.relative_to(root)}:{index + 1}",
    )


def first_code_line(prediction: str) -> str:
    """LongBench's rule: the first line of the answer that is not empty, a fence or a comment, stripped."""
    for line in prediction.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("`", "#", "//")):
            return stripped
    return ""


def edit_similarity(prediction: str, target: str) -> float:
    """Similarity in ``[0, 1]`` of the prediction's first code line and the target line (1 = identical)."""
    line = first_code_line(prediction)
    if not line and not target:
        return 1.0
    return difflib.SequenceMatcher(None, line, target.strip(), autojunk=False).ratio()


def exact_match(prediction: str, target: str) -> bool:
    """Whether the prediction's first code line is the target line (whitespace at the ends ignored)."""
    return first_code_line(prediction) == target.strip()
