"""``csgd <stage> [hydra overrides...]``: dispatch each stage as a Hydra app.

Overrides are composed and validated *before* Hydra starts the job (every point of a
``-m`` sweep too), so bad input fails with one line and exit 2 before any work starts
and before any run directory is created.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..common.config import STAGES, cli_words, register_schema, validate
from ..common.errors import CsgdError, Preempted, disk_full, is_disk_full, raise_preempted
from ..common.files import in_main_thread, set_writes
from . import lock, outcome

_HYDRA_FLAGS = (
    "-h",
    "--help",
    "--hydra-help",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-p",
    "--package",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--version",
    "--resolve",
    "--experimental-rerun",
)


def config_dir() -> Path:
    """conf/ as installed: the repo's conf/ in a checkout, a package copy in a wheel."""
    return Path(str(files("csgd_cli.conf")))


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: csgd <stage> [key=value ...] [-m] [--cfg job] [--help]", "", "stages:"]
    lines += [f"  {s:<{width}}  {d.help}" for s, d in STAGES.items()]
    lines += [
        "",
        "`csgd <stage> --help` shows the stage's config and Hydra options.",
        "Example: csgd run experiment=quickstart",
    ]
    return "\n".join(lines)


def _one_line(e: BaseException, stage: str = "<stage>") -> str:
    """A Hydra/OmegaConf composition error as one line naming the key and the fix."""
    text = str(e)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        group, name = m.groups()
        opts = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        return f"unknown {group} '{name}'; choose {group}=<{'|'.join(opts)}>"
    m = re.search(r"Key '([\w.]+)' is not in struct", text) or re.search(
        r"Could not override '([\w.]+)'", text
    )
    if m:
        return f"unknown key '{m.group(1)}'; check its spelling (`csgd {stage} --cfg job` lists every key)"
    cause = e if getattr(e, "full_key", None) else e.__cause__  # Hydra wraps OmegaConf's error
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        first = str(cause).splitlines()[0]
        return f"{cause.full_key}: {first}; pass a value of the right type"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "full_key" not in ln]
    return " ".join(lines[:2]) + f"; see `csgd {stage} --help`"


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every point of a ``-m`` sweep, as Hydra's basic sweeper
    runs them (``a=1,2 b=x,y`` -> four points, in its order).

    Hydra has no public API for this; its ``BasicSweeper.split_arguments`` is the one
    private call csgd makes, kept here and pinned by ``tests/test_cli.py``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [p for batch in BasicSweeper.split_arguments(parsed, None) for p in batch]


_CHECKED: set[str] = set()  # configs validated (and preflighted) in this process


def _compose_all(stage: str, overrides: list[str], multirun: bool) -> None:
    from hydra import compose, initialize_config_dir

    points = expand_sweep(overrides) if multirun else [overrides]
    cache: dict[Any, Any] = {}  # data sets and checkpoints shared by sweep points
    need = STAGES[stage]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=stage):
        for point in points:
            try:
                cfg = compose(config_name=stage, overrides=point)
            except Exception as e:  # Hydra/OmegaConf composition errors -> one line
                raise CsgdError(_one_line(e, stage)) from e
            validate(cfg)
            from .names import check_names  # after validate: the tables import torch

            check_names(cfg)
            _CHECKED.add(OmegaConf.to_yaml(cfg))
            if need.data or need.weights or need.fresh:
                from .preflight import preflight

                keys = {o.lstrip("+~").split("=")[0] for o in point}
                explicit = keys | {k.split(".")[0] for k in keys}  # prune.x and prune
                if not any(o.lstrip("+~").startswith(("model=", "model.name=")) for o in point):
                    explicit.discard("model")
                preflight(cfg, sorted(explicit), cache)


def _task(stage: str) -> Callable[[DictConfig], Any]:
    """Hydra's task function: one run (or sweep point) of ``stage``."""

    def task(cfg: DictConfig) -> Any:  # a function of this module: Hydra reads its module
        return _run(stage, cfg)

    return task


def _run(stage: str, cfg: DictConfig) -> Any:
    """``stage`` in Hydra's output directory, which it holds (rank 0 for a job). Errors
    end as one line; a sweep point's in its status.json, and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import distributed

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    module = importlib.import_module(f"csgd_cli.runner.stages.{stage}")
    old = signal.signal(signal.SIGTERM, raise_preempted) if in_main_thread() else None
    held = None
    try:
        out = _start(cfg, out, multirun)
        if stage != "report" and distributed.is_main():  # rank 0 holds it for the job
            held = _hold(stage, out)
        result = _stage_main(module, cfg, out)
        distributed.shutdown()
    except Preempted as e:  # exit 143 with the command that continues the run
        outcome.preempted(stage, e, out, multirun)
    except CsgdError as e:
        outcome.failed(stage, e, out, multirun)
        return None
    except Exception as e:
        if not multirun:
            outcome.stop_others(1, f"{type(e).__name__}: {e}")
            if distributed.active():  # leave before the process group can hold us
                traceback.print_exc()
                outcome.leave(1)
            raise
        outcome.point_crashed(stage, e, out)
        return None
    finally:
        if held is not None:
            lock.release(held)
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if multirun and distributed.is_main():
        outcome.status(out, "ok", "")
    return result


def _start(cfg: DictConfig, out: Path, multirun: bool) -> Path:
    """Validate (once per process) and join the job if there is one; the run directory
    (a job's: rank 0's)."""
    from ..common.device import pick_device
    from . import distributed

    if OmegaConf.to_yaml(cfg) not in _CHECKED:  # a launcher's own process
        validate(cfg)
    if not multirun or distributed.rank_world()[1] > 1:  # torchrun, SLURM tasks
        distributed.init(pick_device(cfg.device), cfg.dist)  # every rank: rank 0's dir
        out = distributed.shared_run_dir(out)
    return out


def _stage_main(module: Any, cfg: DictConfig, out: Path) -> Any:
    try:
        return module.main(cfg, out)
    except OSError as e:  # a write no module turned into one line (e.g. Hydra's)
        if not is_disk_full(e):
            raise
        raise disk_full(e.filename or out, e) from e


def _hold(stage: str, run_dir: str | Path) -> lock.Lock:
    """Hold ``run_dir`` for this process (``lock.acquire``); warn when a stale lock of a
    process that is gone was taken over."""
    held = lock.acquire(run_dir, stage)
    if held.took_over and held.count == 1:
        print(f"csgd {stage}: warning: took over {held.path}: {held.took_over}", file=sys.stderr)
    return held


def _hold_early(stage: str, rest: list[str], multirun: bool) -> lock.Lock | None:
    """Hold a run (or sweep) directory named on the command line before Hydra writes
    into it, so that a refused command changes nothing there; ``_task`` holds it again
    (re-entrant). A default directory is a new time stamp: ``_task`` holds that one."""
    if stage == "report" or int(os.environ.get("RANK", "0")) > 0:
        return None
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.split("=", 1)[1].strip("'\"") for a in rest if a.lstrip("+~").startswith(key)]
    if not given or "$" in given[-1]:  # an interpolation: Hydra resolves it
        return None
    return _hold(stage, given[-1])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    # a torchrun job: rank 0 writes every file, the other ranks read them after a barrier
    set_writes(int(os.environ.get("RANK", "0")) == 0)
    try:
        if stage not in STAGES:
            raise CsgdError(f"unknown stage '{stage}'", f"choose one of: {', '.join(STAGES)}")
        register_schema()
        multirun = "-m" in rest or "--multirun" in rest
        if multirun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CsgdError(
                "a sweep (-m) cannot run under torchrun", "start one torchrun job per point"
            )
        if int(os.environ.get("RANK", "0")) > 0:  # only rank 0 writes .hydra/
            rest = [*rest, "hydra.output_subdir=null"]
        early = None
        if not any(a.split("=")[0] in _HYDRA_FLAGS for a in rest):
            overrides = [a for a in rest if not a.startswith("-") and not _is_hydra_key(a)]
            _compose_all(stage, overrides, multirun)
            early = _hold_early(stage, rest, multirun)
    except CsgdError as e:
        print(f"csgd {stage}: error: {cli_words(e)}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    import hydra

    sys.argv = [f"csgd {stage}", *rest]
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `csgd x --help | head` exits quietly
    # Sweep jobs may run in other processes (joblib launcher): they report failures here.
    fail_log = Path(tempfile.gettempdir()) / f"csgd-{os.getpid()}-failed.txt"
    os.environ["CSGD_FAIL_LOG"] = str(fail_log)
    logging.raiseExceptions = False  # a full disk: no logging traceback after the one line
    try:
        hydra.main(config_path=str(config_dir()), config_name=stage, version_base="1.3")(
            _task(stage)
        )()
        failed = fail_log.read_text().split() if fail_log.exists() else []
    finally:
        fail_log.unlink(missing_ok=True)
        if early is not None:
            lock.release(early)
    if failed:
        print(
            f"csgd {stage}: {len(failed)} sweep run(s) failed: {', '.join(failed)}", file=sys.stderr
        )
        raise SystemExit(1)


def _is_hydra_key(arg: str) -> bool:
    key = arg.lstrip("+~").split("=")[0]
    return key.startswith("hydra.") or key.startswith("hydra/") or key == "hydra"
