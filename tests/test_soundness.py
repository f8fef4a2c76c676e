"""The network bound is sound by construction: an operator robustclip cannot prove a
bound for makes the bound an estimate (or refused), never a wrong "upper", and an
estimate certifies nothing.

The independent reference is an attack on pairs: gradient ascent, in float64, on
||f(x) - f(x')|| / ||x - x'|| from several input scales (a LOWER bound of the Lipschitz
constant).  Every sound bound must lie above what it finds.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robustclip.evaluation as H
from robustclip.bounds import lipschitz_report
from robustclip.errors import RobustclipError
from robustclip.evaluation.ensemble import Bound
from robustclip.evaluation.evaluate import refutation
from robustclip import known_ops

IN, HIDDEN, OUT = 4, 6, 3


def largest_pair_ratio(model: nn.Module, in_shape: tuple[int, ...], *, steps: int = 150,
                       scales: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)) -> float:
    """The largest ||f(x + r u) - f(x)|| / r (||u|| = 1) gradient ascent on (x, u) finds,
    in float64, from 32 random pairs at each input scale and at radii r of 1e-3 and 1
    times the scale."""
    f = copy.deepcopy(model).double().eval()
    best = 0.0
    for scale in scales:
        for radius in (1e-3 * scale, scale):
            g = torch.Generator().manual_seed(round(scale * 1000))
            x = (scale * torch.randn(32, *in_shape, generator=g,
                                     dtype=torch.float64)).requires_grad_()
            u = torch.randn(32, *in_shape, generator=g, dtype=torch.float64).requires_grad_()
            opt = torch.optim.Adam([{"params": [x], "lr": 0.02 * scale},
                                    {"params": [u], "lr": 0.05}])
            for _ in range(steps):
                step = radius * u / u.flatten(1).norm(dim=1).view(-1, *[1] * len(in_shape))
                ratio = (f(x + step) - f(x)).flatten(1).norm(dim=1) / radius
                best = max(best, float(ratio.detach().max()))
                opt.zero_grad()
                (-ratio.sum()).backward()
                opt.step()
    return best


def between_linears(op: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), op, nn.Linear(HIDDEN, OUT)).eval()


class Bent(nn.Module):
    """Identity for |x| < 6, slope 10 beyond (Lipschitz constant 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.abs() < 6, x, torch.sign(x) * (6 + 10 * (x.abs() - 6)))


class _Times10(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return 10 * x

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return 10 * g


class CustomFunction(nn.Module):
    """A custom autograd Function (x -> 10 x) nothing can see inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Times10.apply(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over a (n, HIDDEN) input seen as HIDDEN / 2 tokens of
    width 2."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(2, 1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.view(x.shape[0], HIDDEN // 2, 2)
        return self.attention(seq, seq, seq, need_weights=False)[0].flatten(1)


class OwnLinear(nn.Linear):
    """An nn.Linear whose forward is not Linear's (scales by 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


class ForeignWrapper(nn.Module):
    """Says it is a spectral wrapper, but is not robustclip's: its forward scales by 10."""

    is_spectral_wrapper = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.module(x)


def _scaled(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda m, args, out: 10 * out)
    return module


PROVEN = {  # operator -> expected network kind; the bound must hold
    "ReLU": nn.ReLU(), "ReLU6": nn.ReLU6(), "LeakyReLU(3)": nn.LeakyReLU(3.0),
    "PReLU": nn.PReLU(init=-2.0), "RReLU": nn.RReLU(0.1, 0.3), "ELU": nn.ELU(),
    "ELU(3)": nn.ELU(3.0),
    "CELU(0.5)": nn.CELU(0.5), "SELU": nn.SELU(), "GELU": nn.GELU(),
    "GELU(tanh)": nn.GELU("tanh"), "SiLU": nn.SiLU(), "Mish": nn.Mish(),
    "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "Hardtanh": nn.Hardtanh(),
    "Hardsigmoid": nn.Hardsigmoid(), "Hardswish": nn.Hardswish(), "Softplus(2)": nn.Softplus(2.0),
    "Softsign": nn.Softsign(), "Tanhshrink": nn.Tanhshrink(), "Softshrink": nn.Softshrink(0.5),
    "LogSigmoid": nn.LogSigmoid(), "Softmax": nn.Softmax(dim=1), "Softmin": nn.Softmin(dim=1),
    "Identity": nn.Identity(), "Dropout(eval)": nn.Dropout(0.5),
}
UNPROVEN = {  # operator -> the network bound must be an estimate or refused
    "Hardshrink(4)": nn.Hardshrink(4.0), "Hardshrink(0.5)": nn.Hardshrink(0.5),
    "Threshold": nn.Threshold(0.1, 20.0), "LayerNorm": nn.LayerNorm(HIDDEN),
    "LogSoftmax": nn.LogSoftmax(dim=1), "Bent": Bent(), "CustomFunction": CustomFunction(),
    "SelfAttention": SelfAttention(), "OwnLinear": OwnLinear(HIDDEN, HIDDEN),
    "hooked Linear": _scaled(nn.Linear(HIDDEN, HIDDEN)),
    "ForeignWrapper": ForeignWrapper(nn.Linear(HIDDEN, HIDDEN)),
}


@pytest.mark.parametrize("name", PROVEN)
def test_a_proven_operator_gives_a_bound_no_pair_exceeds(name):
    model = between_linears(copy.deepcopy(PROVEN[name]))
    bound, rows = lipschitz_report(model, (IN,))
    assert rows.attrs["bound_kind"] in ("exact", "upper")
    assert bound >= largest_pair_ratio(model, (IN,)) * (1 - 1e-6)


@pytest.mark.parametrize("name", UNPROVEN)
def test_an_unknown_operator_never_gives_a_sound_bound(name):
    model = between_linears(copy.deepcopy(UNPROVEN[name]))
    try:
        bound, rows = lipschitz_report(model, (IN,))
    except RobustclipError as err:
        assert "cannot bound" in str(err)
        return
    assert rows.attrs["bound_kind"] == "estimate"
    assert (rows["bound_kind"] == "estimate").any()


@pytest.mark.parametrize("name", ["Hardshrink(4)", "Bent", "OwnLinear", "hooked Linear",
                                  "ForeignWrapper"])
def test_the_unknown_operators_fool_a_probe(name):
    """These pass as linear to a probe, and their PowerQR value lies below a real pair's
    ratio: the estimate is wrong, so taking it as a bound would be unsound."""
    model = between_linears(copy.deepcopy(UNPROVEN[name]))
    bound, _ = lipschitz_report(model, (IN,))
    assert largest_pair_ratio(model, (IN,)) > 1.5 * bound


def test_an_estimate_certifies_nothing_in_an_evaluation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(IN, OUT), nn.Hardshrink(4.0)).eval()
    with torch.no_grad():
        model[1].weight.mul_(20)
    images = torch.rand(32, 1, 2, 2)
    labels = model(images).argmax(1)
    evaluation = H.evaluate({"m": model}, images, labels, [H.make_spec("fgsm", 0.1)])
    (row,) = evaluation.results
    assert row.bound_kind == "estimate" and row.certified is None
    assert row.clean.all()


# the constants: tight suprema of the secant slopes |f(x + h) - f(x)| / h on a dense grid
# (the forward itself, in float64: an independent measurement)
GRID = torch.linspace(-30, 30, 600_001, dtype=torch.float64)


def _sup_slope(f) -> float:  # noqa: ANN001
    with torch.no_grad():
        values = f(GRID)
    return float(((values[1:] - values[:-1]) / (GRID[1:] - GRID[:-1])).abs().max())


@pytest.mark.parametrize("module", [nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Mish(),
                                    nn.Hardswish(), nn.SELU(), nn.Sigmoid(), nn.Hardsigmoid(),
                                    nn.Tanh(), nn.ELU(), nn.ELU(3.0), nn.CELU(2.0), nn.Softplus(0.5),
                                    nn.LeakyReLU(-3.0), nn.Softsign(), nn.Tanhshrink(),
                                    nn.LogSigmoid()], ids=repr)
def test_each_constant_is_the_supremum_of_the_slope(module):
    constant = known_ops.module_lipschitz(module)
    slope = _sup_slope(module)
    assert slope <= constant * (1 + 1e-9) and constant <= slope * (1 + 1e-3)  # float64 secants


@pytest.mark.parametrize("dim", [2, 5, 9])
def test_the_softmax_constant_holds_against_its_jacobian(dim):
    torch.manual_seed(dim)
    worst = 0.0
    for scale in (0.1, 1.0, 5.0, 50.0):
        for x in scale * torch.randn(200, dim, dtype=torch.float64):
            jac = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), x)
            worst = max(worst, float(torch.linalg.matrix_norm(jac, 2)))
    assert worst <= known_ops.module_lipschitz(nn.Softmax(dim=1)) and worst > 0.4


def test_an_observer_hook_keeps_a_layer_proven_and_other_hooks_do_not():
    layer = nn.Linear(3, 3)
    handle = layer.register_forward_hook(known_ops.observer(lambda m, args, out: None))
    assert known_ops.is_linear_module(layer)
    layer.register_forward_pre_hook(lambda m, args: None)
    assert not known_ops.is_linear_module(layer)
    handle.remove()


@pytest.mark.parametrize("fn, expected", [(F.relu, 1.0), (torch.tanh, 1.0), (torch.sigmoid, 0.25),
                                          (F.gelu, known_ops.GELU_LIPSCHITZ),
                                          (F.hardshrink, None), (F.layer_norm, None)])
def test_functional_forms_are_proven_like_their_modules(fn, expected):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)

        def forward(self, x):  # noqa: ANN001, ANN202
            h = self.a(x)
            h = fn(h, (HIDDEN,)) if fn is F.layer_norm else fn(h)
            return self.b(h)

    model = Net().eval()
    try:
        bound, rows = lipschitz_report(model, (IN,))
    except RobustclipError:
        assert expected is None
        return
    if expected is None:
        assert rows.attrs["bound_kind"] == "estimate"
    else:
        assert rows.attrs["bound_kind"] in ("exact", "upper")
        assert bound >= largest_pair_ratio(model, (IN,)) * (1 - 1e-6)
        constants = rows.loc[rows["type"].str.contains("Lipschitz constant"), "sigma_upper"]
        assert math.prod(constants) == pytest.approx(expected)


# --------------------------------------- the evaluation refutes a bound it can disprove

def test_a_given_bound_below_a_measured_ratio_is_refuted_and_certifies_nothing(models, data):
    x, y = (t[:60] for t in data)
    spec = H.make_spec("pgd", 0.1, steps=5)
    honest = H.evaluate({"a": models["a"]}, x, y, [spec])
    (row,) = honest.results
    assert row.bound_kind in ("exact", "upper") and row.certified is not None
    too_small = row.lipschitz_empirical / 2
    ev = H.evaluate({"a": models["a"]}, x, y, [spec], bounds={"a": too_small})
    (row,) = ev.results
    assert row.bound_kind == "refuted" and row.certified is None
    assert row.lipschitz_bound == too_small
    (warning,) = [w for w in ev.warnings if "refuted" in w.message]
    assert "below a measured pair ratio" in warning.message and warning.model == "a"
    assert not [w for w in honest.warnings if "refuted" in w.message]


def test_a_broken_certified_point_refutes_the_bound():
    robust = torch.tensor([True, False, True])
    cert = torch.tensor([True, True, False])
    sound = Bound(2.0, "upper")
    message = refutation(sound, 1.5, [(robust, None), (robust, cert)])
    assert message.startswith("1 points certified by the Lipschitz bound 2 (upper) are broken")
    assert refutation(sound, 1.5, [(robust, cert & robust)]) is None
    assert refutation(sound, 2.0 * (1 + 1e-5), [(robust, cert & robust)]) is None  # rounding
    assert "below a measured pair ratio" in refutation(sound, 2.1, [])
    assert refutation(Bound(2.0, "estimate"), 9.0, [(robust, cert)]) is None
