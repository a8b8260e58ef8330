"""Data flows one way (STYLE.md, section 2): no module imports one later in the chain."""

import ast
from pathlib import Path

import pytest

# Top-level modules and subpackages of xkv, in the order data flows. A module may import earlier entries and
# modules of its own subpackage.
ORDER = [
    "compat", "forms", "config", "groups", "factorization", "analysis", "memory", "rope", "decode", "attention",
    "adapters", "prefix", "cache", "models",
    "prompts", "generation", "baselines", "integrations", "evaluation", "bench", "cli",
]  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src" / "xkv"
FILES = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py")


def owner(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_xkv_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xkv."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("xkv."))
    return names


def test_every_module_is_placed():
    owners = {owner(p) for p in FILES} - {"__init__"}
    assert owners <= set(ORDER), f"add {sorted(owners - set(ORDER))} to ORDER"


@pytest.mark.parametrize("path", [p for p in FILES if owner(p) != "__init__"], ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_earlier_modules(path):
    mine = owner(path)
    for name in imported_xkv_modules(path):
        assert name == mine or ORDER.index(name) < ORDER.index(mine), f"{mine} imports {name}, which comes later"


def test_package_import_has_no_side_effects():
    import logging

    import transformers

    before = dict(transformers.AttentionInterface._global_mapping)
    handlers = list(logging.getLogger().handlers)
    import xkv  # noqa: F401

    assert dict(transformers.AttentionInterface._global_mapping) == before
    assert logging.getLogger().handlers == handlers
