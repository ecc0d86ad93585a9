"""NMFConceptAttribution: exact recovery on planted models, Captum contract, state hygiene."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerActivation, LayerAttribution, LayerGradCam
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_nmf import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    ConceptModelMismatchError,
    LayerError,
    NegativeActivationError,
    NonFiniteActivationError,
    NotFittedError,
)
from tests.helpers.basic_models import (
    PLANTED_CONCEPTS,
    FailingNet,
    LinearNet,
    NonFiniteNet,
    PlantedConceptNet,
    SignedNet,
    TokenNet,
    TupleNet,
    hooks_left,
    planted_maps,
    training_flags,
)
from tests.helpers.calls import CallRecorder
from tests.helpers.emulated_cuda import EmulatedCuda


def match_concepts(found: torch.Tensor, planted: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Hungarian matching of found to planted concepts by cosine similarity."""
    f = torch.nn.functional.normalize(found.double(), dim=1)
    p = torch.nn.functional.normalize(planted.double(), dim=1)
    cos = p @ f.T  # planted x found
    rows, cols = linear_sum_assignment(-cos.numpy())
    return [int(c) for c in cols[rows.argsort()]], cos[rows, cols]


@pytest.fixture
def planted() -> tuple[PlantedConceptNet, torch.Tensor]:
    return PlantedConceptNet(), planted_maps(6, 8, 8)


# ------------------------------------------------------------- exact recovery
def test_fit_recovers_planted_concepts_and_maps(planted: tuple[nn.Module, torch.Tensor]) -> None:
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0, tol=1e-8)
    assert attr.fit(maps, progress=False) is attr
    assert attr.n_channels_in_ == 5
    assert attr.layer_name_ == "relu"
    assert tuple(attr.concepts_.shape) == (3, 5)
    order, cosines = match_concepts(attr.concepts_, PLANTED_CONCEPTS)
    assert bool((cosines >= 0.99).all()), cosines

    new = planted_maps(2, 5, 7, seed=1)
    out = attr.attribute(new)
    assert tuple(out.shape) == (2, 3, 5, 7)
    assert bool((out >= 0).all())
    # Concept k = planted[order^-1] / ||planted||, so weights scale by the planted norms.
    norms = torch.linalg.vector_norm(PLANTED_CONCEPTS, dim=1)
    expected = new * norms[:, None, None]
    assert torch.allclose(out[:, order], expected, atol=2e-3)
    # assign() is the argmax of the planted maps.
    assert torch.equal(attr.assign(new), torch.argmax(out, dim=1))


def test_streamed_fit_from_dataloader_equals_planted(
    planted: tuple[nn.Module, torch.Tensor],
) -> None:
    net, maps = planted
    loader = DataLoader(TensorDataset(maps, torch.zeros(6)), batch_size=2)
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(loader, progress=False)
    _, cosines = match_concepts(attr.concepts_, PLANTED_CONCEPTS)
    assert bool((cosines >= 0.99).all()), cosines
    assert attr.n_samples_seen_ == 6 * 8 * 8


def test_a_streamed_fit_frees_each_batchs_rows_before_the_next_forward(
    planted: tuple[nn.Module, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # one batch of feature rows alive at a time: the rows given to partial_fit are gone
    # when the model runs on the next batch (not still named by the fit's loops)
    import weakref

    from captum_nmf import NMF

    net, maps = planted
    given: list[weakref.ref[torch.Tensor]] = []
    alive: list[bool] = []
    partial_fit = NMF.partial_fit

    def recorded(self: NMF, x: torch.Tensor, *a: object, **k: object) -> NMF:
        given.append(weakref.ref(x))
        return partial_fit(self, x, *a, **k)

    monkeypatch.setattr(NMF, "partial_fit", recorded)
    handle = net.register_forward_pre_hook(
        lambda module, inputs: alive.append(bool(given) and given[-1]() is not None)
    )
    try:
        attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
        attr.fit(list(maps.split(2)), n_epochs=2, progress=False)
    finally:
        handle.remove()
    assert len(given) == len(alive) == 6
    assert not any(alive)


def test_fit_from_list_and_generator_and_subsampling(
    planted: tuple[nn.Module, torch.Tensor],
) -> None:
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit((b for b in maps.split(3)), max_locations_per_batch=50, progress=False)
    assert attr.n_samples_seen_ == 2 * 50
    _, cosines = match_concepts(attr.concepts_, PLANTED_CONCEPTS)
    assert bool((cosines >= 0.99).all()), cosines
    attr.fit(list(maps.split(2)), n_epochs=2, progress=False)
    assert attr.n_samples_seen_ == 2 * 6 * 8 * 8


def test_a_tensor_is_one_full_batch_for_max_locations(
    planted: tuple[nn.Module, torch.Tensor],
) -> None:
    """A tensor of fewer than 32 tiles kept ``max_locations_per_batch * N / 32`` rows: its
    quota was scaled against the unused ``batch_size``, so 6 tiles kept 19 of 200 rows
    asked for (and a 2-tile tensor with K = 6 and 50 rows failed in the initialisation)."""
    net, maps = planted  # 6 tiles of 8 x 8 locations
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(maps, max_locations_per_batch=200, progress=False)
    assert attr.n_samples_seen_ == 200
    attr.fit(maps[:2], max_locations_per_batch=50, progress=False)
    assert attr.n_samples_seen_ == 50
    attr.fit(maps, max_locations_per_batch=1000, progress=False)  # more than there are
    assert attr.n_samples_seen_ == 6 * 8 * 8


def test_an_empty_batch_gives_empty_maps(planted: tuple[nn.Module, torch.Tensor]) -> None:
    """``attribute`` and ``assign`` of a batch of 0 tiles (an empty last chunk) raised
    "cannot reshape tensor of 0 elements into shape [0, -1, 8, 8]"; the model, Captum's
    ``LayerActivation`` and ``features`` return empty tensors."""
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(maps, progress=False)
    empty = maps[:0]
    assert tuple(attr.attribute(empty).shape) == (0, 3, 8, 8)
    assert tuple(attr.assign(empty).shape) == (0, 8, 8)
    assert tuple(attr.features(empty).shape) == (0, 5, 8, 8)


def test_interpolate_and_assign_minus_one_on_empty_locations(
    planted: tuple[nn.Module, torch.Tensor],
) -> None:
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0).fit(
        maps, progress=False
    )
    x = planted_maps(1, 4, 4, seed=2)
    x[0, :, 1, 2] = 0.0  # all-zero feature vector at (1, 2)
    out = attr.attribute(x)
    up = LayerAttribution.interpolate(out, (16, 16))
    assert tuple(up.shape) == (1, 3, 16, 16)
    labels = attr.assign(x)
    assert labels.dtype == torch.int64
    assert int(labels[0, 1, 2]) == -1
    assert int((labels == -1).sum()) == 1


def test_beside_layer_gradcam_same_geometry(planted: tuple[nn.Module, torch.Tensor]) -> None:
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0).fit(
        maps, progress=False
    )
    cam = LayerGradCam(net, net.relu).attribute(maps[:2], target=1)
    concepts = attr.attribute(maps[:2])
    assert cam.shape[0] == concepts.shape[0]
    assert cam.shape[2:] == concepts.shape[2:]
    assert attr.multiplies_by_inputs is False


def test_deterministic_and_batch_subset_invariant(planted: tuple[nn.Module, torch.Tensor]) -> None:
    net, maps = planted
    a = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=5).fit(maps, progress=False)
    b = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=5).fit(maps, progress=False)
    assert torch.equal(a.concepts_, b.concepts_)
    full = a.attribute(maps)
    part = a.attribute(maps[2:4])
    assert torch.allclose(full[2:4], part, atol=1e-6)


def test_layer_input_attribution(planted: tuple[nn.Module, torch.Tensor]) -> None:
    net, maps = planted
    # The input of the final pooling is the post-dropout, post-ReLU map.
    attr = NMFConceptAttribution(net, net.pool, n_concepts=3, random_state=0)
    attr.fit(maps, attribute_to_layer_input=True, progress=False)
    out = attr.attribute(maps[:1], attribute_to_layer_input=True)
    assert tuple(out.shape) == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="attribute_to_layer_input=False but the concepts were"):
        attr.attribute(maps[:1])


def test_reshape_transform_for_tokens() -> None:
    net = TokenNet()
    x = torch.rand(2, 4, 3, 3)

    def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 3, 3)

    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    with pytest.raises(LayerError, match="produced shape \\(2, 9, 4\\).*reshape_transform"):
        attr.fit(x, progress=False)
    attr = NMFConceptAttribution(
        net, net.relu, n_concepts=2, random_state=0, reshape_transform=tokens_to_grid
    )
    assert tuple(attr.fit(x, progress=False).attribute(x).shape) == (2, 2, 3, 3)


# ----------------------------------------------------------- model hygiene
def test_train_flags_restored_and_no_hooks_and_inputs_untouched(
    planted: tuple[nn.Module, torch.Tensor],
) -> None:
    net, maps = planted
    net.train()
    net.fc.eval()  # a mixed state must come back exactly
    before = training_flags(net)
    snapshot = maps.clone()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    attr.fit(maps, progress=False)
    out1 = attr.attribute(maps)
    out2 = attr.attribute(maps)
    assert torch.equal(out1, out2)  # dropout was off: eval mode inside the call
    assert training_flags(net) == before
    assert hooks_left(net) == 0
    assert torch.equal(maps, snapshot)


class _FlagWrites(PlantedConceptNet):
    """Counts writes of ``training`` to itself and every submodule; may flip one in forward."""

    writes = 0
    flip_in_forward = False

    def __init__(self) -> None:
        super().__init__()
        for m in self.modules():
            m.__class__ = type(f"Counted{type(m).__name__}", (type(m),), {"__setattr__": _count})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_in_forward:
            self.fc.training = True  # a forward that changes a flag itself
        return super().forward(x)


def _count(self: nn.Module, name: str, value: object) -> None:
    if name == "training" and "training" in self.__dict__:
        _FlagWrites.writes += 1
    nn.Module.__setattr__(self, name, value)


def test_the_solve_is_queued_before_the_value_check_is_read_back() -> None:
    # on a GPU, reading the check's extremes back right after the forward made the device
    # wait while the solve's kernels were launched one by one; now the first read-back of
    # attribute comes after the solve's product (counted on the CPU: the same calls)
    net = PlantedConceptNet().eval()
    x = planted_maps(2, 4, 4)
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0).fit(x, progress=False)
    with CallRecorder() as calls:
        maps = attr.attribute(x)
    names = calls.names
    check = names.index("aminmax", names.index("conv2d"))
    assert "matmul" in names[check : calls.first_read_after(check)]  # the solve, queued first
    assert torch.equal(maps, attr.attribute(x))  # and the result is the same


@pytest.mark.parametrize(
    ("value", "word"), [(float("nan"), "2 NaN and 0 Inf"), (float("inf"), "0 NaN and 2 Inf")]
)
@pytest.mark.parametrize("also", [None, "channels", "solve"])
def test_attribute_reports_bad_activations_before_any_later_error(
    value: float, word: str, also: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the value check is read back after the solve is queued: its error still comes first,
    # also when the channel check or the solve fails in between, and no maps are returned
    net = NonFiniteNet(value)
    x = torch.rand(3, 2, 4, 4)
    attr = NMFConceptAttribution(net, net.relu, n_concepts=1, random_state=0)
    attr.fit(x[:1], progress=False)  # one item: finite (the net spoils item 1 of a batch)
    if also == "channels":
        monkeypatch.setattr(
            attr, "check_channels", lambda c: (_ for _ in ()).throw(ConceptModelMismatchError("x"))
        )
    elif also == "solve":
        monkeypatch.setattr(
            attr.nmf_, "_transform_maps", lambda *a: (_ for _ in ()).throw(RuntimeError("solve"))
        )
    with pytest.raises(NonFiniteActivationError, match=f"{word}.*batch items \\[1\\]"):
        attr.attribute(x)
    monkeypatch.undo()
    assert torch.isfinite(attr.attribute(x[:1])).all()  # a clean batch still solves


def test_a_failed_read_back_fails_again_with_the_same_error() -> None:
    # on a GPU an error of any queued kernel surfaces at the check's read-back; the error
    # handlers finish the check once more, which must raise that error again, not another
    pending = acts.PendingCheck(torch.rand(2, 3, 4, 4), "relu")

    class _Broken:
        def tolist(self) -> list[float]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    pending.extremes = _Broken()  # type: ignore[assignment]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            pending.finish()
    bad = acts.PendingCheck(torch.full((1, 2, 2, 2), float("nan")), "relu")
    for _ in range(2):
        with pytest.raises(NonFiniteActivationError, match="8 NaN and 0 Inf"):
            bad.finish()
    good = acts.PendingCheck(torch.rand(1, 2, 2, 2), "relu")
    good.finish()
    good.finish()  # finished: nothing more to read


class _Wrapper(nn.Module):
    """Holds a model outside its registered modules and switches it in ``train``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.__dict__["inner"] = inner  # not registered: invisible to modules()
        self.relu = nn.ReLU()
        self.seen: list[bool] = []

    def train(self, mode: bool = True) -> _Wrapper:
        self.inner.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.inner.training)
        return self.relu(self.inner.conv(x)).sum(dim=(1, 2, 3))


def test_a_train_override_still_runs_in_an_eval_mode_model() -> None:
    inner = PlantedConceptNet()
    wrapper = _Wrapper(inner).eval()
    inner.train()  # the wrapper's own flags say eval; its train() is what switches inner
    x = planted_maps(2, 4, 4)
    attr = NMFConceptAttribution(wrapper, wrapper.relu, n_concepts=3, random_state=0)
    attr.fit(x, progress=False)
    assert wrapper.seen
    assert not any(wrapper.seen)  # inner ran in eval mode every time


def test_a_model_in_eval_mode_is_not_written_to() -> None:
    # eval() and a full restore wrote every submodule's flag through nn.Module.__setattr__
    # on every call (about 1 ms on EfficientNet-Lite0): an eval-mode model is left alone
    net = _FlagWrites().eval()
    x = planted_maps(2, 4, 4)
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0).fit(x, progress=False)
    _FlagWrites.writes = 0
    attr.attribute(x)
    attr.features(x)
    assert _FlagWrites.writes == 0
    assert training_flags(net) == {name: False for name, _ in net.named_modules()}
    # a forward that flips a flag itself gets it set back, and only that one is written
    net.flip_in_forward = True
    attr.attribute(x)
    assert _FlagWrites.writes == 2  # the forward's flip and the restore
    assert not any(m.training for m in net.modules())
    # a model in train mode: eval inside the call, every flag back afterwards
    net.flip_in_forward = False
    net.train()
    _FlagWrites.writes = 0
    out = attr.attribute(x)
    assert torch.equal(out, attr.attribute(x))  # dropout was off inside the call
    assert all(m.training for m in net.modules())
    assert _FlagWrites.writes > 0


@pytest.mark.parametrize(
    "case",
    ["negative", "nan", "not_executed", "forward_raises", "linear", "tuple", "empty"],
)
def test_every_error_path_restores_flags_and_removes_hooks(case: str) -> None:
    x = torch.rand(2, 2, 4, 4)
    if case == "negative":
        net: nn.Module = SignedNet()
        layer, err, match = net.conv, NegativeActivationError, "negative activations"
    elif case == "nan":
        net = NonFiniteNet()
        layer, err, match = net.relu, NonFiniteActivationError, "NaN"
    elif case == "not_executed":
        net = PlantedConceptNet()
        x = planted_maps(2, 4, 4)
        layer, err, match = net.unused, LayerError, "not executed during the forward pass"
    elif case == "forward_raises":
        net = FailingNet()
        layer, err, match = net.relu, RuntimeError, "boom in forward"
    elif case == "linear":
        net = LinearNet()
        layer, err, match = net.relu, LayerError, "4-D N x C x H x W.*shape \\(2, 3\\)"
    elif case == "tuple":
        net = TupleNet()
        layer, err, match = net.pair, LayerError, "produced 2 tensors"
    else:
        net = PlantedConceptNet()
        x = torch.zeros(0, 3, 4, 4)
        layer, err, match = net.relu, ValueError, "Cannot fit NMFConceptAttribution on 0 samples"
    net.train()
    before = training_flags(net)
    attr = NMFConceptAttribution(net, layer, n_concepts=1, random_state=0)
    with pytest.raises(err, match=match):
        attr.fit(x, progress=False)
    assert training_flags(net) == before
    assert hooks_left(net) == 0
    assert not hasattr(attr, "concepts_")  # a failed fit leaves the instance unfitted


# ------------------------------------------------------------------ bad input
def test_negative_activation_message_names_layer_and_fix() -> None:
    net = SignedNet()
    x = torch.rand(2, 2, 3, 3)
    attr = NMFConceptAttribution(net, net.conv, n_concepts=2)
    with pytest.raises(
        NegativeActivationError,
        match=r"Layer 'conv' produced negative activations \(min=.*% of values < 0\).*"
        r"hook the ReLU.*negative='relu'",
    ):
        attr.fit(x, progress=False)
    relu_attr = NMFConceptAttribution(net, net.conv, n_concepts=2, negative="relu", random_state=0)
    out = relu_attr.fit(x, progress=False).attribute(x)
    assert bool((out >= 0).all())
    # The policy is applied in attribute too.
    relu_attr.negative = "raise"
    with pytest.raises(NegativeActivationError, match="Layer 'conv'"):
        relu_attr.attribute(x)


def test_non_finite_activations_raise_and_leave_input() -> None:
    for value, word in ((float("nan"), "1 NaN|2 NaN"), (float("inf"), "Inf")):
        net = NonFiniteNet(value)
        x = torch.rand(3, 2, 4, 4)
        snapshot = x.clone()
        attr = NMFConceptAttribution(net, net.relu, n_concepts=1)
        with pytest.raises(NonFiniteActivationError, match=f"({word}).*batch items \\[1\\]"):
            attr.fit(x, progress=False)
        assert torch.equal(x, snapshot)


@pytest.mark.parametrize(
    ("k", "err", "match"),
    [
        (0, ValueError, "n_concepts must be >= 1, got 0"),
        (-2, ValueError, "n_concepts must be >= 1, got -2"),
        (2.5, TypeError, "n_concepts must be an int >= 1, got 2.5"),
        ("6", TypeError, "n_concepts must be an int >= 1, got '6'"),
    ],
)
def test_bad_n_concepts(k: object, err: type, match: str) -> None:
    net = PlantedConceptNet()
    with pytest.raises(err, match=match):
        NMFConceptAttribution(net, net.relu, n_concepts=k)  # type: ignore[arg-type]


def test_k_larger_than_channels() -> None:
    net = PlantedConceptNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=6)
    with pytest.raises(ValueError, match="n_concepts=6 exceeds the 5 channels of layer 'relu'"):
        attr.fit(planted_maps(2, 4, 4), progress=False)
    assert not hasattr(attr, "concepts_")


@pytest.mark.parametrize("empty", ["tensor", "list", "dataloader"])
def test_empty_fit_set_raises_and_stays_unfitted(empty: str) -> None:
    net = PlantedConceptNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)
    inputs: object = {
        "tensor": torch.zeros(0, 3, 4, 4),
        "list": [],
        "dataloader": DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4)), batch_size=2),
    }[empty]
    with pytest.raises(ValueError, match="0 samples"):
        attr.fit(inputs, progress=False)  # type: ignore[arg-type]
    with pytest.raises(NotFittedError):
        attr.attribute(planted_maps(1, 4, 4))


def test_attribute_before_fit_is_not_fitted_value_and_attribute_error() -> None:
    net = PlantedConceptNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)
    with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit' or") as info:
        attr.attribute(planted_maps(1, 4, 4))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AttributeError)
    with pytest.raises(NotFittedError):
        attr.assign(planted_maps(1, 4, 4))
    with pytest.raises(NotFittedError):
        attr.save("x.safetensors")


def test_layer_not_in_model_raises_at_construction() -> None:
    net = PlantedConceptNet()
    with pytest.raises(LayerError, match="not a submodule of forward_func"):
        NMFConceptAttribution(net, nn.ReLU(), n_concepts=2)
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module"):
        NMFConceptAttribution(net, "relu", n_concepts=2)  # type: ignore[arg-type]


def test_bad_fit_options(planted: tuple[nn.Module, torch.Tensor]) -> None:
    net, maps = planted
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)
    with pytest.raises(ValueError, match="max_locations_per_batch must be >= 1, got 0"):
        attr.fit(maps, max_locations_per_batch=0, progress=False)
    with pytest.raises(ValueError, match="n_epochs must be >= 1, got 0"):
        attr.fit(maps, n_epochs=0, progress=False)
    with pytest.raises(TypeError, match=r"n_epochs must be an int >= 1, got 1.5 \(float\)"):
        attr.fit(maps, n_epochs=1.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a re-iterable input"):
        attr.fit(iter([maps]), n_epochs=2, progress=False)
    with pytest.raises(TypeError, match="batch of type str"):
        attr.fit(["not a tensor"], progress=False)
    with pytest.raises(ValueError, match="negative must be one of"):
        NMFConceptAttribution(net, net.relu, negative="shift")  # type: ignore[arg-type]


def test_channel_mismatch_at_attribute() -> None:
    net = PlantedConceptNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0)
    attr.fit(planted_maps(2, 4, 4), progress=False)
    other = PlantedConceptNet(torch.rand(3, 7))
    attr.forward_func, attr.layer = other, other.relu
    with pytest.raises(ConceptModelMismatchError, match="expect 5 channels.*produced 7"):
        attr.attribute(planted_maps(1, 4, 4))


def test_progress_bar_can_be_turned_off(
    planted: tuple[nn.Module, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    net, maps = planted
    NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(
        list(maps.split(2)), progress=False
    )
    assert "fit concepts" not in capsys.readouterr().err
    NMFConceptAttribution(net, net.relu, n_concepts=2, random_state=0).fit(
        list(maps.split(2)), progress=True
    )
    assert "fit concepts" in capsys.readouterr().err


# ---------------------------------------------------------- real networks
def test_paper_geometry_vgg16_features_29() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    layer = vgg.features[29]
    assert isinstance(layer, nn.ReLU)
    x = torch.rand(2, 3, 512, 512)
    act = LayerActivation(vgg, layer).attribute(x[:1])
    assert tuple(act.shape) == (1, 512, 32, 32)
    attr = NMFConceptAttribution(vgg, layer, n_concepts=4, random_state=0, max_iter=50)
    attr.fit(x, progress=False)
    assert attr.layer_name_ == "features.29"
    assert attr.n_channels_in_ == 512
    out = attr.attribute(x[:1])
    assert tuple(out.shape) == (1, 4, 32, 32)
    assert bool((out >= 0).all())
    # 512 px / 32 cells = 16 px per cell: interpolate back to the tile.
    assert tuple(LayerAttribution.interpolate(out, (512, 512)).shape) == (1, 4, 512, 512)


def test_real_weights_on_real_he(lite0: nn.Module, he_tiles: torch.Tensor) -> None:
    from captum_nmf.zoo import normalize

    x = normalize(he_tiles)
    attr = NMFConceptAttribution(lite0, lite0.head_relu, n_concepts=6, random_state=0)
    attr.fit(x, progress=False)
    out = attr.attribute(x)
    assert tuple(out.shape) == (8, 6, 7, 7)
    # K non-negative concepts lose little against the best rank-K approximation
    # (truncated SVD, the unconstrained lower bound) of these real activations.
    act = LayerActivation(lite0, lite0.head_relu).attribute(x)
    recon = torch.einsum("nkhw,kc->nchw", out, attr.concepts_)
    rows = act.permute(0, 2, 3, 1).reshape(-1, act.shape[1]).double()
    singular = torch.linalg.svdvals(rows)
    svd_residual = float(torch.sqrt((singular[6:] ** 2).sum()))
    nmf_residual = float(torch.linalg.norm((act - recon).double()))
    assert svd_residual <= nmf_residual <= 1.05 * svd_residual
    assert nmf_residual == pytest.approx(attr.reconstruction_err_, rel=1e-3)
    # Every concept is used somewhere.
    assert set(attr.assign(x).unique().tolist()) >= set(range(6)) - {-1}


def test_cuda_inputs_give_cuda_maps(
    planted: tuple[nn.Module, torch.Tensor], cuda: EmulatedCuda | None
) -> None:
    net, maps = planted
    net = net.cuda()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=3, random_state=0)
    out = attr.fit(maps.cuda(), progress=False).attribute(maps[:2].cuda())
    assert out.device.type == "cuda"
    cpu_net = PlantedConceptNet()
    ref = NMFConceptAttribution(cpu_net, cpu_net.relu, n_concepts=3, random_state=0)
    assert torch.allclose(ref.fit(maps, progress=False).attribute(maps[:2]), out.cpu(), atol=1e-3)


# ------------------------------------------------------------ device options
def conv_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    net.train()  # must be restored after every call
    return net


def relative_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bfloat16_autocast_close_to_float32_and_returns_float32() -> None:
    net = conv_bn_net()
    x = torch.rand(4, 3, 24, 24)
    x_copy = x.clone()
    attr = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    attr.fit(x, progress=False)
    ref_act, ref_out = attr.features(x, return_output=True)
    act, out = attr.features(x, return_output=True, autocast=torch.bfloat16)
    assert act.dtype == out.dtype == torch.float32
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4 %); two convolutions
    # measured 0.4-0.5 % of the largest value. Tolerance: 2 %.
    assert relative_max_error(act, ref_act) < 0.02
    assert relative_max_error(out, ref_out) < 0.02
    maps = attr.attribute(x, autocast=torch.bfloat16)
    assert maps.dtype == torch.float32
    assert relative_max_error(maps, attr.attribute(x)) < 0.05  # NNLS amplifies a little
    fitted = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    fitted.fit([x[:2], x[2:]], autocast=torch.bfloat16, progress=False)
    streamed = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    streamed.fit([x[:2], x[2:]], progress=False)
    cos = (fitted.concepts_ * streamed.concepts_).sum(dim=1)
    assert bool((cos > 0.99).all()), cos
    assert torch.equal(x, x_copy)
    assert net.training
    assert all(m.training for m in net.modules())


def test_channels_last_equals_float32_and_leaves_inputs_and_model_alone() -> None:
    net = conv_bn_net()
    x = torch.rand(4, 3, 24, 24)
    x_copy = x.clone()
    attr = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    attr.fit(x, progress=False)
    act, out = attr.features(x, return_output=True, channels_last=True)
    ref_act, ref_out = attr.features(x, return_output=True)
    torch.testing.assert_close(act, ref_act, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    assert act.is_contiguous()
    torch.testing.assert_close(
        attr.attribute(x, channels_last=True), attr.attribute(x), rtol=0, atol=1e-6
    )
    assert torch.equal(x, x_copy)
    assert x.is_contiguous()  # not converted in place
    assert not x.is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in net.parameters())  # model not converted
    assert net.training


def test_channels_last_model_of_the_caller_works() -> None:
    net = conv_bn_net().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 24, 24)
    attr = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    attr.fit(x, progress=False, channels_last=True, autocast=torch.bfloat16)
    assert attr.attribute(x, channels_last=True).shape == (2, 3, 22, 22)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"autocast": "bf16"}, TypeError, "autocast must be a torch.dtype or None, got 'bf16'"),
        ({"autocast": torch.int32}, ValueError, r"autocast=torch.int32 is not a reduced floating"),
        ({"autocast": torch.float32}, ValueError, "pass autocast=torch.bfloat16"),
        ({"channels_last": 1}, TypeError, "channels_last must be a bool, got 1"),
    ],
)
def test_bad_device_options(kwargs: dict[str, object], err: type, match: str) -> None:
    net = conv_bn_net()
    attr = NMFConceptAttribution(net, net[4], n_concepts=3, random_state=0)
    x = torch.rand(2, 3, 24, 24)
    with pytest.raises(err, match=match):
        attr.fit(x, progress=False, **kwargs)  # type: ignore[arg-type]
    attr.fit(x, progress=False)
    with pytest.raises(err, match=match):
        attr.attribute(x, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(err, match=match):
        attr.features(x, return_output=True, **kwargs)  # type: ignore[arg-type]
    assert net.training


def test_channels_last_needs_a_4d_input() -> None:
    net = TokenNet()
    attr = NMFConceptAttribution(net, net.relu, n_concepts=2)
    with pytest.raises(ValueError, match=r"channels_last=True needs 4-D N x C x H x W inputs"):
        attr.features(torch.rand(2, 16, 3), channels_last=True)


class _TwoInputs(nn.Module):
    def __init__(self, ref_required: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.ref_required = ref_required

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        if ref is None and self.ref_required:
            raise TypeError("forward() missing 1 required positional argument: 'ref'")
        h = self.conv(x) if ref is None else self.conv(x) - self.conv(ref)
        return self.relu(h).mean((1, 2, 3))


def test_a_tuple_of_tensors_is_batches_and_fit_says_so_to_a_captum_user() -> None:
    """``attribute((x, ref))`` is one batch of two inputs (Captum); ``fit((x, ref))`` read it
    as two batches without a word, fitting ``ref`` as if it were images."""
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.rand(2, 4, 3, 4, 4, generator=gen)
    optional = _TwoInputs(ref_required=False)
    with pytest.warns(CaptumNMFWarning, match=r"tuple of 2 tensors as that many batches"):
        NMFConceptAttribution(optional, optional.relu, 2, random_state=0).fit(
            (x, ref), progress=False
        )
    one = NMFConceptAttribution(optional, optional.relu, 2, random_state=0)
    one.fit([(x, ref)], batch_inputs=lambda b: (b[0], b[1]), progress=False)
    assert one.n_samples_seen_ == 4 * 4 * 4  # one batch of 4 tiles
    NMFConceptAttribution(optional, optional.relu, 2, random_state=0).fit(
        [x, ref], progress=False
    )  # a list says batches: no warning
    single = PlantedConceptNet()  # one input: a tuple of tensors can only be batches
    maps = planted_maps(5, 4, 4)
    for model in (single, nn.DataParallel(single)):  # DataParallel's forward takes *inputs
        NMFConceptAttribution(model, single.relu, 2, random_state=0).fit(
            (maps[:3], maps[3:]), progress=False
        )
    required = _TwoInputs(ref_required=True)
    with (
        pytest.warns(CaptumNMFWarning, match="as that many batches"),
        pytest.raises(TypeError, match=r"missing .*'ref' \(fit reads a tuple of 2 tensors as 2 "),
    ):
        NMFConceptAttribution(required, required.relu, 2, random_state=0).fit(
            (x, ref), progress=False
        )
