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


def test_no_function_is_over_60_lines() -> None:
    """Counted from ``def`` to its last line, the docstring left out (a long signature
    of keyword arguments counts: it is what a reader reads)."""
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if ast.get_docstring(node) is not None:
                    doc = node.body[0]
                    n -= doc.end_lineno - doc.lineno + 1  # type: ignore[operator]
                if n > 60:
                    long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these where a reader gains:\n" + "\n".join(sorted(long))


def test_stages_import_no_stage() -> None:
    for path in (PKG / "runner" / "stages").glob("*.py"):
        for target, line in imports(path):
            assert target[:2] != ["runner", "stages"] or len(target) == 2, (path, line, target)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


_WRAPPERS = ("torch.nn.modules.container", "torch.nn.parallel")  # hold layers, are none


def _torch_layer_classes(path: Path) -> list[tuple[str, int]]:
    """(class, line) of every ``isinstance``/``issubclass``/``type(x) is`` in ``path`` against a torch.nn
    layer class (an ``nn.Module`` subclass; ``nn.Module`` itself, containers, DDP and
    ``nn.Parameter`` are no layers)."""
    import importlib

    import torch.nn

    tree = ast.parse(path.read_text())
    alias = {}  # local name -> dotted path, from the module's imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name.split(".")[0]: a.name for a in node.names if a.asname})
            alias.update({a.name.split(".")[0]: a.name.split(".")[0] for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            alias.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found, tested = [], []  # tested: (class expression, line)
    for node in ast.walk(tree):
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        if is_call and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
            arg = node.args[1]
            tested += [
                (c, node.lineno) for c in (arg.elts if isinstance(arg, ast.Tuple) else [arg])
            ]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Call):
            f = node.left.func  # type(m) is nn.X, type(m) == nn.X
            if isinstance(f, ast.Name) and f.id == "type":
                tested += [(c, node.lineno) for c in node.comparators]
    for cls, lineno in tested:
        name = _dotted(cls)
        head, _, rest = (name or "").partition(".")
        full = ".".join(p for p in (alias.get(head, head), rest) if p)
        if not full.startswith("torch.nn."):
            continue
        obj: object = importlib.import_module("torch")
        for part in full.split(".")[1:]:
            obj = getattr(obj, part, None)
        layer = isinstance(obj, type) and issubclass(obj, torch.nn.Module)
        wrapper = obj is torch.nn.Module or obj.__module__.startswith(_WRAPPERS)  # type: ignore[union-attr]
        if layer and not wrapper:
            found.append((full, lineno))
    return found


def test_only_rules_and_models_test_torch_layer_classes() -> None:
    """Every fact about a layer kind comes from its rule (``rules/``); a new layer kind
    is one rule plus its test (``models/`` builds networks and may know their layers)."""
    bad = [
        f"{p.relative_to(PKG)}:{line} isinstance of {cls}"
        for p in sorted(PKG.rglob("*.py"))
        if _module(p)[0] not in ("rules", "models")
        for cls, line in _torch_layer_classes(p)
    ]
    assert not bad, "ask the layer's rule (rules/queries.py) instead:\n" + "\n".join(bad)
