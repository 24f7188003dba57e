"""Structured-config schema (types) and range checks for every stage's config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from .errors import CsgdError
from .target import Target

# The defaults, stated once: the schema below, the API and the docs read these.
RATIO = 0.625  # clusters per group = round(ratio x width): the paper's C-SGD-5/8
EPSILON = 3e-3  # centripetal strength
NORM_EPSILON_SHARE = 0.1  # norm gamma/beta and biases: this share of epsilon (reference code)
MIN_WIDTH_FLOOR = 4  # a target never makes a group narrower than max(round_to, this)


def default_min_width(round_to: int) -> int:
    """The narrowest width a target may give a group when ``min_width`` is not given."""
    return max(round_to, MIN_WIDTH_FLOOR)


# The library's errors name its API arguments; the CLI says the config key that sets each.
CLI_KEYS = {
    "target": "prune.target",
    "min_width": "prune.min_width",
    "round_to": "prune.round_to",
    "rule": "prune.rule",
    "latency_batch": "prune.latency_batch",
    "latency_threads": "prune.latency_threads",
    "resolution": "prune.resolution",
}
# ``target``, ``rule`` and ``resolution`` are plain words too: translated only as ``name=``
_API_WORD = re.compile(
    r"(?<![\w.])(?:(target|rule|resolution)(?==)|(min_width|round_to|latency_batch|latency_threads)\b)"
)


def cli_words(error: Exception | str) -> str:
    """An API error's text with each argument name replaced by its CLI key."""
    return _API_WORD.sub(lambda m: CLI_KEYS[m.group(1) or m.group(2)], str(error))


@dataclass(frozen=True)
class Stage:
    """What a stage needs; one preflight (``csgd_cli.runner.preflight``) reads these."""

    help: str
    data: bool = False  # reads the data set
    weights: str | None = None  # "ckpt": needs ckpt=; "ckpt|init": either; None: optional
    hint: str = "ckpt=<file.pt>"  # what to pass when the weights are missing
    clusters: bool = False  # the ckpt must carry clusters (prune: unless a baseline)
    fresh: bool = False  # builds a fresh model from model= when no weights are given
    groups: bool = False  # uses prune.include/exclude to choose groups
    onnx: bool = False  # writes ONNX: needs the deploy extra
    keeps_clusters: bool = False  # trains the clusters its weights carry (widths fixed)
    target: bool = False  # chooses widths for prune.target (checked reachable first)


STAGES: dict[str, Stage] = {
    "pretrain": Stage("train the base model with plain SGD", data=True, fresh=True),
    "groups": Stage(
        "list every channel group: name, width, members, excluded or not", fresh=True, target=True
    ),
    "cluster": Stage(
        "cluster the channels of every pruned group (k-means or even)",
        weights="ckpt|init",
        hint="ckpt=<base.pt> (or init=)",
        groups=True,
        target=True,
    ),
    "train": Stage(
        "C-SGD training: pull each cluster's filters to their centre",
        data=True,
        fresh=True,
        groups=True,
        keeps_clusters=True,
        target=True,
    ),
    "check": Stage(
        "report chi (kernel deviation); exit 0 when ready to merge",
        weights="ckpt",
        hint="ckpt=<csgd.pt or last.pt>",
        clusters=True,
    ),
    "prune": Stage(
        "merge clusters into a physically thinner network",
        data=True,
        weights="ckpt",
        hint="ckpt=<csgd.pt or last.pt of csgd train>",
        clusters=True,
    ),
    "finetune": Stage(
        "plain SGD on a (pruned) checkpoint", data=True, weights="ckpt", hint="ckpt=<pruned.pt>"
    ),
    "eval": Stage(
        "accuracy, loss, params, FLOPs, latency of a checkpoint", data=True, weights="ckpt"
    ),
    "export": Stage(
        "export a checkpoint to ONNX (checked in onnxruntime)", data=True, weights="ckpt", onnx=True
    ),
    "run": Stage(
        "the whole pipeline: pretrain, cluster, train, check, prune, finetune, eval",
        data=True,
        fresh=True,
        groups=True,
        target=True,
    ),
    "report": Stage("tables and plots over a run or sweep directory"),
}


@dataclass
class ModelConf:
    name: str = "resnet56"
    kwargs: dict[str, Any] = field(default_factory=dict)
    _target_: str | None = None  # model=custom: dotted path of a callable returning a module


@dataclass
class DatasetConf:
    name: str = "cifar10"
    root: str = "data"
    batch_size: int = 64
    eval_batch_size: int = 256
    limit: int | None = None
    download: bool = True
    augment: bool = True
    num_workers: int = 4
    num_train: int = 512  # synthetic only
    num_test: int = 256
    image_size: int = 224  # imagenet; synthetic: conf/dataset/synthetic.yaml (32)
    num_classes: int | None = None  # synthetic only (default 10)


@dataclass
class ScheduleConf:
    epochs: int = 600
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = None  # plain params' norms and biases (None: same)
    kind: str = "multistep"  # multistep | cosine
    milestones: list[int] = field(default_factory=lambda: [200, 400])
    gamma: float = 0.1
    warmup_epochs: int = 0
    eval_every: int = 1
    log_every: int = 50


@dataclass
class PruneConf:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    method: str = "csgd"  # csgd, or a baseline: l1 | l2 | fpgm | taylor | slimming | random
    score_batches: int = 16  # taylor: training batches its scores are summed over
    slimming_lambda: float = 1e-4  # slimming: L1 penalty on BN gamma in its sparsity phase
    # a criterion's extra epochs (C-SGD's): at the finetune lr, or on C-SGD's schedule first
    baseline_schedule: str = "finetune"  # finetune | csgd
    force: bool = False
    tolerance: float = 1e-4  # largest |logit diff| / largest |logit| accepted at merge
    export: bool = True
    round_to: int = 1  # cluster counts rounded to a multiple of this (8, 16: runtime blocks)
    target: str | None = None  # flops:0.45 | params:0.5 | latency:0.5 (replaces ratio)
    min_width: int | None = None  # narrowest a target may make a group (None: max(round_to, 4))
    rule: str = "distortion"  # how a target's widths are chosen: distortion | uniform
    rounds: int = 1  # with a target: rounds of C-SGD + merge, round r of n at target^(r/n)
    latency_batch: int = 1  # a latency target's batch size
    latency_threads: int | None = None  # its threads (None: torch's thread count)
    resolution: int | None = None  # a target's per-image resolution (None: the data's)


@dataclass
class EvalConf:
    latency_batch: int = 64
    latency_iters: int = 10


@dataclass
class DeployConf:
    int8: bool = False  # csgd run: an INT8 (onnxruntime) row in the table, top-1 vs float32
    calib_batches: int = 8  # INT8: calibration batches from the training split


@dataclass
class CheckpointConf:
    every_steps: int = 0


@dataclass
class DistConf:
    """torchrun jobs (see docs/distributed.md)."""

    sync_bn: bool = False  # BatchNorm statistics over the global batch (every rank)
    backend: str = "auto"  # auto (NCCL on CUDA, gloo on the CPU) | gloo | nccl
    timeout_s: float = 1800.0  # longest wait in one collective before the job fails


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    schedule: ScheduleConf = field(default_factory=ScheduleConf)  # C-SGD training
    pretrain: ScheduleConf = field(default_factory=ScheduleConf)  # base training
    finetune: ScheduleConf = field(default_factory=ScheduleConf)  # after the merge
    prune: PruneConf = field(default_factory=PruneConf)
    eval: EvalConf = field(default_factory=EvalConf)
    deploy: DeployConf = field(default_factory=DeployConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    dist: DistConf = field(default_factory=DistConf)
    stage: str = MISSING
    epsilon: float = EPSILON
    norm_epsilon: float | None = None  # None: NORM_EPSILON_SHARE * epsilon
    ratio: float = RATIO
    ratios: list[float] = field(
        default_factory=list
    )  # iterative rounds, e.g. [0.8125, 0.6875, 0.625]
    clustering: str = "kmeans"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    init: str | None = None
    ckpt: str | None = None
    resume: bool = False
    compile: bool = False  # training step under torch.compile
    format: str = "onnx"  # csgd export
    backend: str = (
        "eager"  # runtime timed by eval/run: eager | channels_last | compile | onnxruntime
    )
    dir: str | None = None  # csgd report: the run or sweep directory


def register_schema() -> None:
    ConfigStore.instance().store(name="csgd_schema", node=Config)


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise CsgdError(
            f"{key}={value} is out of range: it must be {rule}", f"pass a valid {key}=..."
        )


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express (names: ``runner.names``, which
    derives each list from its table); raises CsgdError."""
    _need(cfg.epsilon >= 0, "epsilon", cfg.epsilon, ">= 0")
    _need(
        cfg.norm_epsilon is None or cfg.norm_epsilon >= 0, "norm_epsilon", cfg.norm_epsilon, ">= 0"
    )
    _need(0 < cfg.ratio <= 1, "ratio", cfg.ratio, "in (0, 1]")
    for r in cfg.ratios:
        _need(0 < r <= 1, "ratios", list(cfg.ratios), "a list of values in (0, 1]")
    _need(
        list(cfg.ratios) == sorted(cfg.ratios, reverse=True),
        "ratios",
        list(cfg.ratios),
        "decreasing",
    )
    _need(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "auto, cpu or cuda")
    _need(cfg.prune.tolerance > 0, "prune.tolerance", cfg.prune.tolerance, "> 0")
    _need(cfg.prune.score_batches >= 1, "prune.score_batches", cfg.prune.score_batches, ">= 1")
    lam = cfg.prune.slimming_lambda
    _need(lam >= 0, "prune.slimming_lambda", lam, ">= 0")
    bs = cfg.prune.baseline_schedule
    _need(bs in ("finetune", "csgd"), "prune.baseline_schedule", bs, "finetune or csgd")
    _need(
        cfg.checkpoint.every_steps >= 0,
        "checkpoint.every_steps",
        cfg.checkpoint.every_steps,
        ">= 0",
    )
    _need(cfg.seed >= 0, "seed", cfg.seed, ">= 0")
    _need(cfg.prune.round_to >= 1, "prune.round_to", cfg.prune.round_to, ">= 1")
    validate_target(cfg)
    nb = cfg.deploy.calib_batches
    _need(nb >= 1, "deploy.calib_batches", nb, ">= 1")
    d = cfg.dataset
    _need(d.batch_size >= 1, "dataset.batch_size", d.batch_size, ">= 1")
    _need(d.eval_batch_size >= 1, "dataset.eval_batch_size", d.eval_batch_size, ">= 1")
    for name in ("schedule", "pretrain", "finetune"):
        s = cfg[name]
        _need(s.epochs >= 0, f"{name}.epochs", s.epochs, ">= 0")
        _need(s.lr > 0, f"{name}.lr", s.lr, "> 0")
        _need(0 <= s.momentum < 1, f"{name}.momentum", s.momentum, "in [0, 1)")
        _need(s.weight_decay >= 0, f"{name}.weight_decay", s.weight_decay, ">= 0")
        _need(s.kind in ("multistep", "cosine"), f"{name}.kind", s.kind, "multistep or cosine")
        _need(s.warmup_epochs >= 0, f"{name}.warmup_epochs", s.warmup_epochs, ">= 0")
        _need(s.log_every >= 0, f"{name}.log_every", s.log_every, ">= 0")
        _need(s.eval_every >= 1, f"{name}.eval_every", s.eval_every, ">= 1")
    if cfg.init is not None and cfg.ckpt is not None and cfg.stage in ("train", "pretrain"):
        raise CsgdError(
            "both init= and ckpt= given", "pass one: init= to start from weights, ckpt= to continue"
        )


def validate_target(cfg: DictConfig) -> None:
    """``prune.target`` and the keys that go with it (a ratio given too: preflight)."""
    p = cfg.prune
    _need(p.min_width is None or p.min_width >= 1, "prune.min_width", p.min_width, ">= 1")
    _need(p.rounds >= 1, "prune.rounds", p.rounds, ">= 1")
    _need(p.latency_batch >= 1, "prune.latency_batch", p.latency_batch, ">= 1")
    _need(p.resolution is None or p.resolution >= 1, "prune.resolution", p.resolution, ">= 1")
    threads = p.latency_threads
    _need(threads is None or threads >= 1, "prune.latency_threads", threads, ">= 1")
    if p.target is None:
        if p.rounds > 1:
            raise CsgdError(
                "prune.rounds needs prune.target",
                "pass prune.target=..., or ratios=[...] for rounds",
            )
        return
    Target.parse(p.target)
    if list(cfg.ratios):
        raise CsgdError(
            "ratios=[...] and prune.target both given",
            f"pass prune.rounds={len(cfg.ratios)} for {len(cfg.ratios)} rounds towards the target",
        )
