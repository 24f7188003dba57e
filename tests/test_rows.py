"""Unit tests of ``csgd_cli.rules.rows``: a RowBlock's slab, rows, put and view."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.rules.rows import RowBlock


def _block(t: torch.Tensor, row: int, n: int, block: int = 1, dim: int = 0) -> RowBlock:
    return RowBlock("m.weight", t, row, 0, n, "kernel", block, dim)


def test_rows_of_whole_rows_are_a_view_of_the_tensor() -> None:
    t = torch.arange(24.0).reshape(6, 2, 2)  # 6 channels of 4 entries
    r = _block(t, row=2, n=3)
    rows = r.rows()
    assert rows.shape == (3, 4)
    assert torch.equal(rows, torch.arange(8.0, 20.0).reshape(3, 4))
    rows[0, 0] = -1.0  # a view: writes land in the tensor
    assert t[2, 0, 0] == -1.0


def test_a_block_of_rows_is_one_channel() -> None:
    """block > 1 (a head of head_dim rows): channel i is rows [row + i*block, + block)."""
    t = torch.arange(16.0).reshape(8, 2)
    r = _block(t, row=2, n=2, block=3)  # rows 2-4 and 5-7
    assert torch.equal(r.rows(), torch.tensor([[4.0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]))
    assert torch.equal(r.slab(), t[2:8])


def test_rows_along_another_dim_are_its_columns() -> None:
    """dim=1: a bias table of shape (positions, heads), one column per head."""
    t = torch.arange(12.0).reshape(3, 4)
    r = _block(t, row=1, n=2, dim=1)
    assert torch.equal(r.rows(), t[:, 1:3].T)
    two = _block(t, row=0, n=2, block=2, dim=1)  # two channels of two columns each
    assert torch.equal(two.rows(), torch.stack([t[:, 0:2].T.reshape(-1), t[:, 2:4].T.reshape(-1)]))


def test_rows_of_another_tensor_of_the_same_shape() -> None:
    """A gradient or an optimizer buffer: the same entries, read from that tensor."""
    t = torch.zeros(5, 3)
    g = torch.arange(15.0).reshape(5, 3)
    r = _block(t, row=1, n=2)
    assert torch.equal(r.rows(g), g[1:3])
    assert torch.equal(r.rows(), torch.zeros(2, 3))


def test_put_writes_back_only_the_blocks_entries_even_through_a_copy() -> None:
    """A transposed conv's outputs (dim 1 of a 4-d weight): ``rows`` is a copy there,
    so ``put`` is how a change reaches the tensor."""
    w = torch.randn(3, 5, 2, 2)  # (in, out, kh, kw)
    before = w.clone()
    r = _block(w, row=1, n=2, dim=1)
    rows = r.rows()
    assert rows.shape == (2, 12)
    assert torch.equal(rows[0], w[:, 1].reshape(-1)) and torch.equal(rows[1], w[:, 2].reshape(-1))
    r.put(torch.ones(2, 12))
    assert torch.equal(w[:, 1:3], torch.ones(3, 2, 2, 2))
    keep = [0, 3, 4]
    assert torch.equal(w[:, keep], before[:, keep])


def test_put_into_another_tensor() -> None:
    t, buf = torch.zeros(4, 2), torch.zeros(4, 2)
    _block(t, row=2, n=2).put(torch.tensor([[1.0, 2], [3, 4]]), buf)
    assert torch.equal(buf, torch.tensor([[0.0, 0], [0, 0], [1, 2], [3, 4]]))
    assert torch.equal(t, torch.zeros(4, 2))


def test_view_shares_storage_with_the_buffer() -> None:
    buf = torch.zeros(6, 4)
    v = _block(buf, row=1, n=2, block=2).view(buf)
    assert v.shape == (2, 8)
    v.fill_(7.0)
    assert torch.equal(buf[1:5], torch.full((4, 4), 7.0))
    assert buf[0].abs().sum() == 0 and buf[5].abs().sum() == 0


def test_view_of_rows_not_contiguous_per_channel_is_a_one_line_error() -> None:
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    r = _block(conv.weight.data, row=0, n=2)
    with pytest.raises(CsgdError, match=r"the rows of m\.weight are not contiguous per channel"):
        r.view(conv.weight.data)
    tconv = torch.randn(3, 5, 2, 2)  # a transposed conv's outputs, laid out as built
    with pytest.raises(CsgdError, match="exclude its group") as e:
        _block(tconv, row=0, n=2, dim=1).view(tconv)
    assert "\n" not in str(e.value)


def test_the_fix_the_view_error_names_works() -> None:
    """The error's advice, followed: the model back in torch's default layout."""
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with pytest.raises(CsgdError) as e:
        _block(conv.weight.data, row=0, n=2).view(conv.weight.data)
    assert "model.to(memory_format=torch.contiguous_format)" in str(e.value)
    conv.to(memory_format=torch.contiguous_format)
    w = conv.weight.data
    v = _block(w, row=1, n=2).view(w)
    assert v.shape == (2, 27) and v.data_ptr() == w[1].data_ptr()


def test_a_row_block_is_frozen() -> None:
    r = _block(torch.zeros(2, 2), row=0, n=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n = 1  # type: ignore[misc]
    assert (r.block, r.dim, r.role) == (1, 0, "kernel")
