"""The preflight (``csgd_cli.runner.preflight``): what a CLI call checks before a stage
runs, and hands on to it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_DIGITS

from csgd_cli.api import checkpoint
from csgd_cli.runner import cli, datasets


def test_preflight_hands_its_data_and_checkpoint_on(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One CLI call validates once, reads the data set once and the checkpoint once
    (preflight's reads are what the stage uses)."""
    calls = {"digits": 0, "load": 0, "validate": 0}
    real_digits, real_read, real_validate = datasets._load_digits, checkpoint._read, cli.validate

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(datasets, "_load_digits", count("digits", real_digits))
    monkeypatch.setattr(checkpoint, "_read", count("load", real_read))
    monkeypatch.setattr(cli, "validate", count("validate", real_validate))
    monkeypatch.setattr(datasets, "_LOADED", {})
    monkeypatch.setattr(checkpoint, "_CACHE", {})
    ck = tiny_base / "base/last.pt"
    cli.main(["eval", *TINY_DIGITS, f"ckpt={ck}", f"hydra.run.dir={tmp_path / 'ev'}"])
    assert (tmp_path / "ev/eval.json").is_file()
    assert calls == {"digits": 1, "load": 1, "validate": 1}
