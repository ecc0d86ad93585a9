"""One capture path: equal to Captum's LayerActivation, a direct LayerError, safe across threads."""

from __future__ import annotations

import threading

import pytest
import torch
from captum.attr import LayerActivation
from torch import nn

from captum_nmf import NMFConceptAttribution
from captum_nmf._utils import activations as acts
from captum_nmf.exceptions import LayerError


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU())


@pytest.mark.parametrize("to_input", [False, True])
def test_capture_equals_layer_activation(to_input: bool) -> None:
    net = conv_net()
    x = torch.rand(2, 3, 7, 7)
    expected = LayerActivation(net, net[2]).attribute(x, attribute_to_layer_input=to_input)
    got = acts.capture(net, net[2], x, attribute_to_layer_input=to_input)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_capture_of_a_data_parallel_model_equals_layer_activation() -> None:
    net = conv_net()
    parallel = nn.DataParallel(net)  # on a CPU-only machine it calls the module itself
    x = torch.rand(3, 3, 6, 6)
    expected = LayerActivation(parallel, net[1]).attribute(x)
    act, out = acts.capture(parallel, net[1], x, return_output=True)
    torch.testing.assert_close(act, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)


def test_return_output_is_the_same_forward() -> None:
    net = conv_net()
    x = torch.rand(1, 3, 5, 5)
    act, out = acts.capture(net, net[1], x, return_output=True)
    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(act, net[1](net[0](x)))


def test_layer_that_did_not_run_is_a_layer_error() -> None:
    net = conv_net()
    idle = nn.ReLU()
    with pytest.raises(LayerError, match="was not executed during the forward pass"):
        acts.capture(lambda x: net(x), idle, torch.rand(1, 3, 5, 5))
    assert not idle._forward_hooks


def test_results_of_several_devices_need_device_ids() -> None:
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    saved = {a: torch.zeros(1), b: torch.ones(1)}
    with pytest.raises(LayerError, match="no device_ids were given"):
        acts._gather(saved, None, "'x'")
    with pytest.raises(LayerError, match=r"device_ids=\[0\] do not all name"):
        acts._gather(saved, [0], "'x'")


def bn_dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(6, 4, 1)
    )
    with torch.no_grad():  # running statistics that eval mode visibly uses
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()


def test_threads_sharing_one_attribution_get_the_sequential_results() -> None:
    net = bn_dropout_net()
    attr = NMFConceptAttribution(net, net[3], n_concepts=3, random_state=0)
    attr.fit(torch.rand(6, 3, 8, 8), progress=False)
    net.train()
    inputs = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [attr.attribute(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for r in range(5):
                results[i, r] = attr.attribute(inputs[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    differ = [k for k, v in results.items() if not torch.equal(v, expected[k[0]])]
    assert len(results) == 40
    assert differ == []
    assert all(m.training for m in net.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


class _Doubler(nn.Module):
    """conv -> relu -> (maybe) an in-place change of the ReLU's output -> mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.change = False
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.relu(self.conv(x))
        if self.change:
            y.mul_(2.0)  # in place, after the hooked layer ran
        return y.mean(dim=(2, 3))


def _expected(net: _Doubler, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.relu(net.conv(x))


def _pointers(layer: nn.Module) -> list[int]:
    seen: list[int] = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.data_ptr()))
    return seen


def test_a_transient_capture_keeps_an_untouched_layer_by_reference_after_one_clone() -> None:
    net = _Doubler()
    seen = _pointers(net.relu)
    x = torch.rand(2, 3, 5, 5)
    first = acts.capture(net, net.relu, x, transient=True)
    second = acts.capture(net, net.relu, x, transient=True)
    third = acts.capture(net, net.relu, x)  # not transient: always a clone, as Captum
    assert first.data_ptr() != seen[0]  # first forward: cloned, and the tensor watched
    assert second.data_ptr() == seen[1]  # known untouched: the layer's own tensor, no copy
    assert third.data_ptr() != seen[2]
    for got in (first, second, third):
        torch.testing.assert_close(got, _expected(net, x), rtol=0, atol=0)
    assert net.calls == 3


def test_an_in_place_change_after_the_layer_is_detected_and_cloned() -> None:
    net = _Doubler()
    x = torch.rand(2, 3, 5, 5)
    acts.capture(net, net.relu, x, transient=True)  # learns: untouched
    net.change = True  # data-dependent: this forward changes the tensor after the hook
    net.calls = 0
    got, out = acts.capture(net, net.relu, x, return_output=True, transient=True)
    torch.testing.assert_close(got, _expected(net, x), rtol=0, atol=0)  # not doubled
    torch.testing.assert_close(out, 2 * _expected(net, x).mean(dim=(2, 3)))
    assert net.calls == 2  # the forward that changed it ran once more, cloning
    net.calls = 0
    again = acts.capture(net, net.relu, x, transient=True)  # from now on cloned: one forward
    torch.testing.assert_close(again, _expected(net, x), rtol=0, atol=0)
    assert net.calls == 1


def test_an_in_place_layer_captured_at_its_input_is_cloned() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True))
    x = torch.rand(1, 3, 4, 4) - 0.5
    with torch.no_grad():
        expected = net[0](x)  # negative values: the in-place ReLU would zero them
    for _ in range(3):
        got = acts.capture(net, net[1], x, attribute_to_layer_input=True, transient=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert (got < 0).any()


def test_a_layer_that_is_the_output_or_the_input_is_not_handed_out_twice() -> None:
    net = conv_net()
    x = torch.rand(1, 3, 5, 5)
    for _ in range(3):  # the last layer: its tensor is the output
        act, out = acts.capture(net, net[3], x, return_output=True, transient=True)
        assert act.data_ptr() != out.data_ptr()
        torch.testing.assert_close(act, out, rtol=0, atol=0)
    for _ in range(3):  # the first layer's input: the caller's tensor
        got = acts.capture(net, net[0], x, attribute_to_layer_input=True, transient=True)
        assert got.data_ptr() != x.data_ptr()
        torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_inference_tensors_are_cloned() -> None:
    net = _Doubler()
    x = torch.rand(1, 3, 4, 4)
    with torch.inference_mode():  # no version counters: never kept by reference
        for _ in range(3):
            got = acts.capture(net, net.relu, x, transient=True)
    torch.testing.assert_close(got, _expected(net, x), rtol=0, atol=0)


class _ReusedBuffer(nn.Module):
    """A layer that writes its output into one tensor it keeps across forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.buf.shape != x.shape:
            self.buf = torch.empty_like(x)
        return torch.clamp(x, min=0.0, out=self.buf)


def test_results_kept_across_forwards_are_copies_even_when_the_model_reuses_its_tensor() -> None:
    # features() (and fit) hand activations to callers that keep them: never the layer's
    # own tensor, which this model overwrites on its next forward
    torch.manual_seed(2)
    layer = _ReusedBuffer()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), layer, nn.Conv2d(4, 2, 1))
    concepts = NMFConceptAttribution(net, layer, 2, random_state=0)
    inputs = [torch.rand(1, 3, 4, 4) for _ in range(4)]
    results = [acts.capture(net, layer, x) for x in inputs]
    results += [concepts.features(x) for x in inputs]
    with torch.no_grad():
        expected = [torch.relu(net[0](x)) for x in inputs] * 2
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_attribute_on_a_reused_tensor_is_solved_before_the_next_forward() -> None:
    torch.manual_seed(3)
    layer = _ReusedBuffer()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), layer, nn.Conv2d(4, 2, 1))
    x = torch.rand(6, 3, 5, 5)
    concepts = NMFConceptAttribution(net, layer, 2, random_state=0).fit(x, progress=False)
    maps = [concepts.attribute(x[i : i + 1]) for i in range(6)]  # transient: by reference
    torch.testing.assert_close(torch.cat(maps), concepts.attribute(x), rtol=1e-6, atol=1e-7)


def test_threads_sharing_a_model_that_reuses_its_tensor_get_the_sequential_results() -> None:
    # attribute keeps the layer's own tensor (transient) and solves it holding the model's
    # lock: another thread's forward cannot overwrite the buffer in between
    torch.manual_seed(3)
    layer = _ReusedBuffer()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), layer, nn.Conv2d(4, 2, 1))
    x1, x2 = torch.rand(1, 3, 5, 5), torch.rand(1, 3, 5, 5)
    concepts = NMFConceptAttribution(net, layer, 2, random_state=0)
    concepts.fit(torch.cat([x1, x2]), progress=False)
    concepts.attribute(x1)  # learns: untouched, so later calls keep the reference
    expected = {1: concepts.attribute(x1), 2: concepts.attribute(x2)}
    solve = concepts.nmf_._transform_maps
    other: dict[int, torch.Tensor] = {}
    thread = threading.Thread(target=lambda: other.setdefault(2, concepts.attribute(x2)))

    def interleaved(act: torch.Tensor, *pending: object) -> torch.Tensor:
        if not thread.is_alive() and not other:  # between A's capture and A's solve:
            thread.start()  # B's attribute runs now, or waits for A's lock
            thread.join(timeout=0.5)
        return solve(act, *pending)  # type: ignore[arg-type]

    concepts.nmf_._transform_maps = interleaved  # type: ignore[method-assign]
    got = concepts.attribute(x1)
    thread.join()
    torch.testing.assert_close(got, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(other[2], expected[2], rtol=0, atol=0)


def test_sparse_tensors_around_a_transient_capture() -> None:
    class WithMask(nn.Module):  # a sparse extra argument and a sparse part of the output
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.relu(self.conv(x))
            return y.mean(dim=(2, 3)), mask

    net = WithMask()
    x = torch.rand(2, 3, 4, 4)
    mask = torch.eye(3).to_sparse()
    concepts = NMFConceptAttribution(net, net.relu, 2, random_state=0)
    concepts.fit(x, additional_forward_args=(mask,), progress=False)
    first = concepts.attribute(x, additional_forward_args=(mask,))
    for _ in range(2):  # the second call keeps the reference and checks around sparse tensors
        torch.testing.assert_close(
            concepts.attribute(x, additional_forward_args=(mask,)), first, rtol=0, atol=0
        )


# ---------------------------------------------------------- the value check
def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t`` (N x C x h x w) contiguous, channels-last, cropped (not dense) and expanded."""
    return {
        "contiguous": t,
        "channels_last": t.contiguous(memory_format=torch.channels_last),
        "cropped": t.contiguous(memory_format=torch.channels_last)[:, :, 1:-1, 1:-1],
        "expanded": t[:1, :, :1].expand(3, -1, 4, -1),
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped", "expanded"])
def test_value_range_is_the_minimum_and_maximum_in_every_layout(layout: str) -> None:
    from captum_nmf._utils.validation import value_range

    t = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).reshape(2, 5, 4, 3) - 7.0
    x = _layouts(t)[layout]
    assert value_range(x).tolist() == [float(x.min()), float(x.max())]
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone(memory_format=torch.preserve_format)
        y[1, 3, 1, 0] = bad
        low, high = value_range(y).tolist()
        assert not (torch.isfinite(torch.tensor([low, high])).all()), (bad, low, high)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (float("nan"), "NonFiniteActivationError", r"1 NaN and 0 Inf"),
        (float("inf"), "NonFiniteActivationError", r"0 NaN and 1 Inf"),
        (-2.5, "NegativeActivationError", r"min=-2\.5"),
    ],
)
def test_activations_of_any_layout_are_checked(
    layout: str, value: float, error: str, match: str
) -> None:
    # the check reduces a dense tensor in its memory order: channels-last activations
    # with one bad value anywhere are refused exactly as contiguous ones
    from captum_nmf import exceptions

    act = _layouts(torch.rand(2, 5, 6, 6, generator=torch.Generator().manual_seed(0)))[layout]
    assert acts.check_activations(act, negative="raise", name="x") is act  # clean: passed as is
    act = act.clone(memory_format=torch.preserve_format)
    act[1, 4, 3, 2] = value
    with pytest.raises(getattr(exceptions, error), match=match):
        acts.check_activations(act, negative="raise", name="x")


def test_bf16_on_a_gpu_without_it_is_a_value_error_naming_float16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch raises RuntimeError ("Current CUDA Device does not support bfloat16") for bf16
    autocast on a GPU older than Ampere, where the check only caught its warnings."""

    def autocast(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Current CUDA Device does not support bfloat16. Please switch dtype")

    acts._autocast_supported.cache_clear()
    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: True)
    try:
        with pytest.raises(ValueError, match=r"older than Ampere\); pass autocast=torch.float16"):
            acts.check_device_options(torch.bfloat16, False, device_type="cuda")
    finally:
        acts._autocast_supported.cache_clear()
