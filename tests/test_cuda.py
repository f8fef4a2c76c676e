"""The toolkit on a CUDA device, against CPU references (skipped without CUDA).

References: the dense Jacobian's singular values computed on the CPU in float64, the same
computation on the CPU, and torch's own sync-debug mode for host synchronisations.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robustclip
import robustclip.evaluation as H
from robustclip import SpectralClip, dense_singular_values, singular_values
from robustclip.bounds import lipschitz_report
from robustclip.config import Config, override
from robustclip.data import synthetic
from robustclip.distributed import Context
from robustclip.models import METHODS, build_model
from robustclip.objectives import Objective
from robustclip.train import train
from helpers import inflate, random_bn, tiny_classifier

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = torch.device("cuda", 0)


LAYERS = [
    ("conv-zeros", lambda: nn.Conv2d(2, 8, 3, padding=1), (2, 10, 10)),
    ("conv-circular-s2", lambda: nn.Conv2d(2, 6, 3, stride=2, padding=1, padding_mode="circular"),
     (2, 10, 10)),
    ("linear", lambda: nn.Linear(40, 12), (40,)),
    ("batchnorm", lambda: random_bn(3), (3, 4, 4)),
    ("conv+bn", lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), random_bn(6)), (2, 8, 8)),
]
IDS = [c[0] for c in LAYERS]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=IDS)
def test_singular_values_on_cuda_match_the_dense_reference(name, make, shape):
    torch.manual_seed(0)
    layer = make()
    exact = dense_singular_values(layer, shape, k=2)
    on_gpu = singular_values(copy.deepcopy(layer).to(GPU), shape, k=2)
    assert on_gpu.device == GPU
    assert torch.allclose(on_gpu.cpu().double(), exact.double(), rtol=1e-4), (on_gpu, exact)


@pytest.mark.parametrize("name,make,shape", [c for c in LAYERS if c[0] != "batchnorm"],
                         ids=[i for i in IDS if i != "batchnorm"])
def test_training_on_cuda_keeps_sigma_within_the_clip(name, make, shape):
    torch.manual_seed(0)
    layer = make()
    inflate(layer, 4.0)
    wrapper = SpectralClip(layer, 1.0, clip_steps=10, init_delay=0).to(GPU)
    opt = torch.optim.SGD(wrapper.parameters(), lr=1e-2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):  # clip events at steps 10, 20, 30
        x = torch.randn(16, *shape, generator=gen).to(GPU)
        opt.zero_grad()
        wrapper(x).square().mean().backward()
        opt.step()
    assert all(b.device == GPU for b in wrapper.buffers())
    exact = dense_singular_values(copy.deepcopy(wrapper.module).cpu(), shape, k=1)[0]
    assert float(exact) <= 1.01, float(exact)


def _sync_warnings(fn) -> list[str]:
    """Messages of the host synchronisations ``fn`` makes (torch's sync-debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught
            if "called a synchronizing" in str(w.message)]  # not the "prototype" notice


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_make_no_host_sync(method):
    """Between clip events a training step of every method (forward, tracking, backward,
    optimiser step, the per-step rescale of Gouk and of the conv+BN composite, whose
    tracking bounds its 5 x 5 Rayleigh-Ritz matrix without an eigensolver) never waits for
    the device."""
    torch.manual_seed(0)
    name = "simpleconv-composite" if method == "fastclip-composite" else "simpleconv"
    model = build_model(name, "mnist", method,
                        {"clip": 1.0, "clip_steps": 1000, "init_delay": 0}, channels=8).to(GPU)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = (t.to(GPU) for t in synthetic(64, (1, 28, 28), 10, seed=0).tensors)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    steps(2)  # initialisation (shape seen, vectors drawn) may synchronise once
    assert _sync_warnings(lambda: steps(10)) == []


@pytest.mark.parametrize("method, extra", [
    ("fastclip", ["train.adversarial.attack=fgsm-rs", "train.adversarial.eps=0.3",
                  "train.adversarial.warmup_epochs=1"]),
    ("gouk", ["train.adversarial.attack=pgd", "train.adversarial.eps=0.3",
              "train.adversarial.steps=3", "train.adversarial.loss=trades"]),
    ("none", ["train.loss=lipschitz-margin", "train.eps_cert=1.0"]),  # tracked L
], ids=["fgsm-rs", "trades-pgd", "margin"])
def test_adversarial_and_margin_steps_make_no_host_sync(method, extra):
    """A training step of robustclip.objectives (random start, crafting under passive with
    BatchNorm in train mode, the TRADES forward, the margin's differentiable L) never
    waits for the device (a composite's step makes one sync of its own: not tested here)."""
    torch.manual_seed(0)
    config = override(Config(), [f"method.name={method}", *extra])
    model = build_model("simpleconv", "mnist", method, {"clip": 1.0, "clip_steps": 1000, "init_delay": 0},
                        channels=8).to(GPU)
    objective = Objective(config, model, model, Context(device=GPU), (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = (t.to(GPU) for t in synthetic(64, (1, 28, 28), 10, seed=0).tensors)

    def steps(first: int, n: int) -> None:
        model.train()
        for step in range(first, first + n):
            opt.zero_grad(set_to_none=True)
            objective(x, y, slice(None), len(x), step)[1].sum().backward()
            opt.step()

    steps(0, 2)
    assert _sync_warnings(lambda: steps(2, 10)) == []


def test_attack_table_on_cuda_matches_cpu():
    cpu_model = tiny_classifier(0, epochs=4)
    gpu_model = copy.deepcopy(cpu_model).to(GPU)
    x, y = synthetic(200, (1, 10, 10), 10, seed=1).tensors
    specs = [H.make_spec("fgsm", 0.05), H.make_spec("pgd", 0.05, steps=10)]
    on_cpu = H.evaluate({"m": cpu_model}, x, y, specs, batch_size=100)
    on_gpu = H.evaluate({"m": gpu_model}, x, y, specs, batch_size=100)
    for a, b in zip(on_cpu.results, on_gpu.results):
        assert torch.equal(a.clean, b.clean)
        assert b.robust.device.type == "cpu" and not bool((b.robust & ~b.clean).any())
        assert abs(int(a.robust.sum()) - int(b.robust.sum())) <= 2, (a.attack, a.robust.sum(), b.robust.sum())
        assert b.lipschitz_bound == pytest.approx(a.lipschitz_bound, rel=1e-4)
        assert 0 < b.lipschitz_empirical <= b.lipschitz_bound
    assert not [w for w in on_gpu.warnings if "outside" in w.message or "NaN" in w.message]


def test_lipschitz_bound_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model("simpleconv-composite", "mnist", "fastclip-composite", channels=4).eval()
    cpu_bound, cpu_rows = lipschitz_report(model, (1, 28, 28), tol=1e-6)
    gpu_bound, gpu_rows = lipschitz_report(copy.deepcopy(model).to(GPU), (1, 28, 28), tol=1e-6)
    assert gpu_bound == pytest.approx(cpu_bound, rel=1e-4)
    assert list(gpu_rows["name"]) == list(cpu_rows["name"])


def test_train_on_cuda_then_load_on_cpu(tmp_path):
    config = override(Config(), [
        "data.synthetic=true", "train.limit_train=256", "train.limit_test=64", "train.batch_size=64",
        "train.epochs=2", "model.name=simpleconv-composite", "model.args.channels=4",
        "method.name=fastclip-composite", "method.init_delay=1", "method.clip_steps=2",
        "log.progress=false", "train.device=cuda"])
    run = train(config, tmp_path / "run")
    on_cpu = robustclip.load(run, device="cpu")
    on_gpu = robustclip.load(run, device=GPU)
    assert next(on_gpu.parameters()).device == GPU
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(on_cpu(x), on_gpu(x.to(GPU)).cpu(), atol=1e-4)
    bound, rows = lipschitz_report(on_cpu, (1, 28, 28))
    composite = rows[rows["type"].str.contains("ConvBN")]["sigma"].iloc[0]
    assert composite <= 1.01, rows
