"""Held-out retrieval tasks on real text: documentation prose, a JSON object and library source code.

RULER-lite's haystacks are template sentences or repeated noise, and its needles all read "A special magic ... for
<key> is: <value>.". These families differ in haystack, needle wording and question, so that a setting chosen on
RULER-lite can be checked on text it was not chosen on (``benchmarks/README.md``: calibration seeds 1000+, report
seeds 0-19). Every text is read from files that ship with CPython 3.11 itself (its standard library under
``sysconfig.get_paths()["stdlib"]``, PSF licence), from the pinned file lists below, parsed with :mod:`ast` and
:mod:`tokenize` (nothing is imported), so a sample is rebuilt exactly from ``(task, length, seed)`` (and the depth
arguments of :func:`xkv.evaluation.tasks.generate`) on the same CPython release; another patch release can differ
where a docstring or a line changed.

- ``prose_needle``: paragraphs of the library's docstrings (module, class and function documentation, prose only:
  no code examples, doctests, tables or indented blocks), whole docstrings in a seeded order. One sentence,
  ``The access code for the <Word> archive is <value>.``, sits at a sentence boundary at the sample's depth. The
  value is 6 digits, three hyphenated words (``harbor-lantern-violet``) or a UUID-like hex code
  (``7F3A-09C2-DE14``), drawn per seed. The question asks which access code the documentation gives for that
  archive.
- ``kv_json``: key-value retrieval over one JSON object of UUID keys and UUID values (as in Liu et al. 2023, "Lost
  in the Middle"); the queried pair sits at the sample's depth and the question asks for the value under its key.
  The context is valid JSON (the last entry may hold a shortened key and value, so the length is met closely).
- ``code_passkey``: library source files without their module docstrings (a ``# File: <path>`` line before each)
  in a seeded order; one assignment, ``PASSKEY_<WORD> = <value>`` (an 8-digit integer or a quoted 12-character hex
  string), is inserted before a statement (at any nesting level), indented as that statement, at the sample's
  depth, so the code stays valid Python. The question asks which value the code assigns to that constant.

Scoring is RULER's ``string_match_all`` (:func:`xkv.evaluation.tasks.string_match_all`): the answer scores 1 if
the value appears in it as a substring, ignoring case, else 0 (``harbor lantern violet`` does not match
``harbor-lantern-violet``). Each task has one value, which appears in its context exactly once.
"""

from __future__ import annotations

import ast
import bisect
import functools
import inspect
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xkv.evaluation.code_tasks import _read_lines, stdlib_root

#: The held-out families on real text, and the group that names them for ``--tasks``.
REALTEXT_TASK_NAMES: tuple[str, ...] = ("prose_needle", "kv_json", "code_passkey")

#: Standard-library files whose docstrings make the ``prose_needle`` haystack (paths under the stdlib folder).
PROSE_FILES: tuple[str, ...] = (
    "_pydecimal.py", "_pyio.py", "argparse.py", "asyncio/base_events.py", "asyncio/events.py", "asyncio/locks.py",
    "asyncio/queues.py", "asyncio/streams.py", "asyncio/tasks.py", "bdb.py", "calendar.py", "cmd.py", "codecs.py",
    "collections/__init__.py", "concurrent/futures/_base.py", "configparser.py", "contextlib.py", "copy.py",
    "csv.py", "dataclasses.py", "difflib.py", "doctest.py", "email/message.py", "email/utils.py", "enum.py",
    "fileinput.py", "fractions.py", "ftplib.py", "functools.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "http/client.py", "http/cookiejar.py", "http/server.py", "imaplib.py", "importlib/_bootstrap_external.py",
    "inspect.py", "ipaddress.py", "json/__init__.py", "json/decoder.py", "locale.py", "logging/__init__.py",
    "logging/config.py", "logging/handlers.py", "mailbox.py", "multiprocessing/managers.py",
    "multiprocessing/pool.py", "optparse.py", "os.py", "pathlib.py", "pdb.py", "pickle.py", "platform.py",
    "pprint.py", "pstats.py", "pydoc.py", "queue.py", "random.py", "sched.py", "selectors.py", "shlex.py",
    "shutil.py", "smtplib.py", "socket.py", "socketserver.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "tokenize.py", "traceback.py",
    "typing.py", "unittest/case.py", "urllib/parse.py", "urllib/request.py", "warnings.py", "weakref.py",
    "xml/etree/ElementTree.py", "zipfile.py",
)  # fmt: skip

#: Standard-library files that make the ``code_passkey`` haystack.
CODE_FILES: tuple[str, ...] = (
    "argparse.py", "bisect.py", "calendar.py", "cmd.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "difflib.py", "enum.py", "fileinput.py", "fnmatch.py", "fractions.py", "ftplib.py",
    "functools.py", "getopt.py", "gettext.py", "glob.py", "graphlib.py", "gzip.py", "hmac.py",
    "ipaddress.py", "json/decoder.py", "json/encoder.py", "netrc.py", "numbers.py", "optparse.py",
    "pprint.py", "queue.py", "quopri.py", "reprlib.py", "sched.py", "secrets.py", "selectors.py", "shlex.py",
    "shutil.py", "statistics.py", "string.py", "tabnanny.py", "tempfile.py", "textwrap.py", "timeit.py",
    "tokenize.py", "traceback.py", "weakref.py", "zipapp.py",
)  # fmt: skip

_PROSE_VALUE_KINDS = ("digits", "words", "hex")
_CODE_VALUE_KINDS = ("digits", "hex")
# Characters that prose paragraphs are made of; a paragraph with more than 3% of others (tables, markup, formulas)
# is left out.
_NOT_PROSE_CHARS = re.compile(r"[^A-Za-z0-9 ,.;:'\"()`\-_/]")
_SENTENCE_WORD_END = re.compile(r"[a-z0-9)\"'`][.!?][\"')]*\s+$")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "No."}


@dataclass
class RealTextDraft:
    """A real-text task before its haystack is cut to length (the fields of ``tasks.drafting._Draft``).

    Attributes:
        preamble: instructions before the haystack.
        question: the question asked after the context.
        answers: the one expected value.
        render: ``render(units, tail)``: the body with ``units`` haystack units, the target inserted at the boundary
            nearest ``depth * units``, then ``tail`` characters of the next unit.
        max_units: most units ``render`` takes.
        tail_limit: characters the partial unit after ``units`` units can have (0: never used).
        answer_prefix: start of the answer, placed at the opening of the assistant turn.
        depth: where the target sits, as a fraction of the haystack units.
        source: ``None`` (the haystack spans several files).
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


def realtext_draft(task: str, rng: random.Random, length: int, depth: float) -> RealTextDraft:
    """Draft one sample of a real-text task.

    Args:
        task: one of ``REALTEXT_TASK_NAMES``.
        rng: the sample's generator (keys, values and the haystack order are drawn from it).
        length: total prompt length in tokens; the haystack drafted holds more than that.
        depth: where the target goes, as a fraction of the haystack in ``[0, 1]``.

    Raises:
        ValueError: for an unknown ``task``.
        FileNotFoundError: if a pinned standard-library file is missing (another Python than 3.11).
    """
    if task == "prose_needle":
        return _prose_draft(rng, length, depth)
    if task == "kv_json":
        return _kv_draft(rng, length, depth)
    if task == "code_passkey":
        return _code_draft(rng, length, depth)
    raise ValueError(f"unknown real-text task {task!r}; real-text tasks: {', '.join(REALTEXT_TASK_NAMES)}")


# ---------------------------------------------------------------------------------------------------------------------
# Task builders


def _prose_draft(rng: random.Random, length: int, depth: float) -> RealTextDraft:
    """An access-code sentence at a sentence boundary of documentation prose."""
    word = rng.choice(_nouns()).capitalize()
    kind = rng.choice(_PROSE_VALUE_KINDS)
    value = _draw_absent(lambda: _prose_value(rng, kind), _prose_text())
    docs = list(_prose_docs())
    rng.shuffle(docs)
    pieces: list[str] = []
    while len(pieces) <= length:  # every word is at least one token
        for doc in docs:
            pieces.extend(re.findall(r"\S+\s*", "\n\n".join(doc) + "\n\n"))
            if len(pieces) > length:
                break
    boundaries = [0] + [i + 1 for i in range(len(pieces) - 1) if _ends_sentence(pieces[i], pieces[i + 1])]
    needle = f"The access code for the {word} archive is {value}. "
    return RealTextDraft(
        preamble=(
            "The passages below come from the documentation of Python's standard library. Read them carefully: a "
            "question about them follows.\n\n"
        ),
        question=(
            f"According to the documentation above, what is the access code for the {word} archive? "
            "Reply with the code exactly as written."
        ),
        answers=[value],
        render=_inserting_renderer(pieces, boundaries, depth, lambda position: needle),
        max_units=len(pieces) - 1,
        tail_limit=lambda units: 0,
        answer_prefix=f"The access code for the {word} archive is",
        depth=depth,
    )


def _kv_draft(rng: random.Random, length: int, depth: float) -> RealTextDraft:
    """One key-value pair of interest among UUID pairs of a JSON object."""
    count = length // 16 + 2  # an entry of two UUIDs takes about 50 tokens, far more than 16 in any tokenizer
    used: set[str] = set()
    pairs = [(_unique_uuid(rng, used), _unique_uuid(rng, used)) for _ in range(count + 1)]
    (key, value), others = pairs[0], pairs[1:]

    def entry(pair: tuple[str, str]) -> str:
        return f'  "{pair[0]}": "{pair[1]}"'

    def render(units: int, tail: int) -> str:
        entries = [entry(pair) for pair in others[:units]]
        entries.insert(_nearest(range(units + 1), depth * units), entry((key, value)))
        if tail:  # the next pair cut to its first `tail` characters of key and value: still valid JSON
            next_key, next_value = others[units]
            entries.append(entry((next_key[:tail], next_value[: max(tail - len(next_key), 0)])))
        return "{\n" + ",\n".join(entries) + "\n}"

    return RealTextDraft(
        preamble=(
            "Below is a JSON object that maps keys to values; every key and every value is a UUID. A question about "
            "one of the keys follows.\n\n"
        ),
        question=f'In the JSON object above, which value is stored under the key "{key}"? Reply with the value only.',
        answers=[value],
        render=render,
        max_units=count - 1,
        tail_limit=lambda units: len(others[units][0]) + len(others[units][1]),
        answer_prefix=f'The value stored under "{key}" is "',
        depth=depth,
    )


def _code_draft(rng: random.Random, length: int, depth: float) -> RealTextDraft:
    """A ``PASSKEY_<WORD> = <value>`` statement between two statements of library source code."""
    name = f"PASSKEY_{rng.choice(_nouns()).upper()}"
    kind = rng.choice(_CODE_VALUE_KINDS)
    value = _draw_absent(lambda: _code_value(rng, kind), _code_text())
    literal = value if kind == "digits" else f'"{value}"'
    files = list(CODE_FILES)
    rng.shuffle(files)
    pieces: list[str] = []
    boundaries: list[int] = []
    chars, need = 0, 6 * length  # code takes about 3.3 characters per SmolLM2 token, and never less than 1
    while chars <= need:
        for relative in files:
            lines, starts = _code_file(relative)
            boundaries.append(len(pieces))
            boundaries.extend(len(pieces) + 1 + start for start in starts)
            pieces.append(f"# File: {relative}\n")
            pieces.extend(lines)
            chars += sum(map(len, lines))
            if chars > need:
                break

    def needle(position: int) -> str:
        following = pieces[position] if position < len(pieces) else ""
        indent = "" if following.startswith("# File: ") else following[: len(following) - len(following.lstrip())]
        return f"{indent}{name} = {literal}\n"

    return RealTextDraft(
        preamble="Below is source code from Python's standard library. Read it carefully: a question about it follows."
        "\n\n",
        question=f"In the code above, which value is assigned to the constant {name}? Reply with the value only.",
        answers=[value],
        render=_inserting_renderer(pieces, boundaries, depth, needle),
        max_units=len(pieces) - 1,
        tail_limit=lambda units: len(pieces[units].rstrip()),
        answer_prefix=f"{name} =",  # the answer opens as code does; the full cache answered 3/8 of seeds 0-7
        # at 2k with "In the code above, PASSKEY_X is set to" (it often repeated the name), 8/8 with this one
        depth=depth,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _inserting_renderer(
    pieces: Sequence[str], boundaries: Sequence[int], depth: float, needle: Callable[[int], str]
) -> Callable[[int, int], str]:
    """``render(units, tail)``: ``pieces[:units]`` with ``needle(position)`` at the boundary nearest ``depth * units``.

    ``boundaries`` are the sorted indices ``i`` before which the needle may go (0 among them); those up to ``units``
    are used. The first ``tail`` characters of ``pieces[units]`` end the text.
    """

    def render(units: int, tail: int) -> str:
        position = _nearest(boundaries[: bisect.bisect_right(boundaries, units)], depth * units)
        text = "".join(pieces[:position]) + needle(position) + "".join(pieces[position:units])
        return (text + (pieces[units][:tail] if tail else "")).rstrip()

    return render


def _nearest(allowed: Sequence[int], target: float) -> int:
    """The element of the sorted ``allowed`` nearest ``target`` (the lower one on a tie)."""
    index = bisect.bisect_left(allowed, target)
    candidates = allowed[max(index - 1, 0) : index + 1]
    return min(candidates, key=lambda position: (abs(position - target), position))


def _ends_sentence(piece: str, following: str) -> bool:
    """Whether a sentence ends after the word ``piece`` (a paragraph end, or ``.!?`` before a capital)."""
    if piece.endswith("\n\n"):
        return True
    return bool(_SENTENCE_WORD_END.search(piece)) and piece.strip() not in _ABBREVIATIONS and following[:1].isupper()


# ---------------------------------------------------------------------------------------------------------------------
# Sources


@functools.cache
def _prose_docs() -> tuple[tuple[str, ...], ...]:
    """Docstrings of ``PROSE_FILES`` with prose paragraphs, each as its paragraphs (one line each), in file order."""
    docs = []
    for relative in PROSE_FILES:
        for docstring in _docstrings(ast.parse(_stdlib_file(relative).read_text(encoding="utf-8"))):
            paragraphs = _prose_paragraphs(docstring)
            if paragraphs:
                docs.append(tuple(paragraphs))
    return tuple(docs)


def _docstrings(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Docstrings of a module, class or function and of the classes and functions defined in its body, in order."""
    docstring = ast.get_docstring(node, clean=False)
    found = [docstring] if docstring else []
    for child in node.body:
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            found.extend(_docstrings(child))
    return found


def _prose_paragraphs(docstring: str) -> list[str]:
    """The paragraphs of a docstring that read as prose, each joined into one line.

    Kept: no indented line (code, lists, literal blocks), no doctest prompt or rule line, at least 12 words, starts
    with a capital and ends with ``.``, ``!`` or ``?``, at most 3% characters outside letters, digits and common
    punctuation.
    """
    kept = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        text = " ".join(" ".join(line.split()) for line in lines)
        if ">>>" in text or re.search(r"[-=~^*#]{4,}", text) or len(text.split()) < 12:
            continue
        if not text[:1].isupper() or not text.endswith((".", "!", "?")):
            continue
        if len(_NOT_PROSE_CHARS.findall(text)) > 0.03 * len(text):
            continue
        kept.append(text)
    return kept


@functools.cache
def _prose_text() -> str:
    """All of the prose haystack, lowercase."""
    return "\n".join(paragraph for doc in _prose_docs() for paragraph in doc).lower()


@functools.cache
def _code_file(relative: str) -> tuple[list[str], tuple[int, ...]]:
    """Lines of a ``CODE_FILES`` file without its module docstring, and the lines a statement may go before.

    Those (0-based) are the first lines of the file's statements, at every nesting level (a decorated definition
    starts at its first decorator), except a statement that shares its line with another one (``if x: return``,
    ``a = 1; b = 2``): a statement inserted there, indented as that line, keeps the code valid.
    """
    lines = _read_lines(_stdlib_file(relative))
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    tree = ast.parse("".join(lines))
    starts: set[int] = set()

    def visit(body: list[ast.stmt]) -> None:
        for statement in body:
            first = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])]) - 1
            if len(lines[first]) - len(lines[first].lstrip()) == statement.col_offset:
                starts.add(first)
            for _, value in ast.iter_fields(statement):
                if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                    visit(value)
                elif isinstance(value, list) and value and isinstance(value[0], ast.excepthandler | ast.match_case):
                    for clause in value:
                        visit(clause.body)

    visit(tree.body)
    docstring = ast.get_docstring(tree, clean=False) is not None
    cut = range(tree.body[0].lineno - 1, tree.body[0].end_lineno) if docstring else range(0)
    kept = [index for index in range(len(lines)) if index not in cut]
    return [lines[index] for index in kept], tuple(i for i, index in enumerate(kept) if index in starts)


@functools.cache
def _code_text() -> str:
    """All of the code haystack, lowercase."""
    return "".join("".join(_code_file(relative)[0]) for relative in CODE_FILES).lower()


def _stdlib_file(relative: str) -> Path:
    path = stdlib_root() / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"the real-text tasks read {relative} of Python's standard library, which {stdlib_root()} lacks; they are "
            "pinned to CPython 3.11"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Keys and values


@functools.cache
def _nouns() -> list[str]:
    """Sorted single lowercase nouns (the word lists of RULER-lite's tasks)."""
    from xkv.evaluation.tasks.haystacks import _word_pool  # here: the tasks package imports this module

    return [word for word in _word_pool("noun") if word.isalpha()]


def _prose_value(rng: random.Random, kind: str) -> str:
    """A ``prose_needle`` value: 6 digits, three hyphenated nouns, or three groups of 4 uppercase hex digits."""
    if kind == "digits":
        return str(rng.randint(100_000, 999_999))
    if kind == "words":
        return "-".join(rng.sample(_nouns(), 3))
    digits = f"{rng.getrandbits(48):012X}"
    return "-".join(digits[i : i + 4] for i in range(0, 12, 4))


def _code_value(rng: random.Random, kind: str) -> str:
    """A ``code_passkey`` value: an 8-digit integer or 12 lowercase hex digits."""
    return str(rng.randint(10_000_000, 99_999_999)) if kind == "digits" else f"{rng.getrandbits(48):012x}"


def _draw_absent(draw: Callable[[], str], text: str) -> str:
    """A value from ``draw`` that does not occur in the lowercase ``text`` (so the context holds it once)."""
    while True:
        value = draw()
        if value.lower() not in text:
            return value


def _unique_uuid(rng: random.Random, used: set[str]) -> str:
    while True:
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in used:
            used.add(value)
            return value
