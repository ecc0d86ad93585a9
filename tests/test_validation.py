"""Count-like ints of the public surface: a wrong type is a TypeError, a wrong value ValueError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_nmf import NMF, NMFConceptAttribution
from captum_nmf._utils.validation import check_bool, check_int
from captum_nmf.compare import sample_tiles
from captum_nmf.wsi import Slide, explain_cohort, tile_grid

SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _fitted() -> NMFConceptAttribution:
    net = _net()
    return NMFConceptAttribution(net, net[1], 2, random_state=0).fit(_x(), progress=False)


def _attr() -> NMFConceptAttribution:
    net = _net()
    return NMFConceptAttribution(net, net[1], 2)


# (name, minimum, call with the value)
SURFACE: list[tuple[str, int, Callable[[Any], object]]] = [
    ("n_components", 1, lambda v: NMF(v).fit(torch.rand(5, 3))),
    ("max_iter", 1, lambda v: NMF(2, max_iter=v).fit(torch.rand(5, 3))),
    ("n_concepts", 1, lambda v: NMFConceptAttribution(_net(), nn.ReLU(), v)),
    ("n_epochs", 1, lambda v: _attr().fit(_x(), n_epochs=v, progress=False)),
    (
        "max_locations_per_batch",
        1,
        lambda v: _attr().fit(_x(), max_locations_per_batch=v, progress=False),
    ),
    (
        "batch_size",
        1,
        lambda v: _attr().fit(TensorDataset(_x()), batch_size=v, progress=False),
    ),
    ("workers", 1, lambda v: _attr().fit([_x()], engine="ray", workers=v, progress=False)),
    ("retries", 0, lambda v: explain_cohort(_fitted(), [SLIDE], "unused", retries=v)),
    (
        "workers",
        1,
        lambda v: explain_cohort(_fitted(), [SLIDE], "unused", engine="ray", workers=v),
    ),
    ("tile_size", 1, lambda v: tile_grid(Slide(SLIDE), tile_size=v, tissue_mask=None)),
    ("stride", 1, lambda v: tile_grid(Slide(SLIDE), tile_size=64, stride=v, tissue_mask=None)),
    ("margin", 0, lambda v: tile_grid(Slide(SLIDE), tile_size=64, margin=v, tissue_mask=None)),
    ("n", 1, lambda v: sample_tiles(torch.rand(3, 3, 4, 4), v)),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(SURFACE)]


@pytest.mark.parametrize(("name", "minimum", "call"), SURFACE, ids=IDS)
@pytest.mark.parametrize("value", [1.5, True, "2"])
def test_wrong_type_is_a_type_error(
    name: str, minimum: int, call: Callable[[Any], object], value: object, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=rf"{name} must be an int"):
        call(value)


@pytest.mark.parametrize(("name", "minimum", "call"), SURFACE, ids=IDS)
def test_value_below_the_range_is_a_value_error(
    name: str, minimum: int, call: Callable[[Any], object]
) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be >= {minimum}, got {minimum - 1}"):
        call(minimum - 1)


def test_check_int_accepts_numpy_integers_and_optional_none() -> None:
    import numpy as np

    assert check_int("k", np.int64(3)) == 3
    assert type(check_int("k", np.int64(3))) is int
    assert check_int("k", None, optional=True) is None
    with pytest.raises(TypeError, match=r"k must be an int >= 1 or None, got 2.0 \(float\)"):
        check_int("k", 2.0, optional=True)
    with pytest.raises(TypeError, match=r"k must be an int >= 1, got None"):
        check_int("k", None)
    with pytest.raises(ValueError, match="k must be >= 1, got 0; pass e.g. k=2."):
        check_int("k", 0, hint="pass e.g. k=2.")


def test_check_bool() -> None:
    assert check_bool("flag", True) is True
    assert check_bool("flag", None, optional=True) is None
    with pytest.raises(TypeError, match="flag must be a bool, got 1 \\(int\\)"):
        check_bool("flag", 1)
