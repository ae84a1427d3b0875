"""No function in the package is longer than :data:`MAX_LINES` lines (its ``def`` line to its
last line, nested functions and classes included), so each one does one job a reader can hold.
The scan reads the source with :mod:`ast`; it is tried on a synthetic module first, so it can fail.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "redrafter_trt"
MAX_LINES = 150


def long_functions(source: str, module: str, limit: int = MAX_LINES) -> dict[str, int]:
    """``module:qualified.name`` -> lines of every function in ``source`` longer than ``limit``."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    if n > limit:
                        out[f"{module}:{name}"] = n
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def package_long_functions() -> dict[str, int]:
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        found.update(long_functions(path.read_text(), module))
    return found


def test_the_scan_finds_long_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    src = textwrap.dedent("""\
        def short():
            return 1

        class C:
            def method(self):
        {body}

        def outer():
            def inner():
        {inner}
            return inner
        """).format(body=textwrap.indent(body, "    "), inner=textwrap.indent(body, "        "))
    assert long_functions(src, "m.py", limit=5) == {
        "m.py:C.method": 6,
        "m.py:outer": 8,
        "m.py:outer.inner": 6,
    }
    assert long_functions(src, "m.py", limit=6) == {"m.py:outer": 8}
    assert long_functions(src, "m.py", limit=8) == {}


def test_no_function_is_longer_than_the_limit():
    assert len(list(PACKAGE.rglob("*.py"))) > 50  # the scan reads the package
    over = package_long_functions()
    assert not over, f"functions over {MAX_LINES} lines (split them by job): {over}"
