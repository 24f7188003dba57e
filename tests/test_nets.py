"""Calling a model and counting its parameters and multiply-adds (``csgd_cli.common.nets``)."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from csgd_cli.common.nets import (
    call_args,
    count_macs,
    count_params,
    first_input,
    first_samples,
    outputs_of,
    run_model,
)


class Two(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> tuple:
        return a, b


class Images(nn.Module):  # torchvision's detectors: a list of images, one per sample
    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return images


class Bare(nn.Module):  # RetinaNet: no annotation, only the name
    def forward(self, images, targets=None):
        return images


class TypingList(nn.Module):
    def forward(self, x: typing.List[torch.Tensor]) -> int:  # noqa: UP006
        return len(x)


class Seq(nn.Module):
    def forward(self, x: Sequence[torch.Tensor]) -> int:
        return len(x)


class Keywords(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids * attention_mask


class NoArgs(nn.Module):
    def forward(self) -> int:
        return 0


def test_call_args_per_input_kind() -> None:
    x, y = torch.ones(2, 3), torch.zeros(2, 3)
    assert call_args(Two(), x) == ((x,), {})
    assert call_args(Two(), (x, y)) == ((x, y), {})
    assert call_args(Two(), [x, y]) == ((x, y), {})  # a list: positional arguments
    assert call_args(Keywords(), {"input_ids": x}) == ((), {"input_ids": x})
    for m in (Images(), Bare(), TypingList(), Seq()):  # a forward that takes one list
        assert call_args(m, [x, y]) == (([x, y],), {})
    assert call_args(NoArgs(), [x]) == ((x,), {})  # no first argument: not a list taker


def test_annotations_as_objects_are_read_by_their_origin() -> None:
    """This file's annotations are strings (``from __future__ import annotations``): here
    the forward's annotations are the typing objects themselves, as in a module without."""

    def forward(self: nn.Module, x: object, y: object = None) -> object:
        return x

    a, b = torch.ones(1), torch.ones(1)
    for ann, takes_a_list in [
        (list[torch.Tensor], True),
        (typing.List[torch.Tensor], True),  # noqa: UP006
        (Sequence[torch.Tensor], True),
        (torch.Tensor, False),
        (tuple[torch.Tensor, ...], False),
    ]:
        fn = types.FunctionType(forward.__code__, globals(), "forward")
        fn.__annotations__ = {"x": ann}
        m = type("M", (nn.Module,), {"forward": fn})()
        want = (([a, b],), {}) if takes_a_list else ((a, b), {})
        assert call_args(m, [a, b]) == want, ann


def test_run_model_calls_the_forward_as_told() -> None:
    x, y = torch.full((2,), 2.0), torch.full((2,), 3.0)
    assert run_model(Two(), (x, y)) == (x, y)
    assert torch.equal(run_model(Keywords(), {"input_ids": x, "attention_mask": y}), x * y)
    assert run_model(Seq(), [x, y, x]) == 3
    out = run_model(Two(), x)
    assert out[0] is x and out[1] is None


def test_first_samples() -> None:
    t = torch.arange(12).reshape(4, 3)
    assert torch.equal(first_samples(t), t[:1])
    assert torch.equal(first_samples(t, 2), t[:2])
    scalar = torch.tensor(5.0)
    assert first_samples(scalar, 2) is scalar  # a 0-d tensor has no samples
    assert first_samples(7) == 7
    got = first_samples({"a": t, "b": (t, [1, 2, 3])}, 2)
    assert torch.equal(got["a"], t[:2]) and torch.equal(got["b"][0], t[:2])
    assert got["b"][1] == [1, 2]  # a list: its first items


def test_first_input_keeps_the_way_run_model_passes_it() -> None:
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    one = first_input(Two(), (x, y))
    assert isinstance(one, tuple) and [a.shape[0] for a in one] == [1, 1]
    assert torch.equal(one[1], y[:1])
    kw = first_input(Keywords(), {"input_ids": x, "attention_mask": x}, n=3)
    assert set(kw) == {"input_ids", "attention_mask"} and kw["input_ids"].shape == (3, 3)
    imgs = [torch.randn(3, 8, 8), torch.randn(3, 9, 9)]
    assert first_input(Images(), imgs) == (imgs[:1],)  # one image, still in a list


def test_outputs_of_flattens_in_a_stable_order() -> None:
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    out = {"z": a, "b": [b, {"y": c, "x": d}], "n": None, "k": 3}
    assert [float(t) for t in outputs_of(out)] == [1.0, 3.0, 2.0, 0.0]  # keys sorted
    assert outputs_of(a) == [a]
    assert outputs_of("text") == [] and outputs_of(None) == []


def test_count_params_counts_shared_weights_once() -> None:
    lin = nn.Linear(3, 4)  # 3 * 4 + 4
    assert count_params(lin) == 16
    tied = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 4, bias=False), lin)
    assert count_params(tied) == 16 + 16
    assert count_params(nn.ReLU()) == 0


def test_count_macs_by_hand() -> None:
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    # 4 output maps of 5 x 5, each value 2 * 3 * 3 multiply-adds
    assert count_macs(conv, (2, 5, 5)) == 4 * 25 * 2 * 9
    assert count_macs(conv, [2, 5, 5]) == 4 * 25 * 2 * 9
    lin = nn.Linear(3, 7)
    assert count_macs(lin, (3,)) == 21
    # an example batch counts one sample, whatever its batch size
    assert count_macs(conv, torch.randn(6, 2, 5, 5)) == 4 * 25 * 2 * 9
    assert count_macs(conv, torch.randn(1, 2, 10, 10)) == 4 * 100 * 2 * 9


def test_count_macs_of_a_network_without_parameters_by_shape() -> None:
    # no parameter to take the device and dtype from: the defaults; pooling does no
    # multiply-add torch's counter counts
    assert count_macs(nn.Sequential(nn.AvgPool2d(2), nn.Flatten()), (2, 4, 4)) == 0


def test_count_macs_of_several_inputs_and_keywords() -> None:
    class Mul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
            return self.a(x), self.b(y)

    m = Mul()
    x, y = torch.randn(5, 4), torch.randn(5, 6)
    assert count_macs(m, (x, y)) == 4 * 2 + 6 * 3
    assert count_macs(m, {"x": x, "y": y}) == 4 * 2 + 6 * 3


def test_count_macs_measures_in_eval_mode_and_restores_the_mode() -> None:
    seen: list[bool] = []

    class Spy(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return super().forward(x)

    m = Spy(2, 2).train()
    count_macs(m, (2,))
    assert seen == [False] and m.training
    m.eval()
    count_macs(m, (2,))
    assert not m.training


def test_count_macs_uses_the_models_dtype() -> None:
    m = nn.Linear(3, 2).double()
    assert count_macs(m, (3,)) == 6  # a float32 input would fail in a float64 layer


def test_count_macs_restores_the_mode_when_the_forward_fails() -> None:
    class Boom(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("bad input")

    m = Boom(3, 3).train()
    with pytest.raises(RuntimeError, match="bad input"):
        count_macs(m, (3,))
    assert m.training
