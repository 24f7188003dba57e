"""The command line (``csgd_cli.runner.cli``): what it does before Hydra starts."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}


def test_help_and_a_bad_override_do_not_import_torch() -> None:
    code = (
        "import sys, csgd_cli.runner.cli as c\n"
        "for argv in (['--help'], ['train', 'epsilon=-1']):\n"
        "    try:\n"
        "        c.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    assert "epsilon=-1.0 is out of range" in out.stderr


def test_sweep_expansion_is_pinned() -> None:
    """The one private Hydra call csgd makes: if an upgrade changes it, this fails."""
    from csgd_cli.runner.cli import expand_sweep

    points = expand_sweep(["epsilon=0.001,0.01", "seed=0,1", "model=resnet20"])
    assert points == [
        ["epsilon=0.001", "seed=0", "model=resnet20"],
        ["epsilon=0.001", "seed=1", "model=resnet20"],
        ["epsilon=0.01", "seed=0", "model=resnet20"],
        ["epsilon=0.01", "seed=1", "model=resnet20"],
    ]
