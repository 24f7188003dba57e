"""Prune to a target (docs/targets.md): every figure issue 16 asks for.

    python scripts/bench_target.py [--only counts,latency,resnet50,digits] [--out DIR]

1. counts: FLOPs and parameter targets on resnet56, resnet50 (the resnet50_imagenet
   experiment's include globs), mobilenet_v2 and densenet40: reached within 1% below,
   never above (exact counts of the merged network), for both rules, with the time taken.
2. latency: ``csgd run model=resnet56 prune.target=latency:0.5 backend=onnxruntime``
   (synthetic data, no training: only the widths matter for speed), then base.pt and
   pruned.pt timed anew in onnxruntime, alternating, at batch 1 and 64 (must be <= 0.55).
3. resnet50: the time to choose ResNet-50's widths for a latency target in onnxruntime.
4. digits: ResNet-20 on digits at FLOPs target 0.25, 3 seeds, quickstart schedule: the
   distortion rule's widths against uniform widths (same base, same epochs), mean +- std
   (one thread per run; the runs are kept in --out, and a rerun reuses them).

Random weights for 1-3 (no pretrained files offline): counts and latency do not depend
on them; which groups the distortion rule narrows does. Prints the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import csgd_cli as csgd
from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.deploy import latency
from csgd_cli.deploy.latency import Runtime, ratios
from csgd_cli.models import get_model

R50_INCLUDE = ["layer*.conv1", "layer*.conv2"]  # conf/experiment/resnet50_imagenet.yaml
NETS = {  # name -> (input size, include globs, FLOPs target, params target)
    "resnet56": (32, ["*"], 0.45, 0.5),
    "resnet50": (224, R50_INCLUDE, 0.6, 0.6),
    "mobilenet_v2": (224, ["*"], 0.45, 0.5),
    "densenet40": (32, ["*"], 0.45, 0.5),
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)"


def csgd_cli(*args: str, threads: int | None = None) -> None:
    env = dict(os.environ, CSGD_NO_BAR="1")
    if threads:  # tiny nets: one thread each is as fast, and spares a shared machine
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-m", "csgd_cli", *args], env=env, text=True,
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"csgd {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def counts() -> None:
    print("\n## 1. FLOPs and parameter targets (exact counts of the merged network)\n")
    print("| network | groups | target | rule | reached | reached/target | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, (size, include, flops, params) in NETS.items():
        torch.manual_seed(0)
        kw = {"num_classes": 10} if size == 32 else {}
        model = get_model(name, **kw)
        x = torch.randn(1, 3, size, size)
        base = {"flops": count_macs(model, x), "params": count_params(model)}
        for kind, value in (("flops", flops), ("params", params)):
            for rule in ("distortion", "uniform"):
                t = time.perf_counter()
                plan = csgd.plan_widths(model, x, target=f"{kind}:{value}", include=include,
                                        rule=rule)  # fmt: skip
                p = csgd.CSGD(model, x, widths=plan, clustering="even")
                secs = time.perf_counter() - t
                thin = p.merge(force=True)
                got = (count_macs(thin, x) if kind == "flops" else count_params(thin)) / base[kind]
                ok = "ok" if 0.99 * value <= got <= value else "MISSED"
                print(f"| {name} | {len(p.widths)} | {kind}:{value} | {rule} | {got:.5f} | "
                      f"{got / value:.5f} {ok} | {secs:.1f} |", flush=True)  # fmt: skip


def latency_run(out: Path, threads: int | None) -> None:
    print("\n## 2. resnet56, prune.target=latency:0.5 backend=onnxruntime (batch 1)\n")
    nthreads = [f"prune.latency_threads={threads}"] if threads else []
    run = out.resolve() / "r56_latency"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: timings not cached before
    t = time.perf_counter()
    csgd_cli(
        "run", "model=resnet56", "dataset=synthetic", "dataset.num_train=64",
        "dataset.num_test=64", "device=cpu", "pretrain.epochs=0", "schedule.epochs=0",
        "finetune.epochs=0", "prune.force=true", "prune.target=latency:0.5",
        "backend=onnxruntime", "eval.latency_iters=3", f"hydra.run.dir={run}", *nthreads,
    )  # fmt: skip
    print(f"csgd run took {time.perf_counter() - t:.0f} s")
    rep = json.loads((run / "train" / "widths.json").read_text())["target_report"]
    print(f"widths chosen in {rep['seconds']:.0f} s; {rep['layers_timed']} layer timings cached "
          f"in {Path(rep['cache']).relative_to(out.resolve())}; timed while choosing: "
          f"{rep['ratio']:.3f} of the base")  # fmt: skip
    summ = json.loads((run / "summary.json").read_text())["target"]["rows"]["latency"]
    print(f"run summary (base and final timed alternating): {summ['ratio']:.3f}")
    base, thin = csgd.load_model(run / "base.pt"), csgd.load_model(run / "pruned.pt")
    print(f"stage widths: base {base.widths[:3]} -> pruned {thin.widths[:3]}; inner "
          f"{sorted(set(thin.widths[3:]))}")  # fmt: skip
    latency.ROUNDS, latency.NETWORK_S = 9, 0.3  # the independent timing: longer
    for batch in (1, 64):
        (_, r), ms = ratios([base, thin], Runtime("onnxruntime", batch, threads), (3, 32, 32))
        ok = "ok" if r <= 0.55 else "MISSED"
        print(f"independent onnxruntime timing, batch {batch}: base {ms:.2f} ms, pruned "
              f"{ms * r:.2f} ms, ratio {r:.3f} ({ok}: <= 0.55)", flush=True)  # fmt: skip


def resnet50_latency(out: Path, threads: int | None) -> None:
    print("\n## 3. resnet50 (resnet50_imagenet groups), latency:0.7 in onnxruntime, batch 1\n")
    torch.manual_seed(0)
    model = get_model("resnet50")
    x = torch.randn(1, 3, 224, 224)
    shutil.rmtree(out / "r50", ignore_errors=True)  # a cold choice: nothing timed before
    t = time.perf_counter()
    plan = csgd.plan_widths(
        model,
        x,
        target="latency:0.7",
        include=R50_INCLUDE,
        runtime=Runtime("onnxruntime", 1, threads),
        cache_dir=out / "r50",
    )
    p = csgd.CSGD(model, x, widths=plan, clustering="even")
    total = time.perf_counter() - t
    rep = p.target_report
    print(f"width choice: {rep['seconds']:.0f} s ({total:.0f} s with tracing the groups), "
          f"{rep['layers_timed']} layer timings; timed {rep['ratio']:.3f} of the base "
          f"({'under' if rep['seconds'] < 180 else 'OVER'} 3 minutes)")  # fmt: skip


def digits(out: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    print("\n## 4. digits, ResNet-20, prune.target=flops:0.25, quickstart schedule\n")
    acc: dict[str, list[float]] = {"distortion": [], "uniform": []}
    for seed in seeds:
        base = out / f"digits_base{seed}"
        if not (base / "last.pt").is_file():
            csgd_cli("pretrain", "experiment=quickstart", f"seed={seed}", f"hydra.run.dir={base}",
                     threads=1)  # fmt: skip
        for rule in acc:
            run = out / f"digits_{rule}{seed}"
            if not (run / "summary.json").is_file():
                csgd_cli("run", "experiment=quickstart", f"init={base / 'last.pt'}",
                         f"seed={seed}", "prune.target=flops:0.25", f"prune.rule={rule}",
                         "prune.export=false", f"hydra.run.dir={run}", threads=1)  # fmt: skip
            s = json.loads((run / "summary.json").read_text())
            rows, t = s["rows"], s["target"]["rows"]["flops"]
            acc[rule].append(rows["finetuned"]["acc"])
            print(f"seed {seed} {rule:>10}: base {rows['base']['acc']:.2f}%, pruned "
                  f"{rows['pruned']['acc']:.2f}%, fine-tuned {rows['finetuned']['acc']:.2f}%, "
                  f"FLOPs {t['ratio']:.4f}, widths {list(s['widths']['after'].values())}",
                  flush=True)  # fmt: skip
    for rule, a in acc.items():
        print(f"{rule:>10}: {statistics.mean(a):.2f} +- {statistics.stdev(a):.2f} % "
              f"(fine-tuned top-1 over seeds {list(seeds)})")  # fmt: skip
    won = statistics.mean(acc["distortion"]) >= statistics.mean(acc["uniform"])
    print(f"chosen widths reach the uniform mean: {'yes' if won else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="counts,latency,resnet50,digits")
    ap.add_argument("--out", default="outputs/bench_target", type=Path)  # runs kept: reruns reuse
    ap.add_argument("--latency-threads", type=int, default=None, help="default: torch's")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}")
    print(f"latency timed with {a.latency_threads or torch.get_num_threads()} thread(s)")
    t = a.latency_threads
    parts = {"counts": counts, "latency": lambda: latency_run(a.out, t),
             "resnet50": lambda: resnet50_latency(a.out, t), "digits": lambda: digits(a.out)}  # fmt: skip
    for name in a.only.split(","):
        parts[name]()
        print(f"({load()})", flush=True)


if __name__ == "__main__":
    main()
