"""C-SGD in a real transformers Trainer (CPU, its own AdamW and schedule) on a small BERT
classifier built from a config: the FFN units prune, the merge is exact, chi is logged,
a resumed run takes its clusters from the checkpoint, under DDP (torchrun, 2 CPU
processes) both ranks take rank 0's clusters and agree (a missing transformers:
``test_callbacks``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tf = pytest.importorskip("transformers")
from csgd_cli.huggingface import CSGDCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
KW = {"ratio": 0.5, "epsilon": 30.0, "norm_epsilon": 30.0, "include": ["*intermediate.dense"]}


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return tf.BertForSequenceClassification(cfg)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)
        self.y = (self.ids[:, 0] > 25).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.y[i]}  # fmt: skip


def example() -> dict[str, torch.Tensor]:
    ids = Pairs(4).ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def args(out: Path, steps: int, **kw) -> tf.TrainingArguments:
    return tf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-2,
        weight_decay=0.01, lr_scheduler_type="constant", logging_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, **kw,
    )  # fmt: skip


def test_trainer_prunes_ffn_units_exactly(tmp_path: Path) -> None:
    model, cb = bert(), CSGDCallback(example_input=example(), **KW)
    trainer = tf.Trainer(model=model, args=args(tmp_path, 40, save_strategy="no"),
                         train_dataset=Pairs(), callbacks=[cb])  # fmt: skip
    trainer.train()
    assert set(cb.pruner.widths) == {f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)}
    thin = cb.merge(tolerance=1e-5)
    assert cb.pruner.merge_report["top1_agreement"] == 1.0
    assert thin.bert.encoder.layer[0].intermediate.dense.out_features == 16
    assert thin.bert.encoder.layer[1].output.dense.in_features == 16
    logged = [h for h in trainer.state.log_history if "csgd/chi_relative" in h]
    assert len(logged) >= 10 and logged[-1]["csgd/chi_relative"] < 1e-8
    assert any("csgd/steps_to_merge" in h for h in logged)


def test_resume_takes_the_clusters_of_the_checkpoint(tmp_path: Path) -> None:
    one = bert()
    tf.Trainer(model=one, args=args(tmp_path / "one", 12, save_strategy="no"),
               train_dataset=Pairs(), callbacks=[CSGDCallback(example(), **KW)]).train()  # fmt: skip
    first = CSGDCallback(example(), **KW)
    tf.Trainer(model=bert(), args=args(tmp_path / "a", 6, save_strategy="steps", save_steps=6),
               train_dataset=Pairs(), callbacks=[first]).train()  # fmt: skip
    again, cb = bert(), CSGDCallback(example(), **{**KW, "seed": 7})  # other k-means seed
    tf.Trainer(model=again, args=args(tmp_path / "a", 12, save_strategy="no"),
               train_dataset=Pairs(), callbacks=[cb]).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))  # fmt: skip
    assert cb.pruner.clusters == first.pruner.clusters
    for (k, a), b in zip(one.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_example_inputs_may_be_a_dict_or_a_tuple() -> None:
    """A FLOPs target over keyword inputs, a ratio over positional ones."""
    import csgd_cli as csgd

    x, ffn = example(), ["*intermediate.dense"]
    p = csgd.CSGD(bert(), x, target="flops:0.9", include=ffn)
    assert p.target_report["met"] and p.target_report["ratio"] <= 0.9
    q = csgd.CSGD(bert(), (x["input_ids"], x["attention_mask"]), ratio=0.5, include=ffn)
    assert set(q.widths.values()) == {16}


def test_trainer_under_ddp_on_two_processes(tmp_path: Path) -> None:
    """The Trainer's own DDP (torchrun, gloo, 2 CPU processes), each rank with another
    k-means seed: rank 0's clusters on both ranks, the same weights after training, an
    exact merge to the same thin network."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "hf_ddp.py"), str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["world_size"] == 2 and r0["clusters"] == r1["clusters"]
    for k, v in r0["state"].items():
        torch.testing.assert_close(v, r1["state"][k], rtol=0, atol=0, msg=k)
    for k, v in r0["thin"].items():
        torch.testing.assert_close(v, r1["thin"][k], rtol=0, atol=0, msg=k)
    assert r0["top1_agreement"] == r1["top1_agreement"] == 1.0
    assert r0["thin"]["bert.encoder.layer.0.intermediate.dense.weight"].shape[0] == 16
    assert r0["chi_relative"][-1] < 1e-8
