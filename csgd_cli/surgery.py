"""Merge clustered channels into a physically thinner network, and verify the merge.

Per pruned group, each cluster keeps its first member. Every member of the group is
rebuilt by the handler table of its kind (``groups.MEMBER_TENSORS``): ``out`` and
``channel`` tensors are sliced to the kept channels (kernel, bias, gamma/beta, running
stats); ``in`` tensors get the input slices of a cluster *summed* into the kept one (the
removed channels carried the same feature map, so the thin network computes the same
function). Declared models are rebuilt from their width spec; any other model is a
freshly built base model whose layers are resized to the merged tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clustering import split_k
from .errors import CsgdError
from .groups import MEMBER_TENSORS, ChannelGroup, Clusters, check_clusters, segment_rows
from .metrics import count_macs, count_params
from .models import get_model

Segment = tuple[int, int, list[list[int]]]  # (offset in the dim, width, local clusters)


def _reduce_dim(t: torch.Tensor, dim: int, segments: list[Segment], summed: bool) -> torch.Tensor:
    """Rebuild ``t`` along ``dim``: listed segments are merged by cluster, the rest copied."""
    pieces, pos = [], 0
    for offset, width, clusters in sorted(segments, key=lambda s: s[0]):
        if offset > pos:
            pieces.append(t.narrow(dim, pos, offset - pos))
        for members in clusters:
            idx = torch.tensor([offset + i for i in members], device=t.device)
            sel = t.index_select(dim, idx)
            pieces.append(sel.sum(dim, keepdim=True) if summed else sel.narrow(dim, 0, 1))
        pos = offset + width
    if pos < t.shape[dim]:
        pieces.append(t.narrow(dim, pos, t.shape[dim] - pos))
    return torch.cat(pieces, dim)


def _merge_tensor(t: torch.Tensor, dim: int, segs: list[Segment], repeat: int) -> torch.Tensor:
    if dim == 0:
        return _reduce_dim(t, 0, segs, summed=False)
    # an input dimension: ``repeat`` columns per channel (a flatten of an HxW map)
    shape = t.shape
    w = t.reshape(shape[0], shape[1] // repeat, repeat, *shape[2:])
    w = _reduce_dim(w, 1, segs, summed=True)
    return w.reshape(shape[0], -1, *shape[2:])


def merge_state_dict(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """New widths (one per group, in order) and the thin model's state_dict.

    ``partial``: clusters need not cover every channel; uncovered channels are dropped
    (used by the L1 baseline, where nothing is merged)."""
    if not partial:
        check_clusters(groups, clusters)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    edits: dict[tuple[str, int, int], list[Segment]] = {}  # (key, dim, repeat) -> segments
    widths = []
    for g in groups:
        cl = clusters.get(g.name)
        widths.append(len(cl) if cl else g.width)
        if not cl or (len(cl) == g.width and not partial):
            continue
        if g.excluded is not None:
            raise CsgdError(f"group '{g.name}' cannot be pruned ({g.excluded})", "exclude it")
        for m in g.members:
            first, end = m.span(g.width)
            local = [[i - first for i in c] for c in cl if first <= c[0] < end]
            for name, dim, _role in MEMBER_TENSORS[m.kind](mods[m.module]):
                key = (f"{m.module}.{name}", dim, m.repeat)
                edits.setdefault(key, []).append((m.offset, end - first, local))
    for (key, dim, repeat), segs in edits.items():
        sd[key] = _merge_tensor(sd[key], dim, segs, repeat)
    return widths, sd


# -- rebuilding a thin model: one resize handler per layer kind --------------------------
def _resize_conv(m: nn.Module, sd: dict[str, torch.Tensor], p: str) -> None:
    w = sd[p + "weight"]
    depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
    m.out_channels = w.shape[0]
    m.groups = w.shape[0] if depthwise else m.groups
    m.in_channels = w.shape[1] * m.groups


def _resize_linear(m: nn.Module, sd: dict[str, torch.Tensor], p: str) -> None:
    m.out_features, m.in_features = sd[p + "weight"].shape


def _resize_norm(m: nn.Module, sd: dict[str, torch.Tensor], p: str) -> None:
    key = p + ("weight" if m.affine else "running_mean")
    m.num_features = sd[key].shape[0]


RESIZE = {
    nn.Conv1d: _resize_conv,
    nn.Conv2d: _resize_conv,
    nn.Linear: _resize_linear,
    nn.BatchNorm1d: _resize_norm,
    nn.BatchNorm2d: _resize_norm,
}


def fit_to_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the layers of a freshly built model to the tensors of ``sd`` (a thin
    model's), then load them. Layers of a kind without a resize handler must keep
    their shapes."""
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        own = {k: v for k, v in m.named_parameters(recurse=False)}
        own.update(m.named_buffers(recurse=False))
        changed = [k for k, v in own.items() if p + k in sd and sd[p + k].shape != v.shape]
        if not changed:
            continue
        resize = RESIZE.get(type(m))
        if resize is None:
            raise CsgdError(
                f"layer '{name}' ({type(m).__name__}) changed shape but csgd cannot resize it",
                "exclude its group from pruning",
            )
        resize(m, sd, p)
        for k in changed:
            old = own[k]
            new = torch.empty(sd[p + k].shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                m.register_buffer(k, new)
    model.load_state_dict(sd)
    return model


def merge(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> nn.Module:
    """The thin model: same class with the merged widths (declared models) or the same
    builder with resized layers (traced models), weights loaded."""
    widths, sd = merge_state_dict(model, groups, clusters, partial)
    arch = model.arch
    if hasattr(model, "widths"):
        thin = get_model(arch["name"], **dict(arch["kwargs"], widths=widths))
        thin.load_state_dict(sd)
    else:
        thin = fit_to_state_dict(get_model(arch["name"], **arch["kwargs"]), sd)
        widths_by_name = {g.name: w for g, w in zip(groups, widths, strict=True)}
        thin.arch = {**arch, "group_widths": widths_by_name}  # load_model resizes by it
    p = next(model.parameters())
    thin.to(device=p.device, dtype=p.dtype)
    thin.group_widths = {g.name: w for g, w in zip(groups, widths, strict=True)}
    return thin.train(model.training)


def l1_selection(model: nn.Module, groups: Sequence[ChannelGroup], ks: dict[str, int]) -> Clusters:
    """L1-norm filter pruning (Li et al. 2017): keep the ``k`` channels whose kernels have
    the largest L1 norm, summed over all producers of a (coupled) group (``k`` split over
    producer segments by width); as singleton "clusters" so that
    ``merge(..., partial=True)`` drops the rest."""
    out = {}
    for g in groups:
        if g.name not in ks:
            continue
        keep: list[int] = []
        segs = segment_rows(model, g, ("kernel",))
        ks_seg = split_k(min(ks[g.name], g.width), [(a, b) for a, b, _ in segs])
        for (a, b, blocks), k in zip(segs, ks_seg, strict=True):
            score = sum(
                r.tensor.detach().narrow(0, r.row, b - a).abs().reshape(b - a, -1).sum(1)
                for r in blocks
            )
            keep += [a + int(i) for i in torch.topk(score, k).indices.sort().values]
        out[g.name] = [[i] for i in keep]
    return out


@torch.no_grad()
def merge_checked(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    clusters: Clusters,
    x: torch.Tensor,
    *,
    tolerance: float,
    force: bool = False,
    partial: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Thin model and its check against ``model`` on a batch ``x`` of real data. A merge
    (not ``partial``, i.e. not the L1 baseline) whose logits differ beyond ``tolerance``
    (relative) is refused unless ``force``; nothing is written by this function."""
    model.eval()
    thin = merge(model, groups, clusters, partial=partial).eval()
    a, b = model(x).double(), thin(x).double()
    diff = (a - b).abs().max().item()
    shape = tuple(x.shape[1:])
    rep = {
        "method": "l1" if partial else "csgd",
        "max_abs_logit_diff": diff,
        "relative_logit_diff": diff / max(a.abs().max().item(), 1e-30),
        "top1_agreement": (a.argmax(1) == b.argmax(1)).double().mean().item(),
        "check_samples": int(x.shape[0]),
        "params_before": count_params(model),
        "params_after": count_params(thin),
        "macs_before": count_macs(model, shape),
        "macs_after": count_macs(thin, shape),
        "widths": list(thin.group_widths.values()),
        "group_widths": thin.group_widths,
    }
    rep["flops_reduction"] = 1 - rep["macs_after"] / rep["macs_before"]
    from .distributed import is_main

    if is_main():
        print(
            f"params {rep['params_before']:,} -> {rep['params_after']:,}  "
            f"FLOPs {rep['macs_before'] / 1e6:.2f}M -> {rep['macs_after'] / 1e6:.2f}M MACs "
            f"(-{100 * rep['flops_reduction']:.2f}%)  merge check: max |logit diff| {diff:.3e} "
            f"(relative {rep['relative_logit_diff']:.2e}), top-1 agreement "
            f"{100 * rep['top1_agreement']:.2f}%"
        )
    if not partial and rep["relative_logit_diff"] > tolerance and not force:
        raise CsgdError(
            f"merge check failed: relative logit difference {rep['relative_logit_diff']:.2e} > "
            f"prune.tolerance={tolerance:g} (clusters have not collapsed); nothing written",
            "train longer or with a larger epsilon, or pass prune.force=true",
        )
    return thin, rep


def _export_onnx_if_installed(thin: nn.Module, x: torch.Tensor, path: Path) -> Path | None:
    """``pruned.onnx`` (BN folded, dynamic batch), checked in onnxruntime, when the
    ``deploy`` extra is installed; a note saying how to get it otherwise."""
    import importlib.util
    import logging

    log = logging.getLogger("csgd")
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        log.info('no %s: pip install "csgd[deploy]" to export ONNX', path.name)
        return None
    from .deploy import check_onnx, export_onnx

    export_onnx(thin, x[:2], path)
    log.info("wrote %s (onnxruntime logits within %.1e relative)", path, check_onnx(path, thin, x))
    return path


def export_pt2(thin: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """A standalone ``torch.export`` program (loads with torch.export.load, no csgd)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(thin.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants .pt2
    torch.export.save(ep, str(tmp))
    tmp.replace(path)
    return path


# -- the prune step of a stage: choose clusters, merge, verify, write ---------------------
def prune_for_config(
    cfg: Any, model: nn.Module, ck: dict[str, Any], x: torch.Tensor, ratio: float
) -> tuple[nn.Module, dict[str, Any]]:
    """Merge ``ck``'s clusters (``prune.method=csgd``) or keep the largest-L1 filters at
    the same widths (``l1``), verified on the real batch ``x``."""
    from .checkpoint import base_widths, need_clusters
    from .clustering import target_widths
    from .groups import channel_groups, select_groups

    groups = channel_groups(model)
    l1 = cfg.prune.method == "l1"
    if l1:
        chosen = select_groups(groups, list(cfg.prune.include), list(cfg.prune.exclude))
        ks = target_widths(chosen, ratio, base_widths(model, ck), cfg.prune.round_to)
        clusters = l1_selection(model, chosen, ks)
    else:
        clusters = need_clusters(ck, "ckpt")
    p = cfg.prune
    return merge_checked(
        model, groups, clusters, x, tolerance=p.tolerance, force=p.force, partial=l1
    )


def save_pruned(
    cfg: Any,
    thin: nn.Module,
    ck: dict[str, Any],
    rep: dict[str, Any],
    src: str,
    path: Path,
    x: torch.Tensor,
) -> None:
    """``pruned.pt`` (csgd checkpoint) and, with ``prune.export``, ``pruned.pt2``
    (torch.export) and ``pruned.onnx`` (when onnx is installed) beside it."""
    from .checkpoint import payload, save_checkpoint
    from .distributed import on_main

    info = payload(cfg, thin, ck, pruned_from=src, merge_check=rep, metrics=rep)
    save_checkpoint(path, {**info, "state_dict": thin.state_dict()})
    if cfg.prune.export:
        on_main(export_pt2, thin, x[:2], path.with_suffix(".pt2"))  # then every rank goes on
        on_main(_export_onnx_if_installed, thin, x, path.with_suffix(".onnx"))
