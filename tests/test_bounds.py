"""Network Lipschitz bounds, empirical ratios and certificates, against independent references.

References: exact dense singular values (``dense_singular_values``) multiplied by hand
along each fixture's graph, hand-computed margins, and empirical ratios over test pairs
and adversarial (PGD-L2) pairs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from robustclip import SpectralClip, dense_singular_values
from robustclip.bounds import (
    certified,
    empirical_lipschitz,
    exact_pair_ratios,
    linf_to_l2,
    lipschitz_report,
    screened_ratio,
)
from robustclip.errors import RobustclipError
from robustclip.spectral import float64_twin
from robustclip import models
from robustclip.models import Normalize as InputNormalize
from helpers import Offset

SHAPE = (1, 6, 6)



def Normalize() -> nn.Module:
    """Fixture input layer: (x - mean) / std, std 0.3081 as for MNIST."""
    return InputNormalize((0.1307,), (0.3081,))


class Residual(nn.Module):
    """normalize -> conv1 -> relu -> (h + conv2(h)) -> avgpool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = F.relu(self.conv1(self.normalize(x)))
        h = h + self.conv2(h)
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


class ConvBN(nn.Module):
    """normalize -> conv -> bn -> relu -> flatten -> linear (the tutorial's ConvModel)."""

    def __init__(self, wrap: bool = False) -> None:
        super().__init__()
        w = (lambda m: SpectralClip(m, clip=None)) if wrap else (lambda m: m)
        self.normalize = Normalize()
        self.conv = w(nn.Conv2d(1, 3, 3, padding=1))
        self.bn = w(nn.BatchNorm2d(3))
        self.fc = w(nn.Linear(3 * 36, 4))

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(self.normalize(x)))).view(x.size(0), -1))


def _randomise_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_var.copy_(0.2 + 2 * torch.rand(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))


def _sigma(module: nn.Module, shape) -> float:
    return float(dense_singular_values(module, shape, k=1)[0])


def _pgd_l2_pairs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Adversarial partners of x (PGD-L2, eps 0.5) against the model's own predictions."""
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    return torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10)(x, y)


def _fixtures():
    torch.manual_seed(0)
    seq = nn.Sequential(Normalize(), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 4)).eval()
    res = Residual().eval()
    cbn = ConvBN().eval()
    _randomise_bn(cbn.bn, 1)
    wrapped = ConvBN(wrap=True).eval()
    _randomise_bn(wrapped.bn.module, 2)
    return {"sequential": seq, "residual": res, "conv+bn": cbn, "wrapped conv+bn": wrapped}


FIXTURES = _fixtures()


def test_sequential_bound_is_product_of_exact_sigmas():
    model = FIXTURES["sequential"]
    bound, layers = lipschitz_report(model, SHAPE)
    exact = (_sigma(model[0], SHAPE) * _sigma(model[1], SHAPE) * _sigma(model[4], (48,)))
    assert 1 / 0.3081 == pytest.approx(_sigma(model[0], SHAPE), rel=1e-6)  # float32 std
    assert bound == pytest.approx(exact, rel=1e-5)
    assert list(layers["name"]) == ["0", "1", "4"]
    # the PowerQR column converged to the exact column
    assert layers["sigma"].to_numpy() == pytest.approx(layers["sigma_exact"].to_numpy(), rel=1e-5)
    assert (layers["rel_change"] < 1e-5).all()


def test_residual_bound_adds_branches():
    model = FIXTURES["residual"]
    bound, layers = lipschitz_report(model, SHAPE)
    s = {n: _sigma(getattr(model, n), shape) for n, shape in
         [("normalize", SHAPE), ("conv1", SHAPE), ("conv2", (3, 6, 6)), ("fc", (27,))]}
    pool = _sigma(nn.AvgPool2d(2), (3, 6, 6))
    assert pool == pytest.approx(0.5)
    expected = s["normalize"] * s["conv1"] * (1 + s["conv2"]) * pool * s["fc"]
    assert bound == pytest.approx(expected, rel=1e-5)
    assert "avg_pool2d" in set(layers["name"])


@pytest.mark.parametrize("name", ["conv+bn", "wrapped conv+bn"])
def test_conv_bn_is_one_composite_operator(name):
    model = FIXTURES[name]
    bound, layers = lipschitz_report(model, SHAPE)
    composite = _sigma(nn.Sequential(model.conv, model.bn), SHAPE)
    separate = _sigma(model.conv, SHAPE) * _sigma(model.bn, (3, 6, 6))
    expected = _sigma(model.normalize, SHAPE) * composite * _sigma(model.fc, (108,))
    assert bound == pytest.approx(expected, rel=1e-5)
    assert "conv+bn" in set(layers["name"])
    assert composite < separate * (1 - 1e-3)  # the composite is strictly tighter here


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_bound_never_below_empirical(name):
    model = FIXTURES[name]
    bound, _ = lipschitz_report(model, SHAPE)
    x = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    test_pairs = empirical_lipschitz(model, x, x.roll(1, 0))
    adversarial = empirical_lipschitz(model, x, _pgd_l2_pairs(model, x))
    assert 0 < test_pairs <= bound
    assert 0 < adversarial <= bound


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_bound_holds_for_pairs_one_float32_ulp_apart(name):
    """Regression (issue 4): CW's tanh round trip leaves x_adv about 1e-7 from x, where
    float32 rounding of the logits (ulp 6e-5 at 1000), not the network, made the ratio
    exceed the bound."""
    model = Offset(FIXTURES[name], 1000.0)  # a constant leaves the Lipschitz constant alone
    bound, _ = lipschitz_report(model, SHAPE)
    assert bound == pytest.approx(lipschitz_report(FIXTURES[name], SHAPE)[0])
    x = torch.rand(256, *SHAPE, generator=torch.Generator().manual_seed(5))
    other = torch.nextafter(x, torch.ones_like(x))  # every pixel one ulp up: distance ~1e-7 * 6
    assert float((other - x).flatten(1).norm(dim=1).max()) < 1e-5
    assert 0 < empirical_lipschitz(model, x, other) <= bound


def test_screened_ratio_finds_the_true_maximum_among_rounding_pairs():
    """20 pairs a float32 ulp apart whose float32 outputs carry rounding noise (quotients
    near 1000), and one pair along the top singular direction (exact ratio 2): the screen
    picks the real pair and reports only ratios measured in float64."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.rand(21, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    other = torch.nextafter(x, torch.ones_like(x))
    other[20] = x[20]
    other[20, 0, 0, 0] = x[20, 0, 0, 0] + 0.5
    with torch.no_grad():
        f, f_other = model(x), model(other)
    f_other[:20] += 1e-4  # rounding noise of logits near 1000
    assert ((f - f_other).norm(dim=1) / (x - other).flatten(1).norm(dim=1)).max() > 100
    twin = float64_twin(model)
    assert float(screened_ratio(twin, x, other, f, f_other, top=4)) == pytest.approx(2.0)
    # without the floor the noisy pairs crowd the real one out (their exact ratios are < 2)
    assert float(screened_ratio(twin, x, other, f, f_other, top=4, floor=0.0)) < 2.0 - 1e-3
    assert float(exact_pair_ratios(twin, x, other).max()) == pytest.approx(2.0)


def test_empirical_lipschitz_of_a_linear_map():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=True))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.zeros(2, 1, 2, 2)
    other = x.clone()
    other[0, 0, 0, 0] = 0.5  # along the top singular direction: ratio 2
    other[1, 0, 0, 1] = 0.5  # along the second: ratio 1
    assert empirical_lipschitz(model, x, other) == pytest.approx(2.0)


def test_certified_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.9, 0.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([0, 0, 0])
    # margins 2.0 and 0.1; the third sample is misclassified
    assert certified(logits, labels, 1.0, 0.05).tolist() == [True, True, False]
    assert certified(logits, labels, 1.0, 1.0).tolist() == [True, False, False]  # 2 > 1.414
    assert certified(logits, labels, 1.0, 1.5).tolist() == [False, False, False]  # 2 < 2.12
    assert certified(logits, labels, 2.0, 0.70).tolist() == [True, False, False]  # 2 > 1.98
    assert certified(logits, labels, math.nan, 0.0).tolist() == [False, False, False]
    assert linf_to_l2(0.1, 784) == pytest.approx(2.8)


def test_max_pool_and_sigmoid_factors():
    pool = nn.Sequential(nn.MaxPool2d(3, stride=1), nn.Flatten())
    assert lipschitz_report(pool, (1, 5, 5))[0] == pytest.approx(3.0)  # sqrt(3 * 3) windows
    assert lipschitz_report(nn.MaxPool2d(2), (1, 4, 4))[0] == pytest.approx(1.0)
    assert lipschitz_report(nn.Sigmoid(), (3,))[0] == pytest.approx(0.25)
    # an element inside 9 overlapping windows moves 9 outputs by the same amount
    x = torch.zeros(1, 1, 5, 5)
    other = x.clone()
    other[0, 0, 2, 2] = 1.0
    assert empirical_lipschitz(pool, x, other) == pytest.approx(3.0)


class Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("model, op", [
    (Square(), "mul"),
    (nn.Sequential(nn.Flatten(), nn.GELU()), "GELU"),
    (nn.Sequential(nn.Flatten(), nn.LeakyReLU(2.0)), "LeakyReLU"),
    (nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), "Softmax"),
])
def test_cannot_bound(model, op):
    with pytest.raises(RobustclipError, match=f"cannot bound.*{op}"):
        lipschitz_report(model, (1, 2, 2))


def test_models_of_the_zoo_are_bounded():
    for name, dataset, shape, kwargs in [("mnist-cnn", "mnist", (1, 28, 28), {"width": 2}),
                                          ("resnet18", "cifar10", (3, 32, 32), {"width": 2}),
                                          ("dla", "cifar10", (3, 32, 32), {"width": 1})]:
        model = models.build_model(name, dataset, "fastclip", **kwargs).eval()
        bound, layers = lipschitz_report(model, shape, tol=1e-3)
        x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0))
        assert empirical_lipschitz(model, x, x.roll(1, 0)) <= bound, name
        assert layers["type"].str.contains("SpectralClip").any(), name


def test_composite_of_the_tutorial_gets_its_exact_sigma():
    """simpleconv-composite: 784 inputs, 50176 outputs: too big for a dense matrix under the
    default limit, small enough for the chunked Gram matrix."""
    torch.manual_seed(0)
    model = models.build_model("simpleconv-composite", "mnist", "fastclip-composite").eval()
    _, layers = lipschitz_report(model, (1, 28, 28), tol=1e-6)
    row = layers.set_index("name").loc["conv1"]
    assert row["sigma_exact"] == pytest.approx(row["sigma"], rel=1e-5)
