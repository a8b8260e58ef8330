"""Data flows one way (STYLE.md, section 2): no module imports one later in the chain."""

import ast
from pathlib import Path

import pytest

# Top-level modules and subpackages of xkv, in the order data flows. A module may import earlier entries and
# modules of its own subpackage.
ORDER = [
    "compat", "forms", "config", "budget", "groups", "factorization", "analysis", "memory", "positions", "decode",
    "attention", "adapters", "prefix", "cache", "models",
    "prompts", "generation", "calibration", "baselines", "integrations", "evaluation", "bench", "cli",
]  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src" / "xkv"
FILES = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")


def owner(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else path.stem


def _package_of(path: Path) -> list[str]:
    """``["xkv", ...]``: the package a source file belongs to."""
    return ["xkv", *path.relative_to(SRC).parts[:-1]]


def imported_xkv_modules(path: Path, source: str | None = None) -> set[str]:
    """The top-level xkv modules a file imports, in every form: ``import xkv.x``, ``from xkv.x import y``,
    ``from xkv import x`` and relative imports. ``"xkv"`` stands for the package itself (``import xkv`` or
    ``from xkv import SomeName``), which imports the modules its ``__init__`` re-exports."""
    names = set()
    top_level = {owner(p) for p in FILES} - {"__init__"}
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
                module = [*base, *(node.module.split(".") if node.module else [])]
            else:
                module = (node.module or "").split(".")
            if module[0] != "xkv":
                continue
            if len(module) > 1:
                names.add(module[1])
            else:  # `from xkv import a, b`: submodules count as themselves, anything else is the package
                names.update(a.name if a.name in top_level else "xkv" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "xkv":
                    names.add(parts[1] if len(parts) > 1 else "xkv")
    return names


def test_the_checker_sees_every_import_form():
    cache = SRC / "models.py"  # any flat module: relative imports resolve against xkv
    forms = {
        "import xkv.cli": {"cli"},
        "from xkv.cli import main": {"cli"},
        "from xkv import cli": {"cli"},
        "from xkv import XKVCache": {"xkv"},
        "import xkv": {"xkv"},
        "from .cli import main": {"cli"},
        "from . import cli": {"cli"},
        "def f():\n    from xkv.bench import run_bench": {"bench"},
        "import torch": set(),
    }
    for source, expected in forms.items():
        assert imported_xkv_modules(cache, source) == expected, source
    nested = SRC / "evaluation" / "runner.py"
    assert imported_xkv_modules(nested, "from ..cli import main") == {"cli"}
    assert imported_xkv_modules(nested, "from .tasks import generate") == {"evaluation"}


# Modules of the cache package, in the order data flows inside it (imports only earlier ones; `if TYPE_CHECKING:`
# imports, for annotations only, are exempt).
CACHE_ORDER = ["base", "runtime", "side", "ranks", "decoding", "store", "io", "xkv"]
CACHE = SRC / "cache"


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported_cache_modules(path: Path, source: str | None = None) -> set[str]:
    """The modules of ``xkv.cache`` a file of that package imports at run time (``"__init__"``: the package)."""
    names = set()
    for node in _runtime_nodes(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = (
                ["xkv", "cache", *(node.module or "").split(".")]
                if node.level == 1
                else (node.module or "").split(".")
            )
            module = [m for m in module if m]
            if module[:2] != ["xkv", "cache"]:
                continue
            if len(module) > 2:
                names.add(module[2])
            else:
                names.update(a.name if a.name in CACHE_ORDER else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["xkv", "cache"]:
                    names.add(parts[2] if len(parts) > 2 else "__init__")
    return names


def test_cache_modules_are_placed():
    assert {p.stem for p in CACHE.glob("*.py")} - {"__init__"} == set(CACHE_ORDER)


def check_cache_module(name: str, source: str | None = None) -> None:
    """Fail if ``xkv.cache.<name>`` imports the package or a module of it not earlier in ``CACHE_ORDER``."""
    for imported in imported_cache_modules(CACHE / f"{name}.py", source):
        assert imported != "__init__", f"cache.{name} imports the package xkv.cache (import the module itself)"
        assert CACHE_ORDER.index(imported) < CACHE_ORDER.index(name), f"cache.{name} imports cache.{imported}"


@pytest.mark.parametrize("name", CACHE_ORDER)
def test_cache_modules_import_only_earlier_ones(name):
    check_cache_module(name)


def test_the_cache_checker_fails_on_an_upward_import():
    base = CACHE / "base.py"
    assert imported_cache_modules(base, "from xkv.cache.xkv import XKVCache") == {"xkv"}
    assert imported_cache_modules(base, "from . import store") == {"store"}
    assert imported_cache_modules(base, "from .io import save") == {"io"}
    assert imported_cache_modules(base, "import xkv.cache.side") == {"side"}
    assert imported_cache_modules(base, "def f():\n    from xkv.cache import XKVCache") == {"__init__"}
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xkv.cache.xkv import XKVCache"
    assert imported_cache_modules(base, guarded) == set()
    with pytest.raises(AssertionError, match="imports cache.xkv"):
        check_cache_module("base", "from xkv.cache.xkv import XKVCache")
    with pytest.raises(AssertionError, match="imports the package"):
        check_cache_module("store", "from xkv.cache import XKVCache")
    check_cache_module("xkv", "from xkv.cache.store import XKVGroupStore")


def test_every_module_is_placed():
    owners = {owner(p) for p in FILES} - {"__init__"}
    assert owners <= set(ORDER), f"add {sorted(owners - set(ORDER))} to ORDER"


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    """The xkv modules ``path`` imports (its text, or ``source``) that come later in the chain than its own."""
    mine, later = owner(path), []
    for name in imported_xkv_modules(path, source):
        if name == "xkv":  # the package: it sits where the latest module its __init__ imports sits
            name = max(imported_xkv_modules(SRC / "__init__.py"), key=ORDER.index)
        if name != mine and ORDER.index(name) > ORDER.index(mine):
            later.append(name)
    return later


@pytest.mark.parametrize("path", [p for p in FILES if owner(p) != "__init__"], ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_earlier_modules(path):
    assert not upward_imports(path), f"{owner(path)} imports {upward_imports(path)}, which come later"


# Modules that came from splitting a long one (issue 32, item 8): each is checked like any other, in the room of
# the package it sits in.
SPLIT_MODULES = [
    "cli/__init__.py", "cli/common.py", "cli/demo.py", "cli/documents.py", "cli/evaluate.py", "cli/tune.py",
    "cli/bench.py", "cli/analyze.py", "cli/config.py",
    "evaluation/tasks/__init__.py", "evaluation/tasks/drafting.py", "evaluation/tasks/haystacks.py",
    "evaluation/tasks/needles.py", "evaluation/tasks/tracking.py", "evaluation/tasks/extraction.py",
    "cache/__init__.py", "cache/base.py", "cache/runtime.py", "cache/side.py", "cache/ranks.py", "cache/decoding.py",
    "cache/store.py", "cache/io.py", "cache/xkv.py",
]  # fmt: skip


@pytest.mark.parametrize("name", SPLIT_MODULES)
def test_split_modules_are_checked_and_an_upward_import_fails(name):
    path = SRC / name
    assert path in FILES, f"{name} is not among the files checked"
    assert not upward_imports(path)
    mine = owner(path)
    for room in ORDER[ORDER.index(mine) + 1 :]:  # the module may not import any later room
        assert upward_imports(path, f"from xkv.{room} import x") == [room]
    module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for room in ORDER[: ORDER.index(mine)]:  # and no earlier room may import the module
        assert upward_imports(SRC / f"{room}.py", f"from xkv.{module} import x") == [mine], room


def test_package_import_has_no_side_effects():
    # In a fresh interpreter: in this one other test modules have imported xkv already, so nothing could change.
    import subprocess
    import sys

    script = (
        "import logging, transformers\n"
        "before = dict(transformers.AttentionInterface._global_mapping)\n"
        "masks = dict(transformers.masking_utils.AttentionMaskInterface._global_mapping)\n"
        "handlers = list(logging.getLogger().handlers)\n"
        "import xkv, xkv.cache, xkv.attention\n"
        "assert 'xkv' not in transformers.AttentionInterface._global_mapping\n"
        "assert dict(transformers.AttentionInterface._global_mapping) == before, 'attention registry changed'\n"
        "assert dict(transformers.masking_utils.AttentionMaskInterface._global_mapping) == masks, 'mask registry'\n"
        "assert logging.getLogger().handlers == handlers, 'root logger handlers changed'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
