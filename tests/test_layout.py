"""The package's shape: data flows one way (app -> analysis, merging -> gradients -> kernels), production code
never imports the test oracle, and functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "decomp"
LAYERS = {"kernels": 0, "gradients": 1, "analysis": 2, "merging": 2, "app": 3}
MAX_FUNCTION_LINES = 60
PARSERS = {("app/cli.py", "build_parser")}   # argparse declarations: long, flat and read like a table


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def imported(path: Path) -> list[str]:
    """Absolute dotted names of the decomp modules that `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name == "decomp" or name.startswith("decomp.")]


def layer(dotted: str):
    parts = dotted.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way_and_never_reach_the_oracle(path):
    here = layer("decomp." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    for name in imported(path):
        if path.name == "reference.py" or path == PACKAGE / "__init__.py":
            continue
        assert "reference" not in name.split("."), f"{path.name} imports the test oracle ({name})"
        there = layer(name)
        if here is not None and there is not None and there != here:
            assert there < here, f"{path.relative_to(PACKAGE)} imports {name}: data flows app -> analysis/merging " \
                                 f"-> gradients -> kernels"
        if here == 0:
            assert name.startswith(("decomp.kernels", "decomp._C")) or name == "decomp", \
                f"kernels/ must import nothing else of decomp; {path.name} imports {name}"


def test_no_function_is_longer_than_about_sixty_lines():
    long = []
    for path in modules():
        relative = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (relative, node.name) not in PARSERS:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
