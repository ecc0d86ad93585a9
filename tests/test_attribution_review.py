"""Fixes from the hostile review of the attribution (2026-12-07, third session).

The model behind a function ``forward_func``; a module's own ``train`` called back; a module
run twice in one forward; dict outputs cloned; wrapper prefixes in layer names; NumPy
hyper-parameters and tampered metadata in concept files; messages.
"""

from __future__ import annotations

import functools
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_nmf import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf.exceptions import (
    CaptumNMFWarning,
    ConceptModelFormatError,
    LayerError,
    NotFittedError,
)
from captum_nmf.io import content_digest
from captum_nmf.zoo import imagenet_normalize, normalize
from tests.helpers.basic_models import hooks_left
from tests.helpers.emulated_cuda import emulated_cuda


def _bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


X = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class _Holder:
    """A plain object holding the model, whose method is the forward function."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


MODEL_IN_GLOBAL = _bn_net()


def _global_forward(x: torch.Tensor) -> torch.Tensor:
    return MODEL_IN_GLOBAL(x).softmax(1)


def _forwards(model: nn.Module) -> dict[str, object]:
    def closure(x: torch.Tensor) -> torch.Tensor:
        return model(x).softmax(1)

    return {
        "closure": closure,
        "default argument": lambda x, m=model: m(x).softmax(1),
        "partial": functools.partial(lambda m, x: m(x).softmax(1), model),
        "method of a plain object": _Holder(model).predict,
        "partial of the model's forward": functools.partial(model.forward),
    }


@pytest.mark.parametrize(
    "kind", ["closure", "default argument", "partial", "method", "partial of the model's forward"]
)
def test_the_model_behind_a_function_runs_in_eval_mode(kind: str) -> None:
    # before: only the layer was put in eval mode; a BatchNorm model left in train mode
    # updated its running statistics and gave batch-dependent maps
    model = _bn_net().train()
    key = "method of a plain object" if kind == "method" else kind
    forward = _forwards(model)[key]
    stats = model[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptumNMFWarning)  # the model is found: no warning
        attr = NMFConceptAttribution(forward, model[4], n_concepts=3, random_state=0)  # type: ignore[arg-type]
    attr.fit(X, progress=False)
    torch.testing.assert_close(attr.attribute(X)[:2], attr.attribute(X[:2]))
    assert torch.equal(model[1].running_mean, stats)
    assert all(m.training for m in model.modules())  # the caller's mode is back
    assert acts.models_of(forward, model[4]) == [model]  # type: ignore[arg-type]
    assert attr.layer_name_ == "4"


def test_a_global_model_is_found_and_fingerprinted() -> None:
    attr = NMFConceptAttribution(_global_forward, MODEL_IN_GLOBAL[4], n_concepts=2, random_state=0)
    attr.fit(X, progress=False)
    before = attr.model_fingerprint(cached=False)
    with torch.no_grad():
        MODEL_IN_GLOBAL[0].weight.mul_(3)  # weights before the layer: the layer's own are unchanged
    try:
        assert attr.model_fingerprint(cached=False) != before  # was the layer's weights only
    finally:
        with torch.no_grad():
            MODEL_IN_GLOBAL[0].weight.div_(3)


def test_a_function_without_a_visible_model_warns() -> None:
    models = {"a": _bn_net()}
    relu = models["a"][4]
    with pytest.warns(
        CaptumNMFWarning, match=r"finds no model holding layer ReLU.*cover the layer"
    ):
        NMFConceptAttribution(lambda x: models["a"](x), relu, n_concepts=2)


def test_batches_go_to_the_device_of_the_model_behind_a_function() -> None:
    with emulated_cuda():
        model = _bn_net().eval().to("cuda")
        forward = _forwards(model)["default argument"]
        attr = NMFConceptAttribution(forward, model[4], n_concepts=2, random_state=0)  # type: ignore[arg-type]
        loader = DataLoader(TensorDataset(X, torch.zeros(8)), batch_size=4)
        attr.fit(loader, progress=False)  # CPU batches: moved to the model's device
        assert attr.concepts_.device.type == "cuda"


class _Finetune(nn.Module):
    """``train`` also switches ``requires_grad`` of the backbone (a common fine-tuning pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _bn_net()

    def train(self, mode: bool = True) -> _Finetune:
        super().train(mode)
        for p in self.backbone.parameters():
            p.requires_grad_(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_a_train_override_is_called_back_with_the_saved_mode() -> None:
    model = _Finetune().train()
    attr = NMFConceptAttribution(model, model.backbone[4], n_concepts=2, random_state=0)
    attr.fit(X, progress=False)
    attr.attribute(X)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())  # was left False by eval()


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.relu = nn.ReLU()  # after both convolutions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x)))).mean(dim=(2, 3))


def test_a_module_run_twice_in_one_forward_is_refused() -> None:
    # before: the last call was taken silently (8 x 8 here), as Captum's LayerActivation does
    model = _Reused()
    attr = NMFConceptAttribution(model, model.relu, n_concepts=2)
    with pytest.raises(
        LayerError,
        match=r"'relu' ran 2 times in one forward pass with different outputs \(\(8, 4, 12, "
        r"12\), \(8, 4, 6, 6\)\).*pass a module that runs once",
    ):
        attr.fit(X, progress=False)
    assert hooks_left(model) == 0


class _Block(nn.Module):
    """A torchvision BasicBlock's shape: one ReLU object after the first conv and the sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def _edited(path: Path, edit: dict[str, str | None]) -> Path:
    """``path`` with metadata keys set (None: removed) and a digest that matches again."""
    with safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {"concepts": handle.get_tensor("concepts")}
    meta.pop("content_sha256")
    for key, value in edit.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    meta["content_sha256"] = content_digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_a_module_reused_at_one_shape_gives_its_last_call_as_captum() -> None:
    block = _Block().eval()
    attr = NMFConceptAttribution(block, block.relu, n_concepts=2, random_state=0)
    with torch.no_grad():
        expected = block(X)  # the block's output: the ReLU's last call
    assert torch.equal(attr.features(X), expected)


def test_a_saved_wrapper_prefix_still_matches(tmp_path: Path) -> None:
    # files written before the names were recorded without module. / _orig_mod.
    model = _bn_net().eval()
    attr = NMFConceptAttribution(model, model[4], n_concepts=2, random_state=0).fit(
        X, progress=False
    )
    path = _edited(attr.save(tmp_path / "c.safetensors"), {"layer_name": "module.4"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMFConceptAttribution.load(path, model, model[4], strict=True)
        NMFConceptAttribution.load(path, nn.DataParallel(model), model[4], strict=True)


class _DictBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.relu(self.conv(x)) + 1.0}


class _Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = _DictBackbone()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)["out"]
        features.mul_(0.5)  # in place after the layer
        return self.head(features).mean(dim=(2, 3))


def test_tensors_in_a_dict_output_are_cloned() -> None:
    model = _Segmenter().eval()
    attr = NMFConceptAttribution(
        model, model.backbone, n_concepts=2, reshape_transform=lambda d: d["out"]
    )
    with torch.no_grad():
        truth = model.backbone(X)["out"]
    assert torch.equal(attr.features(X), truth)  # was the halved tensor


def test_wrapper_prefixes_are_not_part_of_the_layer_name(tmp_path: Path) -> None:
    model = _bn_net().eval()
    wrapped = nn.DataParallel(model)  # on the CPU it calls the model itself
    attr = NMFConceptAttribution(wrapped, model[4], n_concepts=2, random_state=0)
    attr.fit(X, progress=False)
    assert attr.layer_name_ == "4"  # was "module.4"
    path = attr.save(tmp_path / "c.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = NMFConceptAttribution.load(path, model, model[4], strict=True)
    torch.testing.assert_close(loaded.attribute(X), attr.attribute(X))


def test_numpy_hyper_parameters_are_saved_as_numbers(tmp_path: Path) -> None:
    model = _bn_net().eval()
    attr = NMFConceptAttribution(
        model,
        model[4],
        n_concepts=2,
        random_state=np.int64(7),  # type: ignore[arg-type]
        max_iter=np.int64(50),  # type: ignore[arg-type]
        forget_factor=np.float32(1.0),  # type: ignore[arg-type]
        tol=np.float64(1e-4),  # type: ignore[arg-type]
    ).fit(X, progress=False)
    path = attr.save(tmp_path / "c.safetensors")  # raised: int64 is not JSON serializable
    loaded = NMFConceptAttribution.load(path, model, model[4])
    assert loaded.random_state == 7  # was dropped (None): a refit did not reproduce
    assert (loaded.max_iter, loaded.forget_factor) == (50, 1.0)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"n_samples_seen": "many"}, r"unreadable metadata 'n_samples_seen' \('many'"),
        ({"reconstruction_err": "n/a"}, r"unreadable metadata 'reconstruction_err'"),
        ({"solver": "[]"}, r"unreadable metadata 'solver' \('\[\]': a JSON object was expected"),
        ({"attribute_to_layer_input": '"false"'}, r"'attribute_to_layer_input'.*true or false"),
        ({"n_channels": None}, r"incomplete metadata \(no 'n_channels'\)"),
    ],
)
def test_tampered_metadata_with_a_matching_digest_is_refused_naming_the_key(
    tmp_path: Path, edit: dict[str, str | None], match: str
) -> None:
    # a consistent digest (an older file has none): the values themselves must be checked
    model = _bn_net().eval()
    attr = NMFConceptAttribution(model, model[4], n_concepts=2, random_state=0).fit(
        X, progress=False
    )
    path = _edited(attr.save(tmp_path / "c.safetensors"), edit)
    with pytest.raises(ConceptModelFormatError, match=match):
        NMFConceptAttribution.load(path, model, model[4])


def test_constructor_messages_name_the_value_and_the_fix() -> None:
    model = _bn_net()
    with pytest.raises(TypeError, match=r"got str '4'; .*model\.get_submodule\('4'\)"):
        NMFConceptAttribution(model, "4", n_concepts=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"reshape_transform must be callable or None, got str "):
        NMFConceptAttribution(model, model[4], reshape_transform="tokens")  # type: ignore[arg-type]


def test_a_dict_batch_names_its_keys_and_the_fix() -> None:
    model = _bn_net()
    attr = NMFConceptAttribution(model, model[4], n_concepts=2)
    with pytest.raises(
        TypeError, match=r"type dict with keys \['image', 'label'\]; pass batch_inputs=lambda b: b"
    ):
        attr.fit([{"image": X, "label": torch.zeros(8)}], progress=False)


@pytest.mark.parametrize("fn", [normalize, imagenet_normalize])
def test_normalisers_refuse_integer_images(fn: object) -> None:
    images = (X * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"got torch.uint8; pass images.float\(\) / 255"):
        fn(images)  # type: ignore[operator]
    assert torch.isfinite(fn(images.float() / 255)).all()  # type: ignore[operator]


def test_json_of_saved_solver_settings_is_plain(tmp_path: Path) -> None:
    model = _bn_net().eval()
    attr = NMFConceptAttribution(model, model[4], n_concepts=2, random_state=np.int32(3))  # type: ignore[arg-type]
    path = attr.fit(X, progress=False).save(tmp_path / "c.safetensors")
    with safe_open(str(path), "pt") as handle:
        solver = json.loads(handle.metadata()["solver"])
    assert solver["random_state"] == 3
    assert isinstance(solver["max_iter"], int)


# ------------------------------- review of 2026-12-07 (fourth session): foreign forwards
class _Crossed(nn.Module):
    """After its own ReLU call, another thread runs the same ReLU on other values (Captum's
    ``LayerGradCam`` in a viewer thread, which does not take our lock), before the forward
    returns: the hook saw both calls and kept the last, the other thread's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.other = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        if self.other:
            thread = threading.Thread(target=lambda: self.relu(torch.rand_like(y) + 5.0))
            thread.start()
            thread.join()
        return y.mean(dim=(2, 3))


def _crossed_fitted() -> tuple[_Crossed, torch.Tensor, NMFConceptAttribution]:
    """A seeded ``_Crossed`` model in eval mode, a batch, and two concepts fitted on it."""
    torch.manual_seed(0)
    model = _Crossed().eval()
    x = torch.rand(4, 3, 6, 6)
    attr = NMFConceptAttribution(model, model.relu, n_concepts=2, random_state=0)
    return model, x, attr.fit(x, progress=False)


def test_another_threads_forward_of_the_layer_is_not_captured() -> None:
    model, x, attr = _crossed_fitted()
    alone = attr.attribute(x)
    model.other = True
    assert torch.equal(attr.attribute(x), alone)
    assert torch.equal(attr.features(x), NMFConceptAttribution(model, model.relu).features(x))


def test_a_capture_nested_in_the_forward_keeps_its_own_call() -> None:
    """A user's hook that calls attribute on a reference batch: the outer call got its maps."""
    model, x, attr = _crossed_fitted()
    reference = torch.rand(4, 3, 6, 6)
    alone, inner_alone = attr.attribute(x), attr.attribute(reference)
    inner: list[torch.Tensor] = []
    busy: list[bool] = []

    def monitor(*_: object) -> None:
        if not busy:  # once, not from the nested forward itself
            busy.append(True)
            inner.append(attr.attribute(reference))

    handle = model.conv.register_forward_hook(monitor)
    try:
        outer = attr.attribute(x)
    finally:
        handle.remove()
    assert torch.equal(inner[0], inner_alone)
    assert torch.equal(outer, alone)


# --------------------------- review of 2026-12-07 (fourth session): eval-mode bookkeeping
def _backboned() -> nn.Module:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(backbone, nn.Flatten(), nn.LazyLinear(2)).train()


@pytest.mark.parametrize("order", ["nested", "crossed"])
def test_calls_on_a_model_and_its_backbone_leave_the_training_flags_as_found(order: str) -> None:
    """Two attributions, one on the model and one on its backbone, hold different locks. In
    threads, the second saved the flags the first had switched off, and set them back: the
    model was left in eval mode (t2: every trial)."""
    model = _backboned()
    model(torch.rand(1, 3, 4, 4))  # the lazy layer
    outer = acts.eval_mode([model])
    inner = acts.eval_mode([model[0]])
    outer.__enter__()
    inner.__enter__()
    assert not any(m.training for m in model.modules())
    if order == "nested":
        inner.__exit__(None, None, None)
        assert not any(m.training for m in model.modules())  # the model's call still holds
        outer.__exit__(None, None, None)
    else:
        outer.__exit__(None, None, None)
        assert not any(m.training for m in model[0].modules())  # the backbone's call holds
        assert model.training  # what no call holds is set back
        assert model[2].training
        inner.__exit__(None, None, None)
    assert all(m.training for m in model.modules())
    assert acts._EVAL_CALLS == []


def test_ctrl_c_while_the_flags_are_set_back_leaves_them_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C inside the restore left modules in eval mode (15 of 1,500 random tries)."""
    import os
    import signal

    model = _backboned()
    model(torch.rand(1, 3, 4, 4))
    restore = acts._restore_training

    def interrupted(*args: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the restore runs
        for _ in range(1000):  # bytecodes at which Python would raise it
            pass
        restore(*args)

    monkeypatch.setattr(acts, "_restore_training", interrupted)
    with pytest.raises(KeyboardInterrupt), acts.eval_mode([model]):
        pass
    assert all(m.training for m in model.modules())
    # another exception raised inside the restore: the restore is done again, then it is raised
    calls: list[int] = []

    def failing_once(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a signal handler's error")
        restore(*args)

    monkeypatch.setattr(acts, "_restore_training", failing_once)
    with pytest.raises(RuntimeError, match="a signal handler's error"), acts.eval_mode([model]):
        pass
    assert all(m.training for m in model.modules())
    assert acts._EVAL_CALLS == []


def test_explaining_while_the_same_object_is_refitted_uses_the_previous_concepts() -> None:
    """fit removed the concepts when it started: a server thread's attribute got 'not fitted
    yet, call fit' for the whole refit. They now stay until the new ones are ready."""
    _, x, attr = _crossed_fitted()
    before = attr.attribute(x)
    during: list[torch.Tensor] = []

    def batches() -> Any:
        for i in range(3):
            during.append(attr.attribute(x))  # another thread's call, between two batches
            yield torch.rand(4, 3, 6, 6) + i

    attr.fit(batches(), progress=False)
    assert all(torch.equal(maps, before) for maps in during)
    assert not torch.equal(attr.attribute(x), before)
    with pytest.raises(ValueError, match="0 samples"):
        attr.fit(iter([]), progress=False)
    with pytest.raises(NotFittedError):  # a fit that raises leaves the instance unfitted
        attr.attribute(x)


def test_a_forward_func_that_runs_the_model_in_a_worker_thread_is_captured() -> None:
    """An executor or timeout wrapper: the layer runs in the pool's thread, which has no
    capture of its own; the first version of the thread filter dropped its call."""
    import concurrent.futures

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    x = torch.rand(6, 3, 8, 8)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attr = NMFConceptAttribution(
            lambda t: pool.submit(net, t).result(), net[1], n_concepts=3, random_state=0
        )
        attr.fit(x, progress=False)  # the forward runs outside this thread's no_grad
        direct = NMFConceptAttribution(net, net[1], n_concepts=3, random_state=0)
        direct.fit(x, progress=False)
        assert torch.equal(attr.concepts_, direct.concepts_)
        assert torch.equal(attr.attribute(x), direct.attribute(x))
