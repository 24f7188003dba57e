"""Every config composes and validates; ranges are refused; configs ship in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from csgd_cli.common.config import STAGES, register_schema, validate
from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.cli import config_dir

ROOT = Path(__file__).resolve().parents[1]
register_schema()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def composed(stage: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=stage):
        return compose(config_name=stage, overrides=overrides)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_composes(stage: str) -> None:
    cfg = composed(stage, [])
    validate(cfg)
    assert cfg.stage == stage


@pytest.mark.parametrize(
    ("group", "name"),
    [(g, n) for g in ("model", "dataset", "experiment") for n in options(g)]
    + [
        (g, n)
        for g in ("schedule", "schedule@pretrain", "schedule@finetune")
        for n in options("schedule")
    ],
)
def test_every_group_option_composes_and_validates(group: str, name: str) -> None:
    cfg = composed("run", [f"{group}={name}"])
    validate(cfg)


def test_public_keys_exist() -> None:
    cfg = composed("train", [])
    for key in ("model", "dataset", "epsilon", "ratio", "seed", "device", "init", "ckpt"):
        assert key in cfg
    for key in ("epochs", "lr"):
        assert key in cfg.schedule
    for key in ("batch_size", "root", "limit"):
        assert key in cfg.dataset


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("epsilon=-1e-3", "epsilon"),
        ("ratio=0", "ratio"),
        ("ratio=1.5", "ratio"),
        ("schedule.epochs=-1", "schedule.epochs"),
        ("device=tpu", "device"),
        ("clustering=spectral", "clustering"),
        ("ratios=[0.5,0.8]", "ratios"),
        ("prune.method=magic", "prune.method"),
        ("backend=tensorrt", "backend"),
    ],
)
def test_ranges_and_names_are_refused(override: str, words: str) -> None:
    from csgd_cli.runner.names import check_names

    cfg = composed("train", [override])
    with pytest.raises(CsgdError, match=words):
        validate(cfg)
        check_names(cfg)


def test_types_are_refused_by_the_schema() -> None:
    with pytest.raises(Exception, match="epsilon"):
        composed("train", ["epsilon=abc"])


def test_experiment_preset_overrides_groups() -> None:
    cfg = composed("run", ["experiment=quickstart"])
    assert (cfg.dataset.name, cfg.model.name) == ("digits", "resnet20")


def test_configs_found_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it into a bare target dir, compose from it there."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next((tmp_path / "dist").glob("csgd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "csgd_cli/conf/config.yaml" in names and "csgd_cli/conf/experiment/quickstart.yaml" in names
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import csgd_cli, csgd_cli.runner.cli as c;"
        "print(csgd_cli.__file__);print(c.config_dir());"
        "c.main(['train','--cfg','job','experiment=quickstart'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    pkg, conf = out.stdout.splitlines()[:2]
    assert pkg.startswith(str(target)) and conf.startswith(str(target))
    assert "name: digits" in out.stdout


def test_every_name_list_comes_from_its_table_and_is_checked_in_one_line() -> None:
    """dataset, clustering, prune.method, prune.rule, backend and format: the config
    accepts what each table holds (``runner.names``), and an unknown name is one line."""
    from omegaconf import OmegaConf

    from csgd_cli.baselines.criteria import CRITERIA
    from csgd_cli.common.errors import CsgdError
    from csgd_cli.deploy.export import BACKENDS
    from csgd_cli.runner.names import accepted, check_names
    from csgd_cli.targets.widths import RULES

    names = accepted()
    assert names["prune.method"] == ("csgd", *CRITERIA)
    assert names["backend"] == tuple(BACKENDS) and names["prune.rule"] == tuple(RULES)
    good = {k: v[0] for k, v in names.items()}
    cfg = OmegaConf.create({})
    for key, value in good.items():
        OmegaConf.update(cfg, key, value)
    check_names(cfg)
    OmegaConf.update(cfg, "backend", "tensorrt")
    with pytest.raises(CsgdError, match=r"unknown backend 'tensorrt'; choose backend=<eager\|"):
        check_names(cfg)


@pytest.mark.parametrize(
    ("preset", "plugin", "key", "want"),
    [
        ("csgd_joblib", "hydra_plugins.hydra_joblib_launcher", "n_jobs", 2),
        ("csgd_slurm", "hydra_plugins.hydra_submitit_launcher", "gpus_per_node", 1),
    ],
)
def test_launcher_presets_extend_the_plugins(preset: str, plugin: str, key: str, want: int) -> None:
    pytest.importorskip(plugin)  # optional extras: csgd[joblib], csgd[slurm]
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.cli import config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    assert cfg.hydra.launcher[key] == want
    assert "_target_" in cfg.hydra.launcher  # the plugin's own config underneath


def test_every_default_is_stated_once_in_the_schema() -> None:
    """conf/config.yaml chooses groups and Hydra's directories, and sets no key of the
    schema (its defaults live in ``common.config`` only); a group preset sets only what
    differs from the schema's default (``name``, the preset's identity, aside)."""
    import yaml
    from omegaconf import OmegaConf

    from csgd_cli.common.config import Config, DatasetConf, ModelConf, ScheduleConf

    top = yaml.safe_load((config_dir() / "config.yaml").read_text())
    assert set(top) == {"defaults", "hydra"}, sorted(set(top) & set(Config.__dataclass_fields__))
    restated = []
    for group, node in (("model", ModelConf), ("dataset", DatasetConf), ("schedule", ScheduleConf)):
        default = OmegaConf.to_container(OmegaConf.structured(node))
        for path in sorted((config_dir() / group).glob("*.yaml")):
            preset = yaml.safe_load(path.read_text()) or {}
            restated += [
                f"{group}/{path.name}: {k}"
                for k, v in preset.items()
                if k != "name" and k in default and default[k] == v
            ]
    assert not restated, restated


def test_the_schema_defaults_reach_the_composed_config() -> None:
    """With nothing restated in conf/, the composed config still holds the schema's
    values (and the presets' where they differ)."""
    from csgd_cli.common.config import EPSILON, RATIO

    cfg = composed("run", [])
    top = (cfg.epsilon, cfg.ratio, cfg.prune.round_to, cfg.prune.tolerance)
    assert top == (EPSILON, RATIO, 1, 1e-4)
    sched = (cfg.schedule.epochs, cfg.schedule.lr, list(cfg.schedule.milestones))
    assert sched == (600, 0.03, [200, 400])
    assert (cfg.pretrain.epochs, cfg.pretrain.lr, cfg.pretrain.momentum) == (200, 0.1, 0.9)
    assert (cfg.finetune.kind, cfg.dataset.root, cfg.dataset.batch_size) == ("cosine", "data", 64)
