"""The public API's shape (issue 21): choosing widths is its own step (``plan_widths`` ->
``WidthPlan``), the pruner's constructor is small, epsilon goes with the optimizer, API
errors name API arguments (the CLI says its keys), no environment variable changes what a
library call does, and the optimizer's flat buffer is undone by a public call."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.config import cli_words
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.nets import count_macs
from csgd_cli.common.target import Target
from csgd_cli.models import get_model

X = torch.randn(2, 3, 16, 16)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return get_model("resnet20", widths=[16] * 12)


def test_the_constructor_takes_at_most_ten_parameters() -> None:
    params = [p for p in inspect.signature(csgd.CSGD.__init__).parameters if p != "self"]
    assert len(params) <= 10, params
    assert (
        "epsilon" not in params and "epsilon" in inspect.signature(csgd.CSGD.optimizer).parameters
    )


def test_a_plan_is_plain_data_and_the_pruner_clusters_at_its_widths() -> None:
    model = _net()
    plan = csgd.plan_widths(model, X, target="flops:0.5", round_to=4)
    assert isinstance(plan, csgd.WidthPlan) and plan.report is not None
    assert plan.report["met"] and all(w % 4 == 0 for w in plan.widths.values())
    again = csgd.WidthPlan.from_dict(plan.to_dict())
    assert again == plan
    pruner = csgd.CSGD(model, X, widths=plan)
    assert pruner.widths == plan.widths and pruner.target_report == plan.report
    thin = pruner.merge(force=True)
    assert count_macs(thin, X) <= 0.5 * count_macs(model, X)
    # the shortcut is the same plan with plan_widths' defaults
    assert (
        csgd.CSGD(model, X, target="flops:0.5").widths
        == csgd.plan_widths(model, X, target="flops:0.5").widths
    )


def test_a_ratio_plan_and_a_plain_dict_of_widths() -> None:
    model = _net()
    plan = csgd.plan_widths(model, ratio=0.5, include=["layer1"])
    assert plan.widths == {"layer1": 8} and plan.share == 0.5
    assert csgd.CSGD(model, widths={"layer1": 4}).widths == {"layer1": 4}
    with pytest.raises(CsgdError, match="not a channel group"):
        csgd.CSGD(model, widths={"nope": 4})
    with pytest.raises(CsgdError, match="both given"):
        csgd.CSGD(model, ratio=0.5, widths=plan)


def test_api_errors_name_api_arguments_and_the_cli_names_its_keys() -> None:
    model = _net()
    with pytest.raises(CsgdError) as e:
        csgd.plan_widths(model, X, target="flops:0.001")
    msg = str(e.value)
    assert "target=flops:0.001" in msg and "min_width" in msg and "prune." not in msg
    cli = cli_words(e.value)
    assert "prune.target=flops:0.001" in cli and "prune.min_width" in cli
    assert cli_words("the target of the rule") == "the target of the rule"  # plain words stay
    with pytest.raises(CsgdError, match=r"^target=speed:0.5: unknown target kind"):
        Target.parse("speed:0.5")
    assert Target.parse("flops:0.25").round(1, 2) == Target("flops", 0.5)


def test_optimizer_takes_epsilon_and_merge_unties_the_flat_buffer() -> None:
    model = _net()
    pruner = csgd.CSGD(model, X, ratio=0.5)
    opt = pruner.optimizer(0.1, epsilon=0.5)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # every parameter is a view into one flat buffer
    loss = model(X).square().mean()
    loss.backward()
    opt.step()
    pruner.merge(force=True)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))  # each its own storage again
    with pytest.raises(CsgdError, match="epsilon"):
        pruner.optimizer(0.1, epsilon=-1.0)


def test_release_is_public_and_training_goes_on_with_a_new_optimizer() -> None:
    model = _net()
    pruner = csgd.CSGD(model, X, ratio=0.5)
    opt = pruner.optimizer(0.1)
    opt.release()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt2 = pruner.optimizer(0.1)
    model(X).square().mean().backward()
    opt2.step()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_environment_variable_changes_a_library_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")  # a user's own torchrun job: the caller decides
    path = csgd.save(_net(), tmp_path / "net.pt")
    assert path.is_file()
    monkeypatch.setenv("CSGD_TRUST", "os.system")  # the CLI's word; the library ignores it
    from csgd_cli.models import custom

    with pytest.raises(CsgdError, match="trust="):
        custom.require_trusted("os.system", "a file")
