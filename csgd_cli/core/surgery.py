"""Merge clustered channels into a physically thinner network, and verify the merge.

Per pruned group, each cluster keeps its first member. Every member of the group is
rebuilt by the rule of its layer kind (``layers.member_tensors``): ``out`` and
``channel`` tensors are sliced to the kept channels (kernel, bias, gamma/beta, running
stats); ``in`` tensors get the input slices of a cluster *summed* into the kept one (the
removed channels carried the same feature map, so the thin network computes the same
function). Declared models are rebuilt from their width spec; any other model (traced,
csgd's or the user's own) is copied and its layers resized by their rules
(``layers.fit_to_state_dict``). Nothing here prints or writes: ``merge_checked``
returns its report.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..common.nets import count_macs, count_params, outputs_of, run_model
from ..models import get_model
from ..rules.attention import heads_merged
from ..rules.groups import ChannelGroup, Clusters, check_clusters
from ..rules.layers import fit_to_state_dict, member_tensors
from .diagnose import cause
from .stats import average_statistics

# (offset, width, local clusters, summed, block): a cluster's entries are summed into the
# kept one (an input, or a query row) or sliced; ``block`` entries per group channel
Segment = tuple[int, int, list[list[int]], bool, int]


def _reduce_dim(t: torch.Tensor, dim: int, segments: list[Segment]) -> torch.Tensor:
    """Rebuild ``t`` along ``dim``: listed segments are merged by cluster, the rest copied."""
    pieces, pos = [], 0
    for offset, width, clusters, add, block in sorted(segments, key=lambda s: s[0]):
        if offset > pos:
            pieces.append(t.narrow(dim, pos, offset - pos))
        for members in clusters:
            parts = [t.narrow(dim, offset + i * block, block) for i in members]
            pieces.append(torch.stack(parts).sum(0) if add else parts[0])
        pos = offset + width * block
    if pos < t.shape[dim]:
        pieces.append(t.narrow(dim, pos, t.shape[dim] - pos))
    return torch.cat(pieces, dim)


def _merge_tensor(t: torch.Tensor, dim: int, segs: list[Segment], repeat: int) -> torch.Tensor:
    if repeat == 1:
        return _reduce_dim(t, dim, segs)
    # an input dimension: ``repeat`` columns per channel (a flatten of an HxW map)
    shape = t.shape
    w = t.reshape(shape[0], shape[1] // repeat, repeat, *shape[2:])
    w = _reduce_dim(w, 1, segs)
    return w.reshape(shape[0], -1, *shape[2:])


def merged_widths(groups: Sequence[ChannelGroup], clusters: Clusters) -> dict[str, int]:
    """Every group's width after the merge: its cluster count, else its own width."""
    return {g.name: len(clusters[g.name]) if clusters.get(g.name) else g.width for g in groups}


def merge_state_dict(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """New widths (one per group, in order) and the thin model's state_dict.

    ``partial``: clusters need not cover every channel; uncovered channels are dropped
    (used by the L1 baseline, where nothing is merged)."""
    if not partial:
        check_clusters(groups, clusters)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not partial:  # a cluster keeps its members' mean running statistics
        average_statistics(model, groups, clusters, sd)
    mods = dict(model.named_modules())
    edits: dict[tuple[str, int, int], list[Segment]] = {}  # (key, dim, repeat) -> segments
    widths = list(merged_widths(groups, clusters).values())
    for g in groups:
        cl = clusters.get(g.name)
        if not cl or (len(cl) == g.width and not partial):
            continue
        if g.excluded is not None:
            raise CsgdError(f"group '{g.name}' cannot be pruned ({g.excluded})", "exclude it")
        for m in g.members:
            first, end = m.span(g.width)
            local = [[i - first for i in c] for c in cl if first <= c[0] < end]
            for name, dim, _role in member_tensors(mods[m.module], m.kind):
                key = (f"{m.module}.{name}", dim, m.repeat)
                add = m.summed or m.kind == "in"
                edits.setdefault(key, []).append((m.offset, end - first, local, add, m.block))
    for (key, dim, repeat), segs in edits.items():
        sd[key] = _merge_tensor(sd[key], dim, segs, repeat)
    return widths, sd


def merge(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> nn.Module:
    """The thin model: the same class with the merged widths (declared models), else a
    copy of ``model`` whose layers are resized by their rules; weights loaded, on the
    model's device and dtype, in the model's train/eval mode. A copy's ``arch`` (where
    the model has one) records the widths it was cut to (``group_widths``), as a
    declared model's ``widths`` do: what the network is, not what pruning planned."""
    widths, sd = merge_state_dict(model, groups, clusters, partial)
    by_name = {g.name: w for g, w in zip(groups, widths, strict=True)}
    arch = getattr(model, "arch", None)
    if hasattr(model, "widths") and arch is not None and "kwargs" in arch:  # csgd's zoo
        thin = get_model(arch["name"], **dict(arch["kwargs"], widths=widths))
        thin.load_state_dict(sd)
    else:
        thin = copy.deepcopy(model)
        fit_to_state_dict(thin, sd, by_name)  # widths: an attention's head count
        if arch is not None:  # load_model rebuilds it and resizes by these widths
            thin.arch = {**arch, "group_widths": by_name}
    p = next(model.parameters())
    thin.to(device=p.device, dtype=p.dtype)
    return thin.train(model.training)


@torch.no_grad()
def inner_difference(model: nn.Module, thin: nn.Module, x: Any) -> tuple[float, int]:
    """Largest relative difference, on ``x``, between the outputs of the leaf modules
    (convs, linears, norms: where the arithmetic is) of ``model`` and ``thin`` (same
    names) whose shapes the merge left unchanged, and how many were compared. A
    detector's outputs come after a discrete choice in its forward code (top-k, NMS)
    that a tie can flip on rounding alone; every layer's output must still agree. A
    layer called several times is compared call by call."""
    seen: dict[str, tuple[list, list]] = {}
    hooks = []
    for i, net in enumerate((model, thin)):
        for name, m in net.named_modules():
            if next(m.children(), None) is None:
                calls = seen.setdefault(name, ([], []))[i]
                hook = lambda _m, _a, out, c=calls: c.append(outputs_of(out))  # noqa: E731
                hooks.append(m.register_forward_hook(hook))
    try:
        run_model(model, x), run_model(thin, x)
    finally:
        for h in hooks:
            h.remove()
    worst, n = 0.0, 0
    for calls_a, calls_b in seen.values():
        if len(calls_a) != len(calls_b):
            return float("inf"), n
        for outs_a, outs_b in zip(calls_a, calls_b, strict=True):
            if len(outs_a) != len(outs_b):
                return float("inf"), n
            for a, b in zip(outs_a, outs_b, strict=True):
                if a.shape != b.shape or not a.numel() or not a.is_floating_point():
                    continue  # resized by the merge, or nothing to compare
                d = (a.double() - b.double()).abs().max().item()
                worst, n = max(worst, d / max(a.double().abs().max().item(), 1e-30)), n + 1
    return worst, n


def output_difference(
    outs_a: list[torch.Tensor], outs_b: list[torch.Tensor]
) -> tuple[float, float, float]:
    """Largest absolute and relative difference over every output of two networks, and
    the top-1 agreement of the first output that has classes (logits or a score map)."""
    diff = rel = 0.0
    for a, b in zip(outs_a, outs_b, strict=True):
        if a.shape != b.shape:  # a detector that keeps another number of boxes
            diff = rel = float("inf")
            continue
        if not a.numel():  # no boxes found, by both
            continue
        a, b = a.double(), b.double()
        d = (a - b).abs().max().item()
        diff, rel = max(diff, d), max(rel, d / max(a.abs().max().item(), 1e-30))
    first = next((a for a in outs_a if a.dim() >= 2), outs_a[0])
    other = outs_b[next(i for i, a in enumerate(outs_a) if a is first)]
    same = first.dim() >= 2 and first.numel() and first.shape == other.shape
    agree = (first.argmax(1) == other.argmax(1)).double().mean().item() if same else 1.0
    return diff, rel, agree


@torch.no_grad()
def _after_ties(
    model: nn.Module,
    thin: nn.Module,
    x: Any,
    outs_a: Sequence[torch.Tensor],
    outs_b: Sequence[torch.Tensor],
    tolerance: float,
) -> dict[str, Any]:
    """Integer outputs (labels, indices: a detector's) or another count of them mean a
    discrete choice; then a flipped tie after layers that all agree is no failure: the
    report's additions (``passed`` among them) when every inner output agrees."""
    pairs = zip(outs_a, outs_b, strict=True)
    if not any(not a.is_floating_point() or a.shape != b.shape for a, b in pairs):
        return {}
    was_training = model.training
    try:
        inner, n = inner_difference(model.eval(), thin, x)
    finally:
        model.train(was_training)
    if not n or inner > tolerance:
        return {}
    return dict(inner_relative_diff=inner, inner_outputs=n, outputs_after_ties=True, passed=True)


def merge_checked(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    clusters: Clusters,
    x: Any,
    *,
    tolerance: float,
    force: bool = False,
    partial: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Thin model and its check against ``model`` on ``x`` (a batch of real data: a
    tensor, or a tuple of the forward's arguments). Every output is compared (a tuple or
    dict of tensors too); a merge (not ``partial``, i.e. not a baseline's selection) whose
    outputs differ beyond ``tolerance`` (relative) is refused unless ``force``, or unless
    they differ only after a discrete choice (the network returns integer tensors, e.g.
    a detector's labels, and every layer output the merge left in shape agrees:
    ``inner_difference``). ``passed`` in the report: the check's verdict."""
    was_training, widths = model.training, merged_widths(groups, clusters)
    model.eval()
    try:
        thin = merge(model, groups, clusters, partial=partial).eval()
        outs_a, outs_b = outputs_of(run_model(model, x)), outputs_of(run_model(thin, x))
    finally:
        model.train(was_training)
    diff, rel, agree = output_difference(outs_a, outs_b)
    rep = {
        "method": "l1" if partial else "csgd",
        "max_abs_logit_diff": diff,
        "relative_logit_diff": rel,
        "top1_agreement": agree,
        "outputs": len(outs_a),
        "check_samples": int(outs_a[0].shape[0]) if outs_a[0].dim() else 1,
        "params_before": count_params(model),
        "params_after": count_params(thin),
        "macs_before": count_macs(model, x),
        "macs_after": count_macs(thin, x),
        "widths": list(widths.values()),
        "group_widths": widths,
        "heads_merged": heads_merged(groups, {k: len(v) for k, v in clusters.items()}),
    }
    rep["flops_reduction"] = 1 - rep["macs_after"] / max(rep["macs_before"], 1)
    rep["passed"] = rel <= tolerance
    if not partial and not rep["passed"]:
        rep.update(_after_ties(model, thin, x, outs_a, outs_b, tolerance))
    if not partial and not rep["passed"] and not force:
        why, fix = cause(model, groups, clusters)
        raise CsgdError(
            f"merge check failed: relative output difference {rel:.2e} > "
            f"tolerance {tolerance:g}; {why}; nothing written",
            f"{fix}; or force the merge (csgd prune: prune.force=true; the API: merge(force=True))",
        )
    return thin, rep


def merge_summary(rep: dict[str, Any]) -> str:
    """One line on a merge: params, FLOPs and the check against the trained model."""
    return (
        f"params {rep['params_before']:,} -> {rep['params_after']:,}  "
        f"FLOPs {rep['macs_before'] / 1e6:.2f}M -> {rep['macs_after'] / 1e6:.2f}M MACs "
        f"(-{100 * rep['flops_reduction']:.2f}%)  merge check: max |logit diff| "
        f"{rep['max_abs_logit_diff']:.3e} (relative {rep['relative_logit_diff']:.2e}), "
        f"top-1 agreement {100 * rep['top1_agreement']:.2f}%"
    )
