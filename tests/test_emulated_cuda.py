"""The emulated CUDA device of the tests: each of CUDA's rules it claims, enforced.

The CUDA tests of this suite run on it where no GPU is lent (CI). They can only
catch what it catches, so each rule is shown here to fail code that breaks it,
including the line that crashed the first real CUDA call of our NNLS.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.emulated_cuda import emulated_cuda

MIXED = r"Expected all tensors to be on the same device, but found at least two devices"


def test_device_tensors_say_cuda_and_come_back_as_host_copies() -> None:
    with emulated_cuda() as mode:
        host = torch.arange(6.0).reshape(2, 3)
        x = host.to("cuda")
        assert x.device == torch.device("cuda", 0)
        assert x.is_cuda
        assert x.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
        for made in (x * 2, x.sum(), x.T, x[0], x.float(), torch.zeros_like(x), x.new_ones(3)):
            assert made.device.type == "cuda"
        for made in (
            torch.zeros(3, device="cuda"),
            torch.ones(2, device=x.device),
            host.cuda(),
            host.to(x),
            torch.as_tensor(np.ones(3), device="cuda"),
        ):
            assert made.device.type == "cuda"
        back = x.cpu()
        assert back.device.type == "cpu"
        assert not back.is_cuda
        assert torch.equal(back, host)
        assert x.to("cpu", torch.float64).device.type == "cpu"
        assert host.device.type == "cpu"  # the source stays where it was
        assert mode.calls > 0
    with pytest.raises(RuntimeError, match="invalid device ordinal"), emulated_cuda():
        host.to("cuda:1")


def test_mixing_devices_raises_as_cuda_does() -> None:
    with emulated_cuda():
        x = torch.rand(4, 3, device="cuda")
        cpu = torch.rand(4, 3)
        for call in (
            lambda: x + cpu,
            lambda: cpu * x,
            lambda: torch.cat([x, cpu]),
            lambda: torch.cat(tensors=(x, cpu)),  # tensors in a keyword's tuple
            lambda: torch.stack(tensors=[x, cpu], dim=0),  # ... and in its list
            lambda: x @ cpu.T,
            lambda: torch.where(x > 0, x, cpu),
            lambda: cpu + x.sum(),  # a device scalar does not join host tensors
            lambda: nn.Linear(3, 2)(x),  # a model left on the host
        ):
            with pytest.raises(RuntimeError, match=MIXED):
                call()
        # what CUDA allows: host 0-dim tensors and Python numbers, host indices, copies
        assert (x + torch.tensor(2.0)).device.type == "cuda"
        assert x[torch.tensor([0, 2])].shape == (2, 3)
        x[torch.tensor([1])] = 0.0
        x.copy_(cpu)
        assert torch.equal(x.cpu(), cpu)


def test_numpy_of_a_device_tensor_raises() -> None:
    with emulated_cuda():
        x = torch.rand(3, device="cuda")
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            np.asarray(x)
        assert x.cpu().numpy().shape == (3,)
        assert isinstance(x.sum().item(), float)  # .item() and .tolist() work (they synchronise)


def test_an_integer_matmul_on_the_device_raises_like_our_first_nnls_did() -> None:
    with emulated_cuda():
        passive = torch.rand(5, 4, device="cuda") > 0.5
        bits = torch.ones(4, dtype=torch.long, device="cuda") << torch.arange(4, device="cuda")
        with pytest.raises(NotImplementedError, match=r"not implemented for 'Int64'"):
            passive.long() @ bits  # the line that crashed on the H200
        codes = (passive.long() * bits).sum(1)  # its replacement
        assert codes.device.type == "cuda"
        assert (torch.rand(2, 3, device="cuda") @ torch.rand(3, 2, device="cuda")).is_cuda


def test_device_random_numbers_need_a_device_generator() -> None:
    gen = torch.Generator().manual_seed(0)
    with emulated_cuda():
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.rand(3, device="cuda", generator=gen)
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.rand(3, device="cuda").uniform_(generator=gen)
        # drawn on the host, then moved: the pattern the library uses
        assert torch.rand(3, generator=gen).to("cuda").is_cuda


def test_threads_started_inside_follow_the_same_rules() -> None:
    seen: list[object] = []
    with emulated_cuda():
        x = torch.rand(3, device="cuda")

        def work() -> None:
            seen.append((x * 2).device)
            try:
                x + torch.rand(3)
            except RuntimeError as exc:
                seen.append(str(exc))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert seen[0] == torch.device("cuda", 0)
    assert "same device" in str(seen[1])


def test_models_gradients_and_pinned_batches() -> None:
    with emulated_cuda():
        net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).to("cuda")
        assert all(p.device.type == "cuda" for p in net.parameters())
        x = torch.rand(1, 3, 5, 5, device="cuda", requires_grad=True)
        out = net(x)
        assert out.device.type == "cuda"
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.device.type == "cuda"
        net(x).sum().backward()
        assert net[0].weight.grad is not None
        assert net[0].weight.grad.device.type == "cuda"
        pinned = torch.empty(2, 3, pin_memory=True)
        assert pinned.device.type == "cpu"
        assert torch.rand(3).pin_memory().device.type == "cpu"
        with pytest.raises(RuntimeError, match="cannot pin"):
            x.pin_memory()


def test_freed_device_memory_is_forgotten() -> None:
    """The allocator may give a freed device tensor's address to a host one: not marked then."""
    with emulated_cuda() as mode:
        x = torch.rand(1000, device="cuda")
        ptr = x.untyped_storage().data_ptr()
        view = x[10:]
        del x
        gc.collect()
        assert ptr in mode._storages  # the view keeps the memory alive
        del view
        gc.collect()
        assert ptr not in mode._storages


def test_outside_the_block_nothing_is_emulated() -> None:
    originals = torch.cuda.is_available, torch.accelerator.is_available, threading.Thread.run
    with emulated_cuda():
        assert torch.cuda.is_available()
        x = torch.rand(3, device="cuda")
    assert (torch.cuda.is_available, torch.accelerator.is_available, threading.Thread.run) == (
        originals
    )
    assert x.device.type == "cpu"  # a tensor made inside is an ordinary CPU tensor outside


def test_host_scalars_only_as_one_operand_of_an_elementwise_op() -> None:
    with emulated_cuda():
        x = torch.rand(4, device="cuda")
        one = torch.tensor(1.0)
        assert (x * one).is_cuda
        assert torch.where(x > 0.5, one, torch.tensor(0.0)).is_cuda
        for call in (
            lambda: torch.stack([x.sum(), one]),  # no TensorIterator: every argument checked
            lambda: torch.clamp(x, min=one),
            lambda: torch.index_select(x, 0, torch.tensor(0)),
            lambda: torch.addcmul(x, one, torch.tensor(2.0)),  # two host scalars
        ):
            with pytest.raises(RuntimeError, match=MIXED):
                call()
        total = torch.tensor(0.0)
        with pytest.raises(RuntimeError, match=MIXED):
            total += x.sum()  # a host tensor written in place with a device value
        assert total.device.type == "cpu"  # and left a host tensor


def test_indexing_rules() -> None:
    with emulated_cuda():
        x = torch.zeros(4, device="cuda")
        host = torch.zeros(4)
        x[torch.tensor([0, 1])] = torch.tensor(5.0)  # one host element: taken as a scalar
        x[0:2] = torch.ones(2)  # basic slicing is a copy: any device
        with pytest.raises(RuntimeError, match="expected them on cuda:0"):
            x[torch.tensor([0, 1])] = torch.ones(2)
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            host[torch.tensor([0], device="cuda")]
        assert x[torch.tensor([2, 3])].is_cuda


def test_what_stays_on_the_host_and_the_false_alarms_avoided() -> None:
    with emulated_cuda():
        x = torch.rand(3, device="cuda")
        assert torch.tensor([x.sum().item(), 1.0]).device.type == "cpu"
        assert torch.tensor([x[0], x[1]]).device.type == "cpu"  # a sequence: the default device
        with pytest.warns(UserWarning, match="copy construct"):
            assert torch.tensor(x).is_cuda  # a tensor: where it is
        assert not torch.empty(2, device="meta").is_cuda
        x.to("meta")
        assert not torch.empty(2, device="meta").is_cuda
        assert torch.rand(3).type_as(x).is_cuda
        assert x.numpy(force=True).shape == (3,)


def test_autocast_on_the_device_casts() -> None:
    with emulated_cuda():
        conv = nn.Conv2d(3, 4, 1).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = conv(torch.rand(1, 3, 4, 4, device="cuda"))
        assert out.dtype == torch.bfloat16
        assert out.is_cuda


def test_every_tensor_of_a_call_is_seen_however_nested() -> None:
    """The mode's own walk finds what ``torch.utils._pytree`` finds, in the same order."""
    from collections import OrderedDict, namedtuple

    from torch.utils._pytree import tree_flatten

    from tests.helpers.emulated_cuda import _call_tensors, _tensors

    a, b, c, d, e = (torch.full((1,), float(i)) for i in range(5))
    pair = namedtuple("pair", "first second")
    value = ([a, (b, {"k": [c]})], OrderedDict(x=pair(d, "text")), 3, None, torch.Size([2]))
    expected = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    assert [t is u for t, u in zip(_tensors(value), expected, strict=True)] == [True] * 4
    found = _call_tensors((value, e), {"out": [a], "dim": 0})
    assert [float(t) for t in found] == [0, 1, 2, 3, 4, 0]
