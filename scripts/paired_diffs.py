"""C-SGD against each criterion, seed by seed, from a ``csgd report`` report.csv.

    python scripts/paired_diffs.py multirun/compare_fashion_mnist/runs/report.csv

Within a seed every method starts from the same base with the same widths and epochs,
so the per-seed difference (C-SGD minus the criterion, fine-tuned top-1) removes the
spread that the bases share. Printed per target and criterion: the difference on each
seed, its mean and std, and whether it exceeds the spread: the two methods' mean +- std
intervals do not overlap, and every seed's difference has the same sign; and the paired
t-test's two-sided p-value over the seeds (df = seeds - 1: with 3 seeds only a
difference large against its own spread reaches p < 0.05).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from scipy import stats


def paired_p(d: list[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0."""
    if len(d) < 2:
        return float("nan")
    sd = statistics.stdev(d)
    if sd == 0:
        return 0.0 if statistics.mean(d) != 0 else 1.0
    t = statistics.mean(d) / (sd / math.sqrt(len(d)))
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def main(path: Path, key: str = "acc_finetuned") -> None:
    acc: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in csv.DictReader(path.open()):
        if row.get(key) not in (None, "") and row.get("status", "ok") in ("ok", ""):
            acc[row["target"], row["method"]][int(row["seed"])] = float(row[key])
    targets = sorted({t for t, _ in acc}, key=lambda t: -float(t.split(":")[-1]))
    print(
        "| target | criterion | seeds | C-SGD - criterion per seed | mean | std | beyond spread"
        " | paired t p |"
    )
    print("|---|---|--:|---|--:|--:|---|--:|")
    for t in targets:
        cs = acc.get((t, "csgd"), {})
        for (t2, m), by_seed in sorted(acc.items()):
            if t2 != t or m == "csgd":
                continue
            seeds = sorted(set(cs) & set(by_seed))
            if not seeds:
                continue
            d = [cs[s] - by_seed[s] for s in seeds]
            sd = statistics.stdev(d) if len(d) > 1 else float("nan")
            a, b = [cs[s] for s in seeds], [by_seed[s] for s in seeds]
            spread = (statistics.stdev(a) + statistics.stdev(b)) if len(seeds) > 1 else 0.0
            apart = abs(statistics.mean(a) - statistics.mean(b)) > spread
            same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
            verdict = "yes" if apart and same_sign and len(seeds) > 1 else "no"
            per = ", ".join(f"{x:+.2f}" for x in d)
            mean, p = statistics.mean(d), paired_p(d)
            print(
                f"| {t} | {m} | {len(seeds)} | {per} | {mean:+.2f} | {sd:.2f} | {verdict} | {p:.3f} |"
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
