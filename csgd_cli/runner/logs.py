"""A phase's metric log: metrics.jsonl (always) and TensorBoard scalars (when installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..common.files import append_line, atomic_write, read_jsonl
from .distributed import is_main


class MetricLog:
    """metrics.jsonl and TensorBoard scalars of one phase, main process only."""

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
            keep = [
                json.dumps(r) + "\n"
                for r in read_jsonl(self.path)
                if r.get("phase") != self.phase or r.get("step", 0) <= step
            ]
            atomic_write(self.path, "".join(keep))
        if self.tb is not None:
            self.tb.close()
            self.tb = self._writer(purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"phase": self.phase, "time": round(time.time(), 3), **record}
        append_line(self.path, json.dumps(record))  # a full disk: one line, no partial record
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
