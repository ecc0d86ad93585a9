"""A caller's ``torch.autocast`` does not reach the solver (CPU autocast: CUDA's casting rule).

Inside autocast, ``mm`` / ``bmm`` / ``matmul`` of float32 run in bfloat16. The passive-set
code of a row (a float32 product of its mask with the powers of two) was then rounded to 8
significant bits: for K = 10 ``transform`` raised ``IndexError`` (a device-side assert on
CUDA), for K = 9 rows took another passive set's matrix, and ``X H^T`` lost 3 digits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf._utils.precision import autocast_off


def _data(k: int, n: int = 3000, c: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    h = torch.rand(k, c, generator=g)
    w = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) > 0.5)
    return (w @ h + 0.05 * torch.rand(n, c, generator=g)).float(), h


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("k", [9, 10, 12])
def test_transform_under_the_callers_autocast_is_exact(k: int) -> None:
    x, h = _data(k)
    model = NMF.from_components(h)
    expected = model.transform(x)
    with _bf16():
        got = model.transform(x)  # K = 10, 12: IndexError before
        maps = model._products_maps(x.T.reshape(1, -1, 50, 60))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert maps.dtype == torch.float32  # was bfloat16, 0.45 % off
    torch.testing.assert_close(maps, model._products_maps(x.T.reshape(1, -1, 50, 60)))


def test_fit_and_the_stream_under_the_callers_autocast_are_exact() -> None:
    x, _ = _data(10, n=600, c=24)
    fitted = NMF(10, max_iter=30, random_state=0).fit(x)
    streamed = NMF(10, random_state=0)
    for part in x.split(200):
        streamed.partial_fit(part)
    stats = streamed.statistics(x)
    with _bf16():
        fitted_ac = NMF(10, max_iter=30, random_state=0).fit(x)
        streamed_ac = NMF(10, random_state=0)
        for part in x.split(200):
            streamed_ac.partial_fit(part)
        stats_ac = streamed.statistics(x)
        updated_ac = copy.deepcopy(streamed).update(stats)
        assert NMF(10, random_state=0).stream_readiness(x[:150]) == "ready"
    updated = copy.deepcopy(streamed).update(stats)
    torch.testing.assert_close(fitted_ac.components_, fitted.components_, rtol=0, atol=0)
    torch.testing.assert_close(streamed_ac.components_, streamed.components_, rtol=0, atol=0)
    torch.testing.assert_close(stats_ac.flatten(), stats.flatten(), rtol=0, atol=0)
    torch.testing.assert_close(updated_ac.components_, updated.components_, rtol=0, atol=0)


def test_attribute_keeps_the_callers_autocast_for_the_model_only() -> None:
    """The model runs under the caller's autocast (a ReLU keeps float32 here), the solve not."""
    model = nn.Sequential(nn.ReLU()).eval()
    x, _ = _data(10, n=2 * 16 * 16, c=32)
    images = x.reshape(2, 16, 16, 32).permute(0, 3, 1, 2).contiguous()
    attr = NMFConceptAttribution(model, model[0], 10, random_state=0).fit(images)
    expected = attr.attribute(images)
    with _bf16():
        got = attr.attribute(images)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_autocast_off_is_scoped() -> None:
    with _bf16():
        with autocast_off():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_off():  # nothing active: nothing to do
        assert not torch.is_autocast_enabled("cpu")
