"""Data flows one way (STYLE.md, section 2): no module imports one later in the chain."""

import ast
from pathlib import Path

import pytest

ORDER = [
    "compat",
    "config",
    "groups",
    "factorization",
    "memory",
    "rope",
    "adapters",
    "cache",
    "models",
    "prompts",
    "generation",
    "cli",
]
SRC = Path(__file__).resolve().parents[1] / "src" / "xkv"


def imported_xkv_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xkv."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("xkv."))
    return names


def test_every_module_is_placed():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert modules <= set(ORDER), f"add {sorted(modules - set(ORDER))} to ORDER"


@pytest.mark.parametrize("module", ORDER)
def test_imports_only_earlier_modules(module):
    path = SRC / f"{module}.py"
    for name in imported_xkv_modules(path):
        assert ORDER.index(name) < ORDER.index(module), f"{module} imports {name}, which comes later"


def test_package_import_has_no_side_effects():
    import logging

    import transformers

    before = dict(transformers.AttentionInterface._global_mapping)
    handlers = list(logging.getLogger().handlers)
    import xkv  # noqa: F401

    assert dict(transformers.AttentionInterface._global_mapping) == before
    assert logging.getLogger().handlers == handlers
