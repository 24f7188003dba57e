"""Seeding (``csgd_cli.common.seeding``): one seed reaches Python, NumPy, torch, k-means
and the data order."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch


def test_seed_reaches_python_numpy_torch_kmeans_and_data_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from omegaconf import OmegaConf

    from csgd_cli.common.seeding import seed_everything
    from csgd_cli.core import clustering
    from csgd_cli.runner.datasets import build_data

    def draw(seed: int) -> tuple[Any, ...]:
        seed_everything(seed)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    assert draw(3) == draw(3) and draw(3) != draw(4)

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 9)))
    same = clustering.kmeans_clusters(x, 8, seed=5)
    assert same == clustering.kmeans_clusters(x, 8, seed=5)
    assert any(clustering.kmeans_clusters(x, 8, seed=s) != same for s in range(6, 10))

    def order(seed: int, epoch: int = 0) -> list[int]:
        cfg = OmegaConf.create(
            {"name": "synthetic", "num_train": 64, "num_test": 8, "batch_size": 16}
        )
        return build_data(cfg, seed=seed, device="cpu").epoch_indices(epoch).tolist()

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, epoch=1)
