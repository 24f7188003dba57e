"""How long k-means (``core.kmeans``) takes on every group of real networks, and how good
its clusters are against scikit-learn's (issue 22.9).

    OMP_NUM_THREADS=2 python scripts/bench_clustering.py [--models vgg16,resnet50,...]
        [--timm efficientnet_b0,...] [--ratio 0.625] [--sklearn-limit 2e10]

Per network: the slowest group's wall and CPU seconds, its shape (rows x values, k), the
total, and for that group the inertia of ours and of scikit-learn's KMeans (n_init=3,
k-means++), when n x k x d is under ``--sklearn-limit`` multiply-adds; then the
synthetic 4096 x 25,088 group (a VGG-16 classifier layer: 512x7x7 inputs). Timings, not
assertions: the machine's load changes them (CPU seconds say what the process used).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from csgd_cli.core import kmeans as km
from csgd_cli.core.clustering import num_clusters, segment_features, split_k


def sk_inertia(x: torch.Tensor, k: int) -> float:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(x.double().numpy())
    return km.inertia(x, torch.from_numpy(lab))


def timed(x: torch.Tensor, k: int) -> tuple[float, float, torch.Tensor]:
    t, c = time.perf_counter(), time.process_time()
    lab = km.kmeans(x, k, 0) if k < x.shape[0] else torch.arange(x.shape[0])
    return time.perf_counter() - t, time.process_time() - c, lab


def bench_model(
    name: str, model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace
) -> None:
    from csgd_cli.tracing.trace import channel_groups

    groups = [g for g in channel_groups(model.eval(), x) if g.excluded is None]
    worst, total_wall, total_cpu = None, 0.0, 0.0
    for g in groups:
        k = num_clusters(g.width, args.ratio)
        for f, kk in zip(segment_features(model, g), split_k(k, g.segments()), strict=True):
            wall, cpu, lab = timed(f, kk)
            total_wall, total_cpu = total_wall + wall, total_cpu + cpu
            if worst is None or wall > worst[0]:
                worst = (wall, cpu, g.name, f, kk, lab)
    assert worst is not None
    wall, cpu, gname, f, k, lab = worst
    n, d = f.shape
    ours = km.inertia(f, lab)
    if n * k * d <= args.sklearn_limit and k < n:
        t = time.perf_counter()
        sk = f"{sk_inertia(f, k):.4g} ({time.perf_counter() - t:.1f}s)"
    else:
        sk = "skipped (over --sklearn-limit)"
    print(
        f"{name:24s} {len(groups):3d} groups  total {total_wall:6.2f}s wall {total_cpu:6.2f}s cpu"
        f" | slowest {gname} {n}x{d} k={k}: {wall:.2f}s wall {cpu:.2f}s cpu, "
        f"inertia {ours:.4g}, scikit-learn {sk}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--timm", default="efficientnet_b0,convnext_atto,regnetx_002")
    ap.add_argument("--ratio", type=float, default=0.625)
    ap.add_argument("--size", type=int, default=64, help="example input resolution")
    ap.add_argument("--sklearn-limit", type=float, default=2e10)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    import torchvision

    for name in filter(None, args.models.split(",")):
        bench_model(f"torchvision {name}", getattr(torchvision.models, name)(weights=None), x, args)
    if args.timm:
        import timm

        for name in filter(None, args.timm.split(",")):
            bench_model(f"timm {name}", timm.create_model(name, pretrained=False), x, args)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4096, 25088, generator=g)
    k = num_clusters(4096, args.ratio)
    wall, cpu, lab = timed(big, k)
    print(
        f"synthetic 4096x25088 k={k}: {wall:.2f}s wall {cpu:.2f}s cpu, inertia "
        f"{km.inertia(big, lab):.5g} (scikit-learn: over 6 minutes in k-means++ alone, "
        "issue 22)",
        flush=True,
    )


if __name__ == "__main__":
    main()
