"""``batch_inputs``: fitting, sampling and galleries for models with several per-sample inputs.

A two-input model ``relu(x + m)`` has, at its ReLU, exactly the activations that a one-input
``relu`` has on ``x + m``: every result through ``batch_inputs`` must equal the one-input
result bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_nmf import NMFConceptAttribution
from captum_nmf.compare.sampling import sample_rows
from captum_nmf.compare.selection import select_k
from captum_nmf.compare.stability import concept_stability
from captum_nmf.gallery import concept_gallery

K = 3


class TwoInputs(nn.Module):
    """``relu(scale * x + m)``: an image and a second per-sample input (e.g. a mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, m: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.relu(scale * x + m)


class OneInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x)


def data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 4, 6, 6, generator=g)
    m = torch.rand(n, 4, 6, 6, generator=g) - 0.3
    return x, m, torch.arange(n) % 2


def two_input_attr() -> NMFConceptAttribution:
    model = TwoInputs()
    return NMFConceptAttribution(model, model.relu, K, random_state=0)


def one_input_attr() -> NMFConceptAttribution:
    model = OneInput()
    return NMFConceptAttribution(model, model.relu, K, random_state=0)


def pair(b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return b[0], b[1]


def test_a_two_input_model_fits_as_its_one_input_twin() -> None:
    x, m, y = data()
    two = two_input_attr().fit(
        DataLoader(TensorDataset(x, m, y), batch_size=6), batch_inputs=pair, progress=False
    )
    one = one_input_attr().fit(DataLoader(TensorDataset(x + m, y), batch_size=6), progress=False)
    assert torch.equal(two.concepts_, one.concepts_)
    assert two.n_samples_seen_ == one.n_samples_seen_ == 20 * 36
    assert torch.equal(two.attribute((x, m)), one.attribute(x + m))


def test_dict_batches_and_subsampling_by_tile() -> None:
    x, m, _ = data()
    dicts = [{"image": x[i : i + 8], "mask": m[i : i + 8]} for i in range(0, 20, 8)]
    two = two_input_attr().fit(
        dicts,
        batch_inputs=lambda b: (b["image"], b["mask"]),
        max_locations_per_batch=40,
        progress=False,
    )
    one = one_input_attr().fit(
        [b["image"] + b["mask"] for b in dicts], max_locations_per_batch=40, progress=False
    )
    assert torch.equal(two.concepts_, one.concepts_)
    assert two.n_samples_seen_ == 40 + 40 + 20  # the 4-tile last batch keeps half


def test_bad_batch_inputs_are_refused_naming_the_fix() -> None:
    x, m, y = data(8)
    loader = DataLoader(TensorDataset(x, m, y), batch_size=4)
    with pytest.raises(TypeError, match="batch_inputs must be a function of one batch"):
        two_input_attr().fit(loader, batch_inputs=2, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"returned a tuple of \['Tensor', 'str'\] for a batch"):
        two_input_attr().fit(loader, batch_inputs=lambda b: (b[0], "mask"), progress=False)
    with pytest.raises(TypeError, match="returned a dict for a batch.*additional_forward_args"):
        two_input_attr().fit(loader, batch_inputs=lambda b: {"x": b[0]}, progress=False)
    with pytest.raises(ValueError, match=r"shapes \(4, 4, 6, 6\), \(2, 4, 6, 6\): every input"):
        two_input_attr().fit(loader, batch_inputs=lambda b: (b[0], b[1][:2]), progress=False)
    with pytest.raises(ValueError, match=r"shapes \(4, 4, 6, 6\), \(\): every input"):
        two_input_attr().fit(loader, batch_inputs=lambda b: (b[0], b[2][0]), progress=False)
    # without batch_inputs: the model's own error, and how to give it its second input
    with pytest.raises(
        TypeError,
        match=r"missing 1 required positional argument.*first of the "
        r"batch's 3 elements.*batch_inputs=lambda b: \(b\[0\], b\[1\]\)",
    ):
        two_input_attr().fit(loader, progress=False)
    with pytest.raises(
        TypeError,
        match=r"keys \['image'\]; pass batch_inputs=lambda b: "
        r"b\['image'\]",
    ):
        one_input_attr().fit([{"image": x}], progress=False)


def test_sampling_k_selection_and_stability_read_the_same_inputs() -> None:
    x, m, y = data()
    loader = DataLoader(TensorDataset(x, m, y), batch_size=6)
    reference = DataLoader(TensorDataset(x + m, y), batch_size=6)
    two = sample_rows(two_input_attr(), loader, max_rows=200, batch_inputs=pair, progress=False)
    one = sample_rows(one_input_attr(), reference, max_rows=200, progress=False)
    assert torch.equal(two.rows, one.rows)
    np.testing.assert_array_equal(two.tiles, one.tiles)
    assert two.locations_per_tile == one.locations_per_tile == 10  # ceil(200 / 20 tiles)
    options = {"ks": [2, 3], "n_seeds": 2, "max_rows": 200, "progress": False}
    k_two = select_k(two_input_attr(), loader, batch_inputs=pair, **options)
    k_one = select_k(one_input_attr(), reference, **options)
    np.testing.assert_array_equal(k_two.heldout_error, k_one.heldout_error)
    fitted_two = two_input_attr().fit(loader, batch_inputs=pair, progress=False)
    fitted_one = one_input_attr().fit(reference, progress=False)
    s_two = concept_stability(fitted_two, loader, n_seeds=2, batch_inputs=pair, progress=False)
    s_one = concept_stability(fitted_one, reference, n_seeds=2, progress=False)
    np.testing.assert_array_equal(s_two.matched_cosine, s_one.matched_cosine)


def test_the_gallery_shows_the_first_input_and_passes_extra_arguments() -> None:
    x, m, y = data()
    loader = DataLoader(TensorDataset(x, m, y), batch_size=6)
    two = two_input_attr().fit(
        loader, batch_inputs=pair, additional_forward_args=2.0, progress=False
    )
    reference = DataLoader(TensorDataset(2.0 * x + m, y), batch_size=6)
    one = one_input_attr().fit(reference, progress=False)
    assert torch.equal(two.concepts_, one.concepts_)
    shown = concept_gallery(
        two, loader, batch_inputs=pair, additional_forward_args=2.0, top_n=2, progress=False
    )
    expected = concept_gallery(one, reference, top_n=2, progress=False)
    assert [(e["tile"], e["mean_intensity"]) for e in shown.table()] == [
        (e["tile"], e["mean_intensity"]) for e in expected.table()
    ]
    best = shown.entries[0][0]  # the image shown is the tile's first input, x
    np.testing.assert_array_equal(best.image, x[best.tile, :3].permute(1, 2, 0).double().numpy())
