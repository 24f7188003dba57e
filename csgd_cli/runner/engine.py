"""The training loop of every stage: steps, epochs, evaluation, checkpoints, SIGTERM.

Under torchrun (``csgd_cli.runner.distributed``) the same loop runs on every rank: the model
goes under DDP inside ``fit`` (SyncBatchNorm with ``dist.sync_bn``), each rank takes its
part of the global batch (``build_data``), logged losses, epoch sums and ``evaluate``
are reduced over ranks, every rank stops at the same step on SIGTERM, and only rank 0
writes checkpoints and logs (``save`` is collective: every rank calls it). With one
process every reduction is the identity and nothing else changes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..api.checkpoint import RESUME_KEYS, check_format, save_checkpoint
from ..common.device import FlatGradScaler, amp_dtype, compile_for_training, use_channels_last
from ..common.errors import Preempted
from ..common.files import in_main_thread
from ..common.seeding import rng_state, set_rng_state
from ..core.optim import lr_lambda
from . import distributed
from .evaluate import evaluate
from .guards import Guard
from .logs import MetricLog

is_main = distributed.is_main


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
        compile: bool = False,
        channels_last: bool = False,
        half: torch.dtype | None = None,
    ) -> None:
        self.model, self.data, self.sched, self.opt = model, data, sched, optimizer
        self.device, self.out, self.phase, self.payload = device, out, phase, payload
        self.amp = amp and device.type == "cuda"
        self.every_steps, self.chi_fn = every_steps, chi_fn
        # compile: forward/backward under torch.compile; the optimizer step stays eager
        self.forward = compile_for_training(model, device) if compile else model
        self._compile = compile  # fit() compiles the DDP wrapper instead in a job
        self.steps = data.steps_per_epoch()
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(sched, self.steps))
        self.amp_dtype = half or amp_dtype(device)  # half: force bf16 or fp16 (GPU checks)
        self.scaler = FlatGradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.channels_last = use_channels_last(channels_last, device)
        self.log = MetricLog(out, phase)
        self.epoch, self.step_in_epoch, self.best, self.history = 0, 0, -1.0, []
        self._reset_epoch_stats()
        self._stop = False
        # a GPU: inputs checked where the loop syncs
        self.guard = Guard(phase, out, data, self.steps, chi_fn is not None, device.type != "cpu")

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
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.forward(x)
            loss = F.cross_entropy(out, y)
        self.opt.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        return loss.detach(), (out.argmax(1) == y).sum()

    # -- checkpoints -------------------------------------------------------------------
    def state(self, epoch_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        stats = epoch_stats or {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "seen": self.seen,
        }
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
            "epoch_stats": stats,
            "metrics": self.history[-1] if self.history else {},
            "history": self.history,
        }

    def save(self, name: str) -> Path | None:
        """Write ``name`` atomically; never a diverged (non-finite) state. Collective in
        a job: rank 0 writes (with the epoch's sums over every rank), then all go on."""
        self.guard.weights(self.model, self.epoch, self.step_in_epoch)
        stats = None
        if distributed.active():
            loss_sum, correct, seen = self._epoch_sums()
            stats = {
                "loss_sum": torch.tensor(loss_sum, dtype=torch.float32),
                "correct": torch.tensor(int(correct)),
                "seen": int(seen),
            }
        path = save_checkpoint(self.out / name, self.state(stats)) if is_main() else None
        distributed.barrier()
        return path

    def _epoch_sums(self) -> list[float]:
        """The running epoch sums (loss x samples, correct, seen) over every rank."""
        return distributed.all_sum(
            [self.loss_sum.item(), self.correct.item(), self.seen], self.device
        )

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue exactly where ``ck`` (a ``last.pt`` of this phase) stopped."""
        check_format(ck, str(self.out / "last.pt"), RESUME_KEYS)  # an older csgd's: one line
        self.model.load_state_dict(ck["state_dict"])
        self.opt.load_state_dict(ck["optimizer"])
        self.lr_sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.epoch, self.step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        self.best, self.history = ck.get("best_acc", -1.0), list(ck.get("history", []))
        es = ck.get("epoch_stats")
        if es and self.step_in_epoch and is_main():  # rank 0 carries the job's sums
            self.loss_sum = es["loss_sum"].to(self.device)
            self.correct = es["correct"].to(self.device)
            self.seen = int(es["seen"])
        self.log.rewind(self.epoch * self.steps + self.step_in_epoch)

    # -- the loop ----------------------------------------------------------------------
    def _chi(self) -> tuple[float | None, dict[str, float]]:
        if self.chi_fn is None:
            return None, {}
        total, per = self.chi_fn()
        return total.item(), {k: v.item() for k, v in per.items()}

    def _on_sigterm(self, *_: Any) -> None:
        self._stop = True

    def fit(self) -> dict[str, Any]:
        old = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main_thread() else None
        plain = self.forward
        net = distributed.wrap(self.model, self.device)  # DDP in a job, else the model
        if net is not self.model:
            self.forward = compile_for_training(net, self.device) if self._compile else net
        try:
            result = self._fit()
            distributed.sync_buffers(self.model)  # every rank now holds rank 0's model
            return result
        finally:
            self.forward = plain  # drops the DDP wrapper and its gradient hooks
            del net
            distributed.unwrap(self.model)
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
                self.guard.check_input(x, epoch * self.steps + self.step_in_epoch + 1)
                loss, c = self.train_step(x, y)
                self.loss_sum += loss * y.numel()
                self.correct += c
                self.seen += y.numel()
                self.step_in_epoch += 1
                gstep = epoch * self.steps + self.step_in_epoch
                if log_every and gstep % log_every == 0:
                    self._log_step(gstep, loss, bar)
                stop = distributed.any_rank(self._stop, self.device)  # one step for all ranks
                if stop or (self.every_steps and gstep % self.every_steps == 0):
                    self.save("last.pt")
                self._check_preempted(stop)
            bar.close()
            rec = self._end_epoch(epoch, time.perf_counter() - t0)
            self.history.append(rec)
            self.log.write(rec)
            self._print(rec)
            # best_acc is part of last.pt, so update it first. best.pt goes before
            # last.pt: a kill between the two repeats this epoch, which rewrites it.
            if rec.get("test_acc", -1.0) > self.best:
                self.best = rec["test_acc"]
                self.save("best.pt")
            self.save("last.pt")
            self._check_preempted(distributed.any_rank(self._stop, self.device))
        return self.history[-1] if self.history else {}

    def _log_step(self, gstep: int, loss: torch.Tensor, bar: Any) -> None:
        """One step's record (the global batch's loss, the same on every rank; chi) in
        metrics.jsonl and on the bar; stops on a non-finite loss or chi."""
        lv = loss.item()
        if distributed.active():
            lv = distributed.all_sum([lv], self.device)[0] / distributed.rank_world()[1]
        chi, per = self._chi()
        self.guard.loss(lv, chi, self.epoch, self.step_in_epoch)
        lr = self.opt.param_groups[0]["lr"]
        rec = {"step": gstep, "epoch": self.epoch, "loss": lv, "lr": lr}
        acc = 100 * self.correct.item() / self.seen
        post = {"chi": f"{chi:.2e}"} if chi is not None else {}
        bar.set_postfix(loss=f"{lv:.3f}", acc=f"{acc:.1f}", lr=f"{lr:.2g}", **post)
        self.log.write({**rec, **({"chi": chi, "chi_groups": per} if chi is not None else {})})

    def _end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        """The record of finished ``epoch`` (evaluated when due); the counters move on."""
        loss_sum, correct, seen = self._epoch_sums()
        rec = {
            "step": (epoch + 1) * self.steps,
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "lr": self.opt.param_groups[0]["lr"],
            "epoch_time": seconds,
        }
        chi, per = self._chi()
        self.guard.loss(rec["train_loss"], chi, self.epoch, self.step_in_epoch)
        if chi is not None:  # and its forecast (runner.forecasting), when known
            fc = getattr(self.chi_fn, "forecast", None)
            rec.update(chi=chi, chi_groups=per, **(fc(epoch + 1) if fc else {}))
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self._reset_epoch_stats()
        if (epoch + 1) % self.sched.eval_every == 0 or epoch + 1 == self.sched.epochs:
            ev = evaluate(self.model, self.data, self.device, self.amp)
            rec.update(test_acc=ev["acc"], test_loss=ev["loss"])
        return rec

    def _check_preempted(self, stop: bool) -> None:
        if stop:
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
