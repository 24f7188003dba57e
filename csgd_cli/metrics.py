"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import distributed
from .config import target_parts
from .device import amp_dtype
from .files import table
from .groups import ChannelGroup, Clusters, cluster_labels
from .latency import Runtime, ratios
from .layers import segment_rows


@torch.no_grad()
def chi_terms(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, affine: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group: ``chi`` = sum_H sum_i ||K_i - mean_H K||^2, ``norm`` = ||K||^2 and
    ``max`` = the largest member distance to its cluster centre (tensors: no host sync).

    ``K`` holds exactly the rows the optimizer pulls together: every kernel of the
    group's producers and per-channel members (``affine``: also their biases and norm
    gamma/beta, a BN over a concatenation at its offset included; all must match for
    the merge to be exact)."""
    roles = ("kernel", "affine") if affine else ("kernel",)
    out = {}
    for g in groups:
        if g.name not in clusters:
            continue
        chi = norm = mx = None
        for a, b, blocks in segment_rows(model, g, roles):
            n = b - a
            k = torch.cat(
                [r.tensor.detach().narrow(0, r.row, n).reshape(n, -1).double() for r in blocks], 1
            )
            local = [[i - a for i in c] for c in clusters[g.name] if a <= c[0] < b]
            lab = torch.tensor(cluster_labels(local, n), device=k.device)
            size = torch.tensor([len(c) for c in local], device=k.device, dtype=k.dtype)
            mean = torch.zeros(len(local), k.shape[1], device=k.device, dtype=k.dtype)
            mean.index_add_(0, lab, k).div_(size.unsqueeze(1))
            dev = (k - mean.index_select(0, lab)).pow(2).sum(1)
            c, nn_, m = dev.sum(), k.pow(2).sum(), dev.max().sqrt()
            chi, norm = (c, nn_) if chi is None else (chi + c, norm + nn_)
            mx = m if mx is None else torch.maximum(mx, m)
        out[g.name] = {"chi": chi, "norm": norm, "max": mx}
    return out


def chi_report(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, affine: bool = False
) -> dict[str, Any]:
    """Total chi, chi relative to the kernels' squared norm, the largest deviation,
    and the same per group (plain floats, for check.json and logs)."""
    terms = chi_terms(model, groups, clusters, affine)
    per = {
        k: {
            "chi": v["chi"].item(),
            "relative": (v["chi"] / v["norm"]).item(),
            "max_dev": v["max"].item(),
        }
        for k, v in terms.items()
    }
    total = sum(v["chi"] for v in per.values())
    norm = sum(v["norm"].item() for v in terms.values())
    return {
        "chi": total,
        "relative": total / max(norm, 1e-30),
        "max_dev": max((v["max_dev"] for v in per.values()), default=0.0),
        "groups": per,
    }


def chi_fn(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(total, per-group) chi as tensors, for the training loop's logs."""

    def f() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per = {k: v["chi"] for k, v in chi_terms(model, groups, clusters).items()}
        total = torch.stack(list(per.values())).sum() if per else torch.zeros(())
        return total, per

    return f


def chi(model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters) -> torch.Tensor:
    """Total kernel deviation over every clustered group (a 0-d tensor)."""
    terms = chi_terms(model, groups, clusters)
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t["chi"] for t in terms.values()]).sum()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``; a tuple or list ``x`` holds the forward's positional arguments."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def outputs_of(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in outputs_of(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs_of(o)]
    return []


@torch.no_grad()
def count_macs(model: nn.Module, example: Sequence[int] | Any) -> int:
    """Multiply-adds of one forward pass on one sample, by torch's own flop counter.
    ``example``: the input shape of one sample, or an example input (its first sample)."""
    if isinstance(example, (torch.Tensor, tuple, list)) and not all(
        isinstance(v, int) for v in example
    ):
        x = [t[:1] for t in example] if isinstance(example, (tuple, list)) else example[:1]
    else:
        p = next(model.parameters())
        x = torch.zeros(1, *example, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        run_model(model, x)
    model.train(was_training)
    return fc.get_total_flops() // 2


@torch.no_grad()
def latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
) -> dict[str, float]:
    """Median forward time of one batch (ms) and throughput (images/s)."""
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"latency_ms": med * 1e3, "throughput": batch_size / med, "batch_size": batch_size}


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the whole test split.

    Under torchrun each rank evaluates its shard and the sums are reduced, so every
    rank returns the whole split's figures: call it on every rank."""
    model.eval()
    loss, correct, n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    on = amp and device.type == "cuda"
    for x, y in data.test_batches():
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=on):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += y.numel()
    loss_sum, right, n = distributed.all_sum([loss.item(), correct.item(), n], device)
    return {"acc": 100.0 * right / max(n, 1), "loss": loss_sum / max(n, 1)}


def measure(
    model: nn.Module,
    data: Any,
    device: torch.device,
    eval_cfg: Any,
    amp: bool = False,
    backend: str = "eager",
) -> dict[str, Any]:
    """Everything eval.json reports: top-1, loss, params, MACs, latency, throughput."""
    i = data.info
    model.to(device).eval()
    shape = (i.in_channels, i.image_size, i.image_size)
    res: dict[str, Any] = dict(evaluate(model, data, device, amp))
    res.update(params=count_params(model), macs=count_macs(model, shape))
    batch, iters = eval_cfg.latency_batch, eval_cfg.latency_iters
    if backend == "eager":  # on the training device
        res.update(latency(model, shape, batch, device, iters=iters), backend=backend)
    else:  # a deployment runtime (CPU): see csgd_cli.deploy.BACKENDS
        from .deploy import measure_latency

        res.update(measure_latency(model, backend, shape, batch, iters))
    res["device"] = str(device) if backend == "eager" else "cpu"
    return res


def target_rows(
    target: str, base: nn.Module, thin: nn.Module, shape: Sequence[int], rt: Runtime
) -> dict[str, Any]:
    """``target`` (``flops:0.45``) against what ``thin`` reached: multiply-adds and
    parameters counted, latency timed in ``rt`` (base and thin alternating), each with
    its ratio to the base."""
    kind, value = target_parts(target)
    (_, r), base_ms = ratios([base, thin], rt, shape)
    out = {
        "flops": {"base": count_macs(base, shape), "reached": count_macs(thin, shape)},
        "params": {"base": count_params(base), "reached": count_params(thin)},
        "latency": {"base": base_ms, "reached": base_ms * r, "backend": rt.backend,
                    "batch": rt.batch, "threads": rt.nthreads},
    }  # fmt: skip
    for v in out.values():
        v["ratio"] = v["reached"] / v["base"]
    met = out[kind]["ratio"] <= value
    return {"target": target, "kind": kind, "value": value, "met": met, "rows": out}


def summary_table(
    rows: dict[str, dict[str, Any]],
    widths: dict[str, dict[str, int]] | None = None,
    target: dict[str, Any] | None = None,
) -> str:
    """``csgd run``'s closing table: one row per model (base, csgd, pruned, ...); with
    ``widths`` (``before``/``after`` per group) each group whose width changed, and with
    ``target`` (``csgd run prune.target=...``) the target against what was reached."""
    base = rows["base"]["latency_ms"]
    cells = [
        [
            name,
            f"{r['acc']:.2f}",
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}",
            f"{r['latency_ms']:.2f}",
            f"{base / r['latency_ms']:.2f}x",
        ]
        for name, r in rows.items()
    ]
    head = ["model", "top-1 %", "params", "MACs (M)", "latency ms", "speed-up"]
    out = table(head, cells, [False] + [True] * 5)
    if widths:
        out += "\n\n" + widths_table(widths["before"], widths["after"])
    if target:
        out += "\n\n" + target_table(target)
    return out


def widths_table(before: dict[str, int], after: dict[str, int]) -> str:
    """Every group whose width changed: before, after, and the fraction kept."""
    cells = [
        [name, str(w), str(after[name]), f"{after[name] / w:.3f}"]
        for name, w in before.items()
        if name in after and after[name] != w
    ]
    kept = len(before) - len(cells)
    note = f"\n({kept} other groups keep their width)" if kept else ""
    return table(["group", "width before", "after", "kept"], cells, [False] + [True] * 3) + note


def target_table(target: dict[str, Any]) -> str:
    """The target against what was reached: MACs, parameters and latency (measured),
    each base, reached and their ratio; the target's own row says met or MISSED."""
    cells = []
    for kind, r in target["rows"].items():
        ms = kind == "latency"
        goal = ""
        if kind == target["kind"]:
            goal = f"<= {target['value']:g} ({'met' if target['met'] else 'MISSED'})"
        where = f" ({r['backend']}, batch {r['batch']})" if ms else ""
        base, got = (f"{v:.3f} ms" if ms else f"{v:,.0f}" for v in (r["base"], r["reached"]))
        cells.append([kind + where, base, got, f"{r['ratio']:.4f}", goal])
    head = [f"target {target['target']}", "base", "reached", "ratio", "target"]
    return table(head, cells, [False, True, True, True, False])
