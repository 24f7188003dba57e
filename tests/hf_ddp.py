"""The transformers ``Trainer`` under DDP on two CPU processes (gloo) with
``CSGDCallback``; run by tests/test_huggingface.py under ``torchrun --nproc_per_node=2``.
Each rank writes its clusters, weights and merge check to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csgd_cli.huggingface import CSGDCallback
from test_huggingface import KW, Pairs, args, bert, example

if __name__ == "__main__":
    import transformers as tf

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    # a k-means seed per rank: the clusters agree only because rank 0's are broadcast
    cb = CSGDCallback(example_input=example(), **{**KW, "seed": int(os.environ["RANK"])})
    model = bert()
    trainer = tf.Trainer(model=model, args=args(out, 40, save_strategy="no", ddp_backend="gloo"),
                         train_dataset=Pairs(), callbacks=[cb])  # fmt: skip
    trainer.train()
    rank = dist.get_rank()
    ws = dist.get_world_size()
    thin = cb.merge(tolerance=1e-5)
    rep = cb.pruner.merge_report
    torch.save({"clusters": cb.pruner.clusters, "world_size": ws,
                "state": {k: v.detach() for k, v in model.named_parameters()},
                "thin": {k: v.detach() for k, v in thin.named_parameters()},
                "top1_agreement": rep["top1_agreement"],
                "chi_relative": [h["csgd/chi_relative"] for h in trainer.state.log_history
                                 if "csgd/chi_relative" in h]},
               out / f"rank{rank}.pt")  # fmt: skip
