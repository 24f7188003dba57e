"""What the trainer callbacks share (``api.callbacks``): one constructor for both, the
settings' checks, the chi log's forecast, example inputs moved to a device, and a
missing framework refused in one line naming its extra."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from csgd_cli.api.callbacks import ChiLog, PrunerCallback, Settings, to_device
from csgd_cli.common.errors import CsgdError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("package", "module", "extra"),
    [
        ("lightning", "csgd_cli.lightning", "lightning"),
        ("transformers", "csgd_cli.huggingface", "hf"),
    ],
)
def test_a_missing_framework_is_refused_in_one_line(
    tmp_path: Path, package: str, module: str, extra: str
) -> None:
    shadow = tmp_path / package  # an import of it fails, as when it is not installed
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    code = (
        f"from {module} import CSGDCallback\n"
        "try:\n    CSGDCallback(ratio=0.5)\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines() == [
        f'CsgdError {package} is not installed; install the extra: pip install "csgd[{extra}]"'
    ], out.stderr[-2000:]


@pytest.mark.parametrize("module", ["csgd_cli.api.lightning", "csgd_cli.api.huggingface"])
def test_both_callbacks_take_the_one_shared_constructor(module: str) -> None:
    mod = pytest.importorskip(module)
    assert mod.CSGDCallback.__init__ is PrunerCallback.__init__
    params = inspect.signature(mod.CSGDCallback).parameters
    assert list(params)[:2] == ["example_input", "ratio"] and params["log_chi"].default is True


class Framework(PrunerCallback):
    framework, package = object(), "fake"


def test_the_constructor_keeps_the_pruner_settings_and_refuses_a_negative_pull() -> None:
    cb = Framework(torch.zeros(1, 3), ratio=0.5, include=["a*"], epsilon=2e-3, module="net")
    s = cb.settings
    assert s.kwargs == {
        "ratio": 0.5,
        "target": None,
        "widths": None,
        "include": ["a*"],
        "exclude": (),
        "clustering": "kmeans",
        "seed": 0,
    }
    assert (s.epsilon, s.norm_epsilon, s.module, cb.pruner, cb.log_chi) == (
        2e-3,
        None,
        "net",
        None,
        True,
    )
    with pytest.raises(CsgdError, match="must be >= 0"):
        Framework(ratio=0.5, norm_epsilon=-1.0)
    with pytest.raises(CsgdError, match="fake is not installed"):
        type("Absent", (PrunerCallback,), {"package": "fake"})(ratio=0.5)


def test_settings_prune_the_named_submodule() -> None:
    root = torch.nn.Sequential()
    root.add_module("net", torch.nn.Linear(2, 2))
    s = Settings(None, {}, 0.0, None, "net")
    assert s.target_of(root) is root.net
    assert Settings(None, {}, 0.0, None, None).target_of(root) is root


class FakePruner:
    def __init__(self, rels: list[float]) -> None:
        self.rels = iter(rels)

    def chi_report(self) -> dict[str, Any]:
        rel = next(self.rels)
        return {"chi": 10 * rel, "relative": rel}


def test_the_chi_log_forecasts_the_steps_left_from_the_decay_seen() -> None:
    log, pruner = ChiLog(tolerance=1e-8), FakePruner([1e-2, 1e-3, 2e-3])
    first = log(pruner, 0)  # type: ignore[arg-type]
    assert first == {"csgd/chi": 0.1, "csgd/chi_relative": 1e-2}  # no decay seen yet
    second = log(pruner, 100)  # type: ignore[arg-type]
    # one decade per 100 steps, five decades from 1e-3 to 1e-8 left: 500 steps
    assert math.isclose(second["csgd/steps_to_merge"], 500.0, rel_tol=1e-9)
    assert "csgd/steps_to_merge" not in log(pruner, 200)  # type: ignore[arg-type]  # it rose


def test_example_inputs_of_every_shape_move_to_the_device() -> None:
    x = {"ids": torch.zeros(2, dtype=torch.long), "pair": (torch.ones(1), [torch.ones(1)]), "n": 3}
    out = to_device(x, torch.device("meta"))
    assert out["ids"].is_meta and out["pair"][0].is_meta and out["pair"][1][0].is_meta
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list) and out["n"] == 3
