"""What the CLI imports before a command runs, and the package's import graph.

``moecraft --help`` (and ``<command> --help``, ``--version``) builds the parser from the config dataclasses
only: no torch, transformers or numpy, which take seconds to import. Heavy modules are imported when a
command runs. The import graph of the package has no cycle.
"""

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Third-party packages that building the parser may import: the YAML reader and the version checks.
LIGHT = {"yaml", "packaging"}

# In a fresh interpreter: the new non-stdlib top-level packages imported by each step, as JSON.
_PROBE = """
import contextlib, io, json, sys
before = set(sys.modules)
seen = set(before)
def new_packages():
    new = set(sys.modules) - seen
    seen.update(new)
    # modules with no spec are not imported: cython's runtime registers `cython_runtime`, `_cython_3_x`
    real = {m.split(".")[0] for m in new if getattr(sys.modules[m], "__spec__", None) is not None}
    return sorted(real - set(sys.stdlib_module_names) - {"moecraft"})
from moecraft.cli import build_parser, main
steps = {"build_parser": (build_parser(), new_packages())[1]}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
    steps[" ".join(argv)] = new_packages()
print(json.dumps(steps))
"""


def _commands() -> list[str]:
    from moecraft.cli import build_parser

    return sorted(build_parser()._subparsers._group_actions[0].choices)


def _probe(argvs: list[list[str]]) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_building_the_parser_imports_no_heavy_package():
    steps = _probe([])
    assert set(steps["build_parser"]) <= LIGHT, f"building the parser imports {steps['build_parser']}"


def test_help_and_version_import_no_heavy_package():
    """Each command's ``--help`` (after the parser is built: each step shows what it added)."""
    argvs = [["--help"], ["--version"], *([name, "--help"] for name in _commands())]
    steps = _probe(argvs)
    assert list(steps) == ["build_parser", *(" ".join(a) for a in argvs)]  # every step ran
    heavy = {step: new for step, new in steps.items() if set(new) - LIGHT}
    assert not heavy, f"imported before any command ran: {heavy}"


def test_a_command_that_runs_imports_what_it_needs():
    """The probe sees imports: ``env`` (which reports torch's version) does import torch when run."""
    steps = _probe([["env", "--json"]])
    assert "torch" in steps["env --json"]


# --- lazy re-exports of the packages


@pytest.mark.parametrize("package", ["moecraft", "moecraft.data", "moecraft.pesc", "moecraft.train"])
def test_lazy_exports_resolve_to_their_modules(package):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        if name == "__version__":
            continue
        value = getattr(mod, name)
        (where,) = [importlib.import_module(m) for m, names in mod._EXPORTS.items() if name in names]
        assert value is getattr(where, name), f"{package}.{name}"
        assert name in dir(mod)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        mod.no_such_name  # noqa: B018


def test_pesc_generate_stays_the_function_once_its_module_is_imported():
    import moecraft.pesc
    import moecraft.pesc.generation
    from moecraft.pesc import generate

    assert generate is moecraft.pesc.generation.generate and callable(generate)


def test_old_import_places_of_moved_configs_still_work():
    from moecraft.analysis.analyze import AnalyzeConfig
    from moecraft.analysis.config import AnalyzeConfig as light_analyze
    from moecraft.esft.config import ScoreConfig as light_score
    from moecraft.esft.config import SelectConfig as light_select
    from moecraft.esft.selection import SelectConfig
    from moecraft.esft.stats import ScoreConfig

    assert ScoreConfig is light_score and SelectConfig is light_select and AnalyzeConfig is light_analyze


# --- import graph


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is package) of every module under ``root`` (the ``moecraft`` folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: every ``import`` statement, in functions too (a function-level
    import is an import all the same, and may not be there only to hide a cycle); ``TYPE_CHECKING`` blocks
    left out. Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (unless that package contains the
    importer); ``from pkg import sub`` with ``sub`` a module is an edge to the module."""
    modules = _modules(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                subs = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
                targets |= subs if len(subs) == len(node.names) else {module, *subs}
        edges = set()
        for target in targets:
            while target and target not in modules:  # `import moecraft.x.name` where name is not a module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages above it run too, unless they hold the importer
                step = ".".join(parts[:i])
                if step in modules and step != name and not name.startswith(step + "."):
                    edges.add(step)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph(SRC / "moecraft")
    assert len(graph) > 50 and "moecraft.pesc.config" in graph["moecraft.artifacts"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_a_cycle(tmp_path):
    """The checker itself: a function-level import closing a circle is found, TYPE_CHECKING imports are not."""
    pkg = tmp_path / "moecraft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from moecraft.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import moecraft.a\n")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "c.py").write_text("def g():\n    import moecraft.a\n")
    assert find_cycle(import_graph(pkg)) == ["moecraft.a", "moecraft.sub.b", "moecraft.c", "moecraft.a"]
