"""The house: modules import only downward (in-function imports included), no circles,
no module over ~350 lines; and every layer kind the tracer accepts has a rule that the
optimizer's rows and the merge's resize both follow (accepted implies resizable)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from csgd_cli.groups import ChannelGroup, Member
from csgd_cli.layers import (
    KINDS,
    RULES,
    fit_to_state_dict,
    member_kind,
    member_tensors,
    rule_for,
    segment_rows,
)

PKG = Path(__file__).resolve().parents[1] / "csgd_cli"
# The layers of the library (README, "Code map"): a module imports only lower layers.
# ``models`` and ``stages`` are subpackages: each counts as one module.
LAYERS: dict[str, int] = {
    "errors": 0,
    "seeding": 0,
    "files": 1,  # raises errors.disk_full
    "lock": 1,
    "config": 1,
    "distributed": 1,
    "device": 1,
    "deploy": 1,
    "groups": 1,
    "logs": 2,
    "data": 2,
    "runs": 2,
    "layers": 2,
    "latency": 2,
    "datasets": 3,
    "models": 3,
    "trace_walk": 1,  # index maps and the walk along the traced graph
    "trace_graph": 3,  # Torch-Pruning's graph made exact (tracing maps it)
    "trace_ops": 3,  # what a traced op does to the channels
    "report": 3,
    "tracing": 4,
    "metrics": 4,
    "optim": 4,
    "clustering": 4,
    "surgery": 5,
    "criteria": 5,  # the baselines' criteria (Torch-Pruning's importances on csgd's groups)
    "costs": 5,
    "widths": 6,
    "checkpoint": 6,
    "api": 7,
    "session": 7,
    "engine": 8,
    "pipeline": 9,
    "preflight": 10,
    "baselines": 10,  # baselines in csgd run/prune: C-SGD's widths and budget
    "stages": 11,
    "cli": 12,
    "__main__": 13,
    "__init__": 13,  # lazy names only (a module __getattr__), never imported below
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return rel[0]  # a subpackage counts as one unit


def _imports(path: Path) -> list[tuple[str, int]]:
    """(package unit imported, line) for every import of this package in ``path``,
    in functions too."""
    depth = len(path.relative_to(PKG).parts) - 1  # 0: csgd_cli/x.py, 1: csgd_cli/sub/x.py
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the package root
                up = node.level - 1 - depth
                if up > 0:
                    continue  # outside the package
                parts = [p for p in (node.module or "").split(".") if p]
                if node.level - 1 < depth:  # inside the subpackage itself
                    continue
                if not parts:  # ``from . import x`` at the package root
                    out += [(a.name, node.lineno) for a in node.names]
                else:
                    out.append((parts[0], node.lineno))
            elif node.module and node.module.split(".")[0] == "csgd_cli":
                parts = node.module.split(".")
                out.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "csgd_cli" and len(parts) > 1:
                    out.append((parts[1], node.lineno))
    return out


def test_every_module_imports_only_lower_layers() -> None:
    units = {_unit(p) for p in PKG.rglob("*.py")}
    assert units == set(LAYERS), f"unlisted or gone: {units ^ set(LAYERS)}"
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _unit(path)
        for dep, line in _imports(path):
            if dep == me:
                continue
            if LAYERS[dep] >= LAYERS[me]:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {dep} (layer {LAYERS[dep]})")
    assert not bad, "\n".join(bad)


def test_no_module_is_over_350_lines() -> None:
    long = {p.name: n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long


def test_stages_import_no_stage() -> None:
    for path in (PKG / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module is None or node.module == "", (path, node.module)


# -- one rule per layer kind -----------------------------------------------------------
class SubBN(nn.BatchNorm2d):
    """A BatchNorm subclass (timm's BatchNormAct2d, frozen or sync BN are the same)."""


def _zoo() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """One module of every kind csgd knows, and an input shape for it (channels 6)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    img = (2, 6, 5, 5)
    return [
        (nn.Conv2d(6, 4, 3, padding=1), img),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True), img),  # depthwise
        (nn.Conv1d(6, 4, 3), (2, 6, 7)),
        (nn.Conv3d(6, 4, 1), (2, 6, 3, 3, 3)),
        (nn.Linear(6, 4), (2, 6)),
        (nn.BatchNorm2d(6), img),
        (nn.BatchNorm1d(6), (2, 6)),
        (SubBN(6), img),
        (nn.SyncBatchNorm(6), img),
        (FrozenBatchNorm2d(6), img),
        (nn.InstanceNorm2d(6, affine=True), img),
        (nn.GroupNorm(6, 6), img),
        (nn.PReLU(6), img),
        *_timm_zoo(img),
    ]


def _timm_zoo(img: tuple[int, ...]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """timm's layer kinds (timm is an optional extra; the dev extra installs it)."""
    try:
        from timm.layers import (
            BatchNormAct2d,
            FrozenBatchNormAct2d,
            GroupNormAct,
            ScaledStdConv2d,
            StdConv2d,
            SyncBatchNormAct,
        )
        from timm.layers.linear import Linear
    except ImportError:
        return []
    return [
        (BatchNormAct2d(6, act_layer=nn.SiLU), img),
        (SyncBatchNormAct(6), img),
        (FrozenBatchNormAct2d(6), img),
        (GroupNormAct(6, 6), img),  # a GroupNorm subclass: the groupnorm rule
        (ScaledStdConv2d(6, 4, 3, padding=1), img),  # input side excluded: see below
        (StdConv2d(6, 6, 3, padding=1, groups=6), img),  # depthwise: per channel
        (Linear(6, 4), (2, 6)),
    ]


def _shrunk(m: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The module's state dict with the last channel of every tensor its member of
    ``kind`` touches removed (what a merge of two channels leaves)."""
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    for name, dim, _ in member_tensors(m, kind):
        sd[name] = sd[name].narrow(dim, 0, sd[name].shape[dim] - 1)
    return sd


@pytest.mark.parametrize("idx", range(len(_zoo())))
def test_every_accepted_kind_has_tensors_rows_and_a_resize(idx: int) -> None:
    """For each kind the rule accepts, its tensors shrink by one channel and the fresh
    module is resized to them by the same rule, and still runs (accepted => resizable)."""
    m, shape = _zoo()[idx]
    rule = rule_for(m)
    assert rule is not None, type(m)
    kinds = {member_kind(m, out) for out in (True, False)} & set(KINDS)
    assert kinds, f"{type(m).__name__}: the rule accepts no kind"
    for kind in kinds:
        sd = _shrunk(m, kind)
        fresh = fit_to_state_dict(copy.deepcopy(m), sd)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
        x = torch.randn(*shape)
        if kind in ("in", "channel"):  # it reads one channel fewer
            x = x.narrow(1, 0, x.shape[1] - 1)
        fresh.eval()(x)
        if kind != "in":  # centripetal rows: one per channel, as the optimizer takes them
            g = ChannelGroup("g", 5, [Member("m", kind)])
            wrapper = nn.Module()
            wrapper.m = fresh
            blocks = segment_rows(wrapper, ChannelGroup("g", 5, g.members), ("kernel", "affine"))
            assert all(r.n == 5 for _, _, rs in blocks for r in rs)


def test_the_rule_table_covers_its_zoo_and_refuses_what_it_cannot_merge() -> None:
    pytest.importorskip("timm")  # the table has rules for timm's layers
    assert {rule_for(m).name for m, _ in _zoo()} == {r.name for r in RULES}  # type: ignore[union-attr]
    assert member_kind(nn.Conv2d(4, 8, 3, groups=2), False, "c") == (
        "input of grouped conv 'c' (groups=2)"
    )
    assert member_kind(nn.GroupNorm(2, 8), True, "gn") == (
        "GroupNorm 'gn' has no per-channel merge rule"
    )
    assert (
        member_kind(nn.LayerNorm(8), True, "ln") == "LayerNorm 'ln' has no per-channel merge rule"
    )
    assert member_kind(nn.PReLU(), True, "a") == "PReLU 'a' has one slope for every channel"
    with pytest.raises(Exception, match="cannot be a 'in' member"):
        member_tensors(nn.BatchNorm2d(4), "in")
