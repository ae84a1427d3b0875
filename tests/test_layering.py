"""The package's import structure: one stage per folder, imports only downward, no cycles.

The stage order is written once, here (:data:`STAGES`), lowest first, and it is the package's
folders: every folder of ``redrafter_trt/`` belongs to one stage whole, and the few modules at
its root (the foundation, and the contract and the C++ binding of the core) are named one by one;
no module inside a folder is staged apart from its folder. A module belongs to the stage of the
longest name in the list that is it or one of its packages; every module must have one.

An import may go to the module's own stage or a lower one, never higher, wherever it stands: at
the top of a module, inside a function (run later, still a dependency), or under
``if TYPE_CHECKING:`` (an annotation that names another module's class depends on that module as
much as a call does). No set of modules may import each other in a cycle, counting all three
kinds; and no module imports another module's private (``_name``) names. The scan reads the
source with :mod:`ast`, so it runs nothing of the package; the checks are tried on a synthetic
bad package first, so they can fail.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "redrafter_trt"
ROOT = Path(__file__).resolve().parents[1]

#: The stages, lowest first: (stage, names relative to the package: a folder, or a module at the
#: package root; "" is the package's own ``__init__``). Mirrored by CONTRIBUTING.md's stage map.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation: the version, errors, the commands' conventions, memory measurement",
        ("_version", "errors", "cmdline", "memory"),
    ),
    (
        "core: the reference operators, the step contract, the C++ binding",
        ("ops", "contract", "native"),
    ),
    ("models: base model, draft head, model files", ("models",)),
    (
        "formats: checkpoint names and files, FP8, Hugging Face import, sharding, prompt sets; "
        "the shipped heads",
        ("formats", "heads"),
    ),
    ("backends: torch and tensor-parallel backends, slot state, phase timer", ("backends",)),
    ("TensorRT-LLM: network, builder, runtime backend, MPI ranks", ("trtllm",)),
    (
        "runtime: engine directories built and opened, scheduler, generator, adaptive policy",
        ("runtime",),
    ),
    ("applications: benchmark, trainer, server", ("bench", "train", "serve")),
    ("commands", ("cli",)),
    ("the package root", ("",)),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module (dotted, full)
    target: str  # imported module (dotted, full)
    line: int
    names: tuple[str, ...]  # the names a ``from`` import takes from the target


def package_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of ``package``."""
    mods = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (f, is_pkg)
    return mods


def imports_of(module: str, path: Path, is_pkg: bool, modules: dict, package: str) -> list[Import]:
    """The imports of ``module`` that land inside ``package``: ``from X import a`` goes to the
    module ``X.a`` when there is one, else to ``X``."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # every import: top level, in a function, under TYPE_CHECKING
        if isinstance(node, ast.Import):
            out += [
                Import(module, a.name, node.lineno, ())
                for a in node.names
                if a.name == package or a.name.startswith(package + ".")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == package or base.startswith(package + ".")):
                continue
            plain = tuple(a.name for a in node.names if f"{base}.{a.name}" not in modules)
            out += [
                Import(module, f"{base}.{a.name}", node.lineno, ())
                for a in node.names
                if f"{base}.{a.name}" in modules
            ]
            if plain:
                out.append(Import(module, base, node.lineno, plain))
    return out


def import_graph(root: Path, package: str) -> list[Import]:
    modules = package_modules(root, package)
    return [
        imp
        for m, (f, is_pkg) in modules.items()
        for imp in imports_of(m, f, is_pkg, modules, package)
    ]


def stage_of(module: str, package: str, stages=STAGES) -> int | None:
    """Index in ``stages`` of the longest listed prefix of ``module`` (None: not listed)."""
    rel = module[len(package) + 1 :] if module != package else ""
    best, best_len = None, -1
    for i, (_, names) in enumerate(stages):
        for n in names:
            if (n == "" and rel == "") or (n and (rel == n or rel.startswith(n + "."))):
                if len(n) > best_len:
                    best, best_len = i, len(n)
    return best


def unstaged(root: Path, package: str, stages=STAGES) -> list[str]:
    return [m for m in package_modules(root, package) if stage_of(m, package, stages) is None]


def upward_imports(graph: list[Import], package: str, stages=STAGES) -> list[str]:
    bad = []
    for imp in graph:
        src, dst = stage_of(imp.source, package, stages), stage_of(imp.target, package, stages)
        if src is not None and dst is not None and dst > src:
            bad.append(
                f"{imp.source} (line {imp.line}, stage '{stages[src][0]}') imports {imp.target} "
                f"(stage '{stages[dst][0]}')"
            )
    return bad


def cycles(graph: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        edges.setdefault(imp.source, set()).add(imp.target)
        edges.setdefault(imp.target, set())
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def private_imports(graph: list[Import]) -> list[str]:
    return [
        f"{imp.source} (line {imp.line}) imports {n} from {imp.target}"
        for imp in graph
        for n in imp.names
        if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
    ]


# --------------------------------------------------------------------------- the checks, on a bad package
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


BAD_STAGES = (("low", ("low", "util")), ("high", ("high", "peer")), ("root", ("",)))


def test_the_checks_find_a_cycle_an_upward_import_and_a_private_name(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/util.py": "from . import low\n",  # low <-> util: a cycle inside one stage
            "pkg/low.py": """\
            from .util import helper
            def f():
                from .high import g                 # lazy, still an upward import
                return g
            """,
            "pkg/high.py": "def g():\n    return 2\n",
            "pkg/peer.py": "import pkg.high\nfrom .util import _secret\n",
            "pkg/stray.py": "",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.low", "pkg.util"]]
    assert upward_imports(graph, "pkg", BAD_STAGES) == [
        "pkg.low (line 3, stage 'low') imports pkg.high (stage 'high')"
    ]
    assert private_imports(graph) == ["pkg.peer (line 2) imports _secret from pkg.util"]
    assert unstaged(tmp_path, "pkg", BAD_STAGES) == ["pkg.stray"]


def test_the_checks_pass_a_clean_package(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .high import g\n__all__ = ['g']\n",
            "pkg/low.py": "def helper():\n    return 1\n",
            "pkg/util.py": "from .low import helper\n",
            "pkg/high.py": "from . import low, util\nfrom .low import helper as g\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert ("pkg.high", "pkg.low") in {(i.source, i.target) for i in graph}
    assert cycles(graph) == [] and upward_imports(graph, "pkg", BAD_STAGES) == []
    assert private_imports(graph) == [] and unstaged(tmp_path, "pkg", BAD_STAGES) == []


def test_an_import_of_the_package_root_from_below_is_upward(tmp_path):
    _write(
        tmp_path,
        {"pkg/__init__.py": "__version__ = '1'\n", "pkg/low.py": "from . import __version__\n"},
    )
    assert upward_imports(import_graph(tmp_path, "pkg"), "pkg", BAD_STAGES) == [
        "pkg.low (line 1, stage 'low') imports pkg (stage 'root')"
    ]


# --------------------------------------------------------------------------- the checks, on this package
GRAPH = import_graph(ROOT, PACKAGE)


def test_every_module_has_a_stage():
    assert unstaged(ROOT, PACKAGE) == [], "add the module to STAGES in tests/test_layering.py"


def test_no_import_runs_from_a_lower_stage_to_a_higher_one():
    assert upward_imports(GRAPH, PACKAGE) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports(GRAPH) == []


def test_the_scan_sees_the_package():
    # the scan reads real imports (a broken scan that finds nothing would pass the checks above)
    edges = {(i.source, i.target) for i in GRAPH}
    assert ("redrafter_trt.runtime.loader", "redrafter_trt.formats.checkpoint") in edges
    assert ("redrafter_trt.backends.torch_backend", "redrafter_trt.contract") in edges
    assert len(edges) > 150


def test_the_version_is_written_once():
    """pyproject reads the version from ``_version.py`` (no second literal), and the root and the
    CLIs show that one."""
    import tomllib

    import redrafter_trt
    from redrafter_trt import _version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": f"{PACKAGE}._version.__version__"
    }
    assert redrafter_trt.__version__ == _version.__version__
    assert [imp for imp in GRAPH if imp.target == PACKAGE] == []  # nothing imports the root


def test_build_backend_supports_editable_installs():
    """``pip install -e .`` with a pyproject-only project is PEP 660, which setuptools implements
    from version 64 on: the build requirement must not admit an older one."""
    import re

    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    spec = [r for r in requires if re.match(r"setuptools\b", r)]
    assert len(spec) == 1, requires
    m = re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", spec[0].strip())
    assert m and int(m.group(1)) >= 64, (
        f"pyproject.toml build-system requires {spec[0]!r}, need >= 64"
    )


def test_annotation_and_function_level_imports_are_dependencies(tmp_path):
    """An import under ``if TYPE_CHECKING:`` or inside a function is read like one at the top:
    upward it is reported, and it closes a cycle."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:                       # an annotation names a higher module's type
                from .high import g
            def f():
                from .high import h                 # run later, still upward
                return h
            """,
            "pkg/high.py": "from . import peer\ndef g():\n    return 2\n\ndef h():\n    return 3\n",
            "pkg/peer.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:                       # annotation only, yet it closes the loop
                from .high import g
            """,
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert upward_imports(graph, "pkg", BAD_STAGES) == [
        "pkg.low (line 3, stage 'low') imports pkg.high (stage 'high')",
        "pkg.low (line 5, stage 'low') imports pkg.high (stage 'high')",
    ]
    assert cycles(graph) == [["pkg.high", "pkg.peer"]]


def staged_names_inside_folders(root: Path, package: str, stages=STAGES) -> list[str]:
    """Names in ``stages`` that are neither a folder of ``package`` nor a module at its root: a
    module staged apart from its folder, or a name that is not there."""
    pkg = root / package
    return [
        n
        for _, names in stages
        for n in names
        if n and not ((pkg / n / "__init__.py").is_file() or (pkg / f"{n}.py").is_file())
    ]


def test_the_stages_are_the_folders():
    """The map states what the folders show: each stage is whole folders (and root modules), no
    module is staged apart from its folder, and no name is listed twice."""
    names = [n for _, ns in STAGES for n in ns]
    assert len(names) == len(set(names)), names
    assert staged_names_inside_folders(ROOT, PACKAGE) == []
    folders = {p.parent.name for p in (ROOT / PACKAGE).glob("*/__init__.py")}
    assert folders <= set(names), f"folders with no stage: {sorted(folders - set(names))}"


def test_a_module_staged_apart_from_its_folder_is_found(tmp_path):
    _write(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/low.py": "", "pkg/sub/__init__.py": "", "pkg/sub/odd.py": ""},
    )
    stages = (("low", ("low", "sub")), ("high", ("sub.odd", "gone")))
    assert staged_names_inside_folders(tmp_path, "pkg", stages) == ["sub.odd", "gone"]
