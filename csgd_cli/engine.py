"""One training/evaluation loop for every stage: devices, AMP, logging, checkpoints.

Multi-process hooks live in two places only: ``dist_info`` decides which process
writes files and logs; ``build_data(..., rank, world)`` decides how data is sharded.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .errors import CsgdError


class Preempted(CsgdError):
    """SIGTERM arrived: a checkpoint was written; resume with ``resume=true``.

    Exit code 143 (128 + SIGTERM), what schedulers expect from a job ended by SIGTERM;
    the CLI adds the resume command (it knows the run directory)."""

    exit_code = 143


def raise_preempted(*_: Any) -> None:
    """SIGTERM handler outside a training loop: stop at once (every file write is atomic)."""
    raise Preempted(
        "stopped by SIGTERM outside a training loop; every file written so far is complete"
    )


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return dist_info()[0] == 0


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CsgdError(
                "device=cuda but no CUDA device is available", "use device=auto or device=cpu"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (``weights_only``-safe)."""
    _, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "python": list(mt),
        "python_gauss": gauss,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st.get("python_gauss")))
    if "numpy" in st:
        n = st["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def lr_lambda(sched: Any, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up, then multi-step or cosine decay; evaluated per step."""
    total, warm = sched.epochs * steps_per_epoch, sched.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in sched.milestones]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if sched.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return sched.gamma ** sum(step >= m for m in milestones)

    return f


class MetricLog:
    """metrics.jsonl (always) and TensorBoard scalars (when installed), main process only."""

    def __init__(self, out: Path, phase: str, tensorboard: bool = True) -> None:
        self.phase, self.enabled = phase, is_main()
        self.path, self.tb_dir = out / "metrics.jsonl", out / "tb"
        self.tb = self._writer() if self.enabled and tensorboard else None

    def _writer(self, purge_step: int | None = None) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.tb_dir), purge_step=purge_step)
        except ImportError:  # tensorboard is optional
            return None

    def rewind(self, step: int) -> None:
        """On resume: drop this phase's records logged after ``step`` (the checkpoint's),
        which the resumed run logs again."""
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines(keepends=True):
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if rec.get("phase") != self.phase or rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.path)
        if self.tb is not None:
            self.tb.close()
            self.tb = self._writer(purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"phase": self.phase, "time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{self.phase}/{k}", v, step)
                elif isinstance(v, dict):
                    for g, x in v.items():
                        self.tb.add_scalar(f"{self.phase}/{k}/{g}", x, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the whole test split."""
    model.eval()
    loss, correct, n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for x, y in data.test_batches():
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += y.numel()
    return {"acc": 100.0 * correct.item() / max(n, 1), "loss": loss.item() / max(n, 1)}


class Trainer:
    """Trains ``model`` for ``sched.epochs`` epochs with ``optimizer``.

    ``payload`` is merged into every checkpoint (arch, config, clusters ...);
    ``chi_fn`` returns (total, per-group) chi tensors, logged every ``log_every`` steps.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        sched: Any,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        out: Path,
        phase: str,
        payload: dict[str, Any],
        amp: bool = True,
        every_steps: int = 0,
        chi_fn: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.model, self.data, self.sched, self.opt = model, data, sched, optimizer
        self.device, self.out, self.phase, self.payload = device, out, phase, payload
        self.amp = amp and device.type == "cuda"
        self.every_steps, self.chi_fn = every_steps, chi_fn
        self.steps = data.steps_per_epoch()
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(sched, self.steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.channels_last = device.type == "cuda"
        self.log = MetricLog(out, phase)
        self.epoch, self.step_in_epoch, self.best, self.history = 0, 0, -1.0, []
        self._reset_epoch_stats()
        self._stop = False

    def _reset_epoch_stats(self) -> None:
        """Running sums of the current epoch (checkpointed, so a resumed epoch reports
        the same train loss/accuracy as an uninterrupted one)."""
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, #correct) as tensors (no host sync)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.amp):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        self.opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        return loss.detach(), (out.argmax(1) == y).sum()

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            **self.payload,
            "phase": self.phase,
            "state_dict": self.model.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.lr_sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_acc": self.best,
            "epoch_stats": {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen},
            "metrics": self.history[-1] if self.history else {},
            "history": self.history,
        }

    def save(self, name: str) -> Path | None:
        """Write ``name`` atomically; never a diverged (non-finite) state."""
        if not is_main():
            return None
        self._guard_weights()
        return save_checkpoint(self.out / name, self.state())

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue exactly where ``ck`` (a ``last.pt`` of this phase) stopped."""
        self.model.load_state_dict(ck["state_dict"])
        self.opt.load_state_dict(ck["optimizer"])
        self.lr_sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.epoch, self.step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        self.best, self.history = ck.get("best_acc", -1.0), list(ck.get("history", []))
        es = ck.get("epoch_stats")
        if es and self.step_in_epoch:
            self.loss_sum = es["loss_sum"].to(self.device)
            self.correct = es["correct"].to(self.device)
            self.seen = int(es["seen"])
        self.log.rewind(self.epoch * self.steps + self.step_in_epoch)

    # -- the loop ----------------------------------------------------------------------
    def _guard(self, loss: float, chi: float | None) -> None:
        if not math.isfinite(loss) or (chi is not None and not math.isfinite(chi)):
            self._diverged("loss" if not math.isfinite(loss) else "chi")

    def _guard_weights(self) -> None:
        """Refuse to go on (or to checkpoint) once a weight or running stat is inf/NaN."""
        ts = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        if ts and not bool(torch.stack([torch.isfinite(t).all() for t in ts]).all()):
            self._diverged("the weights")

    def _diverged(self, what: str) -> None:
        # C-SGD phases are named train, train_r1, ...; their schedule is `schedule`.
        csgd = self.chi_fn is not None
        lr_key = "schedule.lr" if csgd else f"{self.phase}.lr"
        last = self.out / "last.pt"
        kept = (
            f"the last good checkpoint {last} is kept"
            if last.is_file()
            else "no checkpoint was written"
        )
        raise CsgdError(
            f"training diverged: {what} became non-finite (inf/NaN) in phase {self.phase} at "
            f"epoch {self.epoch} step {self.step_in_epoch}; {kept}",
            f"lower {'epsilon or ' if csgd else ''}{lr_key} (e.g. 10x smaller) and run again",
        )

    def _chi(self) -> tuple[float | None, dict[str, float]]:
        if self.chi_fn is None:
            return None, {}
        total, per = self.chi_fn()
        return total.item(), {k: v.item() for k, v in per.items()}

    def _on_sigterm(self, *_: Any) -> None:
        self._stop = True

    def fit(self) -> dict[str, Any]:
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            return self._fit()
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            self.log.close()

    def _fit(self) -> dict[str, Any]:
        log_every = self.sched.log_every
        for epoch in range(self.epoch, self.sched.epochs):
            self.epoch = epoch
            self.model.train()
            if self.step_in_epoch == 0:
                self._reset_epoch_stats()
            t0 = time.perf_counter()
            bar = tqdm(
                self.data.train_batches(epoch, self.step_in_epoch),
                total=self.steps,
                initial=self.step_in_epoch,
                desc=f"{self.phase} {epoch + 1}/{self.sched.epochs}",
                disable=not is_main() or os.environ.get("CSGD_NO_BAR") == "1",
                leave=False,
                dynamic_ncols=True,
            )
            for x, y in bar:
                loss, c = self.train_step(x, y)
                self.loss_sum += loss * y.numel()
                self.correct += c
                self.seen += y.numel()
                self.step_in_epoch += 1
                gstep = epoch * self.steps + self.step_in_epoch
                if log_every and gstep % log_every == 0:
                    lv = loss.item()
                    chi, per = self._chi()
                    self._guard(lv, chi)
                    lr = self.opt.param_groups[0]["lr"]
                    rec = {"step": gstep, "epoch": epoch, "loss": lv, "lr": lr}
                    acc = 100 * self.correct.item() / self.seen
                    post = {"chi": f"{chi:.2e}"} if chi is not None else {}
                    bar.set_postfix(loss=f"{lv:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.2g}", **post)
                    self.log.write(
                        {**rec, **({"chi": chi, "chi_groups": per} if chi is not None else {})}
                    )
                if self._stop or (self.every_steps and gstep % self.every_steps == 0):
                    self.save("last.pt")
                self._check_preempted()
            bar.close()
            rec = {
                "step": (epoch + 1) * self.steps,
                "epoch": epoch + 1,
                "train_loss": self.loss_sum.item() / max(self.seen, 1),
                "train_acc": 100.0 * self.correct.item() / max(self.seen, 1),
                "lr": self.opt.param_groups[0]["lr"],
                "epoch_time": time.perf_counter() - t0,
            }
            chi, per = self._chi()
            self._guard(rec["train_loss"], chi)
            if chi is not None:
                rec.update(chi=chi, chi_groups=per)
            self.epoch, self.step_in_epoch = epoch + 1, 0
            self._reset_epoch_stats()
            if (epoch + 1) % self.sched.eval_every == 0 or epoch + 1 == self.sched.epochs:
                ev = evaluate(self.model, self.data, self.device, self.amp)
                rec.update(test_acc=ev["acc"], test_loss=ev["loss"])
            self.history.append(rec)
            self.log.write(rec)
            self._print(rec)
            # best_acc is part of last.pt, so update it first. best.pt goes before
            # last.pt: a kill between the two repeats this epoch, which rewrites it.
            if rec.get("test_acc", -1.0) > self.best:
                self.best = rec["test_acc"]
                self.save("best.pt")
            self.save("last.pt")
            self._check_preempted()
        return self.history[-1] if self.history else {}

    def _check_preempted(self) -> None:
        if self._stop:
            raise Preempted(
                f"stopped by SIGTERM in phase {self.phase} at epoch {self.epoch} step "
                f"{self.step_in_epoch}; checkpoint {self.out / 'last.pt'} written"
            )

    def _print(self, rec: dict[str, Any]) -> None:
        if not is_main():
            return
        parts = [
            f"{self.phase} epoch {rec['epoch']}/{self.sched.epochs}",
            f"loss {rec['train_loss']:.4f}",
        ]
        if "test_acc" in rec:
            parts.append(f"test acc {rec['test_acc']:.2f}%")
        if "chi" in rec:
            parts.append(f"chi {rec['chi']:.3e}")
        tqdm.write(" | ".join(parts))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
