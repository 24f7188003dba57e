"""The house: the subpackages of ``csgd_cli`` are its floors (docs/ARCHITECTURE.md).

A module imports only from its own subpackage or from a lower floor (imports inside
functions included), no import circle among the modules of a subpackage, no module over
~350 lines, and the top of the package stays small enough to read."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "csgd_cli"
# docs/ARCHITECTURE.md draws this table.
FLOORS: dict[str, int] = {
    "common": 0,  # errors, files, config, seeding, device, model I/O
    "rules": 1,  # channel groups and one rule per layer kind
    "models": 2,  # the registry and zoo
    "tracing": 2,  # finding groups by tracing
    "core": 3,  # clustering, the centripetal optimizer, chi, the merge
    "deploy": 3,  # export, runtimes, the timer
    "targets": 4,  # costs of a width plan, choosing one
    "baselines": 5,  # the field's criteria
    "api": 5,  # CSGD, save, load_model, the checkpoint format
    "runner": 6,  # the CLI
    "__init__": 7,  # lazy public names only
    "__main__": 7,
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imports(path: Path) -> list[tuple[list[str], int]]:
    """(dotted target inside csgd_cli, line) for every import of the package in ``path``."""
    me = _module(path)
    pkg = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = [p for p in (node.module or "").split(".") if p]
                targets = [base + mod] if mod else [[*base, a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "csgd_cli":
                targets = [node.module.split(".")[1:]]
            else:
                continue
            out += [(t, node.lineno) for t in targets if t]
        elif isinstance(node, ast.Import):
            out += [
                (a.name.split(".")[1:], node.lineno)
                for a in node.names
                if a.name.startswith("csgd_cli.")
            ]
    return out


def test_the_top_of_the_package_is_small() -> None:
    entries = {p.stem for p in PKG.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert len(entries) <= 12, sorted(entries)
    assert entries == set(FLOORS), f"unlisted or gone: {entries ^ set(FLOORS)}"


def test_every_module_imports_only_its_own_floor_or_lower() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module(path)[0]
        for target, line in imports(path):
            dep = target[0]
            if dep != me and FLOORS[dep] >= FLOORS[me]:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {'.'.join(target)}")
    assert not bad, "\n".join(bad)


def test_no_import_circle_among_modules() -> None:
    """Inside every subpackage the modules form a DAG (so do the subpackages, by floors)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        me = ".".join(_module(path))
        deps = graph.setdefault(me, set())
        for target, _ in imports(path):
            name = ".".join(target)
            while name and name not in {".".join(_module(p)) for p in PKG.rglob("*.py")}:
                name = name.rpartition(".")[0]  # ``from .x import f``: the module x
            if name and name != me and not me.startswith(name + "."):
                deps.add(name)
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import circle: {e.args[1]}") from None


def test_no_module_is_over_350_lines() -> None:
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert not long, long


def test_stages_import_no_stage() -> None:
    for path in (PKG / "runner" / "stages").glob("*.py"):
        for target, line in imports(path):
            assert target[:2] != ["runner", "stages"] or len(target) == 2, (path, line, target)
