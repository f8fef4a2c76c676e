"""Tests for robustclip.models: registry, methods, wrapper names, Miyato scaling."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustclip import SpectralClip
from robustclip.errors import RobustclipError
from robustclip.data import synthetic
from robustclip.models import (METHODS, MODELS, TRACKING_ONLY, ConvBN, Normalize, build_model,
                               wrappers)
from helpers import host_syncs

SMALL = {"simpleconv": {"channels": 4}, "simpleconv-composite": {"channels": 4},
         "mnist-cnn": {"width": 4}, "resnet18": {"width": 4}, "dla": {"width": 2},
         "lipnet": {"width": 2, "hidden": 8}, "lipnet-composite": {"width": 2, "hidden": 8},
         "smallcnn": {"width": 2, "hidden": 8}}
DATASET = {"simpleconv": "mnist", "simpleconv-composite": "mnist", "mnist-cnn": "mnist",
           "resnet18": "cifar10", "dla": "cifar10", "lipnet": "mnist", "lipnet-composite": "mnist",
           "smallcnn": "mnist"}



def _unwrapped_paths(name: str) -> set[str]:
    return {n for n, _ in build_model(name, DATASET[name], **SMALL[name]).named_modules()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_model_and_method_builds_and_runs(name, method):
    if method == "fastclip-composite" and name in ("simpleconv", "lipnet", "smallcnn"):
        pytest.skip(f"{name} has no composite (tested below)")
    model = build_model(name, DATASET[name], method, {"clip": 1.0}, **SMALL[name])
    shape = (1, 28, 28) if DATASET[name] == "mnist" else (3, 32, 32)
    assert model.eval()(torch.rand(2, *shape)).shape == (2, 10)
    names = [w.name for w in wrappers(model)]
    assert set(names) <= _unwrapped_paths(name)  # qualified paths of the unwrapped model
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in build_model(name, DATASET[name], **SMALL[name]).modules())
    composites = sum(isinstance(m, ConvBN) for m in build_model(name, DATASET[name], **SMALL[name]).modules())
    expected = {"none": convs, "miyato": convs, "fastclip": convs, "gouk": convs,
                "fastclip-composite": convs + composites}[method]
    assert len(names) == expected
    assert all((w.clip is None) == (method in TRACKING_ONLY) for w in wrappers(model))


@pytest.mark.parametrize("method", TRACKING_ONLY)
def test_tracking_only_wrappers_change_no_bit_of_training(method):
    """none and miyato track each layer's sigma, and train exactly as the plain model:
    the same outputs, weights and BatchNorm statistics, bit for bit, step after step."""
    x, y = synthetic(32, seed=0).tensors

    def run(track: bool) -> tuple[nn.Module, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model("simpleconv", "mnist", method, {"clip": 0.5, "iters_per_step": 2},
                            track=track, channels=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outputs = []
        for xb, yb in zip(x.split(8), y.split(8)):
            out = model.train()(xb)
            opt.zero_grad()
            F.cross_entropy(out, yb).backward()
            opt.step()
            outputs.append(out.detach())
        with torch.no_grad():
            outputs.append(model.eval()(x))
        return model, outputs

    (plain, a), (tracked, b) = run(False), run(True)
    assert wrappers(plain) == [] and [w.name for w in wrappers(tracked)] == ["conv1", "fc1"]
    assert len(a) == len(b) == 5 and all(torch.equal(u, v) for u, v in zip(a, b))
    wrapper_buffers = {f"{w.name}.{n}" for w in wrappers(tracked) for n, _ in w.named_buffers(recurse=False)}
    state = {k.replace(".module.", "."): v for k, v in tracked.state_dict().items() if k not in wrapper_buffers}
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())
    # what they track is the layer's spectral norm (fc1: a matrix, exact by SVD); the
    # estimate is made after each training forward, from the weights before its step
    for _ in range(5):
        tracked.train()(x)
    exact = float(torch.linalg.matrix_norm(tracked.fc1.module.weight.detach(), 2))
    assert float(tracked.fc1.sigmas[0]) == pytest.approx(exact, rel=1e-4)
    if method == "miyato":
        assert exact == pytest.approx(0.5, rel=0.05)


def test_wrapper_names_and_kinds():
    plain = build_model("simpleconv", "mnist", "fastclip", {"clip": 1.0, "init_delay": 7})
    assert [w.name for w in wrappers(plain)] == ["conv1", "fc1"]
    assert all(w.init_delay == 7 and not w.rescale_every_step for w in wrappers(plain))
    composite = build_model("simpleconv-composite", "mnist", "fastclip-composite")
    assert [w.name for w in wrappers(composite)] == ["conv1", "conv1.conv", "fc1"]
    assert isinstance(composite.conv1.module.conv, SpectralClip)
    assert composite.conv1.rescale_every_step and not composite.fc1.rescale_every_step
    gouk = build_model("simpleconv", "mnist", "gouk")
    assert all(w.rescale_every_step and not w.clip_events for w in wrappers(gouk))
    resnet = build_model("resnet18", "cifar10", "fastclip", width=4)
    assert "layer1.0.conv1.conv" in [w.name for w in wrappers(resnet)]


def test_miyato_normalises_reshaped_kernel_to_clip():
    torch.manual_seed(0)
    model = build_model("simpleconv", "mnist", "miyato", {"clip": 0.5, "iters_per_step": 30}, channels=4)
    model.train()(torch.rand(4, 1, 28, 28))
    for layer in (model.conv1.module, model.fc1.module):  # inside the tracking wrappers
        assert float(torch.linalg.matrix_norm(layer.weight.detach().flatten(1), 2)) == pytest.approx(0.5, rel=1e-3)


def test_normalize_layer():
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.rand(3, 2, 4, 4)
    assert torch.allclose(norm(x)[:, 1], (x[:, 1] - 0.25) / 0.25)
    assert set(norm.state_dict()) == {"mean", "std"}


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("resnet", "cifar10"), "unknown model 'resnet'; valid models: simpleconv"),
    (lambda: build_model("simpleconv", "mnist", "fastclp"), "unknown method 'fastclp'"),
    (lambda: build_model("simpleconv", "mnist", "fastclip", {"clp": 1}), "unknown method argument(s) clp"),
    (lambda: build_model("simpleconv", "mnist", width=3), "model 'simpleconv': bad argument"),
    (lambda: build_model("simpleconv", "mnist", "fastclip-composite"), "use simpleconv-composite"),
    (lambda: build_model("simpleconv", "mnst"), "unknown dataset 'mnst'"),
])
def test_errors_are_one_line(call, message):
    with pytest.raises(RobustclipError, match=None) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,method", [
    *[("simpleconv-composite" if m == "fastclip-composite" else "simpleconv", m) for m in METHODS],
    ("resnet18", "fastclip-composite"), ("resnet18", "gouk")])
def test_training_steps_make_no_host_sync(name, method, monkeypatch):
    """Between clip events a training step of every method (forward with tracking, loss,
    backward, SGD step with the per-step rescale) reads nothing back to the host: no
    scalar read, no linalg error check, no value-sized output, no copy to the CPU.  On a
    GPU each would be a synchronisation (tests/test_cuda.py checks there)."""
    torch.manual_seed(0)
    model = build_model(name, DATASET[name], method, {"clip": 1.0, "clip_steps": 1000, "init_delay": 0},
                        **SMALL[name]).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    shape = (1, 28, 28) if DATASET[name] == "mnist" else (3, 32, 32)
    x, y = synthetic(16, shape, 10, seed=0).tensors

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    steps(2)  # initialisation (shape seen, vectors drawn and validated) reads values
    assert host_syncs(lambda: steps(3), monkeypatch) == []


def test_the_host_sync_check_sees_syncs(monkeypatch):
    """The check above can fail: it catches a scalar read, a bool on a tensor, a copy to
    the CPU, eigh (its error check, nested inside), and a clip event."""
    t = torch.ones(3)
    assert host_syncs(lambda: t.sum().item(), monkeypatch) == ["aten::item", "aten::_local_scalar_dense"]
    assert "aten::is_nonzero" in host_syncs(lambda: bool(t.sum() > 0), monkeypatch)
    assert host_syncs(lambda: t.cpu(), monkeypatch) == ["cpu"]
    assert host_syncs(lambda: t.to("cpu"), monkeypatch) == ["to(cpu)"]
    assert "aten::_linalg_check_errors" in host_syncs(lambda: torch.linalg.eigh(torch.eye(3)), monkeypatch)
    model = build_model("simpleconv", "mnist", "fastclip", {"clip": 1.0, "clip_steps": 2, "init_delay": 0},
                        channels=4).train()
    x = torch.rand(4, 1, 28, 28)
    model(x)
    assert "aten::_local_scalar_dense" in host_syncs(lambda: model(x), monkeypatch)  # step 2: clip event
