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
from robustclip.activations import GroupSort
from robustclip.bounds import lipschitz_report, network_bound_kind
from robustclip.certificates import certified, linf_to_l2
from robustclip.empirical import empirical_lipschitz, exact_pair_ratios, screened_ratio
from robustclip.errors import RobustclipError
from robustclip import models
from robustclip.spectral import (
    circular_conv_singular_values,
    float64_twin,
    gram_matrix,
    spectral_estimate,
)
from robustclip.upper_bounds import (SAFETY, circular_conv_norm, differentiable_bound,
                                     operator_upper_bound)
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
    (nn.Sequential(nn.Flatten(), nn.LayerNorm(4)), "LayerNorm"),
    (nn.Sequential(nn.Flatten(), nn.LogSoftmax(dim=1)), "LogSoftmax"),
    (nn.Sequential(nn.Flatten(), nn.Threshold(0.1, 20.0)), "Threshold"),
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
        assert layers.attrs["bound_kind"] == "upper", name  # a certificate: no estimates
        assert (layers["sigma_upper"] >= layers["sigma"] * (1 - 1e-5)).all(), name


def test_composite_of_the_tutorial_gets_its_exact_sigma():
    """simpleconv-composite: 784 inputs, 50176 outputs: too big for a dense matrix under the
    default limit, small enough for the chunked Gram matrix."""
    torch.manual_seed(0)
    model = models.build_model("simpleconv-composite", "mnist", "fastclip-composite").eval()
    _, layers = lipschitz_report(model, (1, 28, 28), tol=1e-6)
    row = layers.set_index("name").loc["conv1"]
    assert row["sigma_exact"] == pytest.approx(row["sigma"], rel=1e-5)


# ------------------------------------------------------- guaranteed upper bounds of sigma

CONV_VARIANTS = {"plain": {}, "dilation 2": {"dilation": 2}, "groups 2": {"groups": 2}}


def _random_conv(dims: int, mode: str, stride: int, variant: str, bn: bool,
                 seed: int) -> nn.Module:
    """A 2 -> 4 channel conv (kernel 3, padding as wide as the dilated kernel's half),
    followed by an eval-mode BatchNorm with random gamma (both signs) and statistics."""
    torch.manual_seed(seed)
    kwargs = CONV_VARIANTS[variant]
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1](2, 4, 3, stride=stride, padding=kwargs.get("dilation", 1),
                                            padding_mode=mode, **kwargs)
    if not bn:
        return conv.eval()
    norm = (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        norm.running_var.copy_(0.2 + 2 * torch.rand(4, generator=g))
        norm.running_mean.copy_(torch.randn(4, generator=g))
        norm.weight.copy_(torch.randn(4, generator=g))
    return nn.Sequential(conv, norm).eval()


@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv+bn"])
@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_upper_bound_is_never_below_the_exact_sigma(dims, mode, stride, variant, bn):
    """upper >= exact (dense Jacobian SVD) >= PowerQR, up to rounding; circular stride 1
    is exact on the input grid."""
    model = _random_conv(dims, mode, stride, variant, bn, seed=7 * dims + stride)
    shape = (2, 11) if dims == 1 else (2, 7, 9)
    upper = operator_upper_bound(model, shape)
    exact = _sigma(model, shape)
    estimate = float(spectral_estimate(model, shape, iters=50).values[0])  # a Ritz value: below
    assert upper.value >= exact * (1 - 1e-9) >= estimate * (1 - 1e-6) * (1 - 1e-9)
    if mode == "circular" and stride == 1:
        assert upper.kind == "exact"
        assert upper.value == pytest.approx(exact, rel=1e-9)
    else:
        assert upper.kind == "upper"


def _bound_value(module: nn.Module, shape: tuple[int, ...]) -> float:
    """operator_upper_bound's value without its rounding margin."""
    upper = operator_upper_bound(module, shape)
    return upper.value / (1 + SAFETY) if upper.kind == "upper" else upper.value


@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv+bn"])
@pytest.mark.parametrize("variant", sorted(CONV_VARIANTS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect"])
@pytest.mark.parametrize("dims", [1, 2])
def test_differentiable_bound_is_the_upper_bound_with_its_gradient(dims, mode, stride, variant, bn):
    """The bound the sound margin trains with: operator_upper_bound's value (without its
    rounding margin), and a gradient equal to central differences of that value (a
    separate, gradient-free computation) in the weights and gamma."""
    model = _random_conv(dims, mode, stride, variant, bn, seed=3 * dims + stride).double()
    shape = (2, 11) if dims == 1 else (2, 7, 9)
    value = differentiable_bound(model, shape)
    assert float(value.detach()) == pytest.approx(_bound_value(model, shape), rel=1e-12)
    params = [p for p in model.parameters() if p.dim() > 1 or bn]  # kernel; gamma and beta
    grads = torch.autograd.grad(value, params, allow_unused=True)
    g = torch.Generator().manual_seed(5)
    for p, grad in zip(params, grads):
        grad = torch.zeros_like(p) if grad is None else grad  # BN's shift: no gradient
        for _ in range(4):
            i = tuple(int(torch.randint(0, n, (), generator=g)) for n in p.shape)
            with torch.no_grad():
                p[i] += 1e-6
                up = _bound_value(model, shape)
                p[i] -= 2e-6
                down = _bound_value(model, shape)
                p[i] += 1e-6
            assert float(grad[i]) == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("shape", [(5, 12), (12, 5)], ids=["wide", "tall"])
def test_differentiable_bound_of_a_dense_layer_is_its_sigma_with_gradient_u_v(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]).double()
    value = differentiable_bound(layer, (shape[1],))
    (grad,) = torch.autograd.grad(value, layer.weight)
    u, s, vh = torch.linalg.svd(layer.weight.detach())
    assert float(value.detach()) == pytest.approx(float(s[0]), rel=1e-13)
    assert torch.allclose(grad, torch.outer(u[:, 0], vh[0]), atol=1e-10)


def test_differentiable_bound_refuses_other_layers():
    with pytest.raises(RobustclipError, match="no differentiable bound for AvgPool2d"):
        differentiable_bound(nn.AvgPool2d(2), (1, 4, 4))


@pytest.mark.parametrize("kernel, dilation, limit", [(3, 1, 1.05), (5, 1, 1.05), (3, 2, 1.1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_zero_padding_bound_is_tight_on_a_large_input(kernel, dilation, limit, seed):
    """Zero padding p, stride 1, 16 x 16: the conv is a compression of the circular conv
    on the (16 + 2p)^2 grid; most of that grid is the input, so the FFT bound is close.
    The zero ring (width p = 2 for dilation 2) is a larger share of the grid, and the
    bound looser (measured 1.053 and 1.073 for the seeds here)."""
    torch.manual_seed(seed)
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(2, 3, kernel, padding=pad, dilation=dilation).eval()
    shape = (2, 16, 16)
    ratio = operator_upper_bound(conv, shape).value / _sigma(conv, shape)
    assert 1 - 1e-9 <= ratio <= limit


def test_circular_conv_norm_matches_the_2d_reference():
    weight = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    reference = float(circular_conv_singular_values(weight, (7, 8))[0])
    assert circular_conv_norm(weight, (7, 8), (1, 1)) == pytest.approx(reference, rel=1e-12)


OTHER_LAYERS = [  # id, layer, input shape, kind, largest upper/exact ratio expected
    ("conv3d", nn.Conv3d(2, 3, 3, padding=1), (2, 5, 5, 5), "upper", 1.3),
    # a corner pixel is copied into 2 x 2 x 2 padded cells: factor sqrt(8)
    ("conv3d reflect stride 2", nn.Conv3d(2, 3, 3, padding=1, stride=2, padding_mode="reflect"),
     (2, 5, 4, 5), "upper", 3.5),
    ("same, even kernel", nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 6, 7), "upper", 1.2),
    ("same, even kernel, circular", nn.Conv2d(2, 3, 2, padding="same", padding_mode="circular"),
     (2, 6, 6), "exact", 1.0),
    ("circular, kernel longer than input", nn.Conv1d(2, 3, 3, dilation=3, padding=3,
                                                     padding_mode="circular"), (2, 4), "exact", 1.0),
    ("circular, repeated rows", nn.Conv1d(2, 3, 3, padding=3, padding_mode="circular"), (2, 5),
     "upper", 1.5),
    ("circular, no padding", nn.Conv2d(2, 3, 3, padding_mode="circular"), (2, 6, 6), "upper", 1.3),
    ("valid", nn.Conv2d(2, 3, 3), (2, 6, 6), "upper", 1.3),
    ("linear", nn.Linear(6, 4), (6,), "exact", 1.0),
    ("normalize", InputNormalize((0.1, 0.2, 0.3), (0.3, 0.5, 0.2)), (3, 4, 4), "exact", 1.0),
    ("avgpool 2", nn.AvgPool2d(2), (2, 6, 6), "upper", 1.0),
    ("avgpool 3, stride 1", nn.AvgPool2d(3, 1, 1), (2, 6, 6), "upper", 1.2),
    ("avgpool without pad count", nn.AvgPool2d(3, 1, 1, count_include_pad=False), (2, 6, 6),
     "upper", 1.2),
    ("avgpool ceil mode", nn.AvgPool2d(2, ceil_mode=True), (2, 5, 5), "upper", 1.0),
    ("global avgpool", nn.AdaptiveAvgPool2d(1), (2, 6, 6), "upper", 1.0),
    ("adaptive avgpool 6 -> 4", nn.AdaptiveAvgPool2d(4), (2, 6, 6), "upper", 1.4),
]


@pytest.mark.parametrize("module, shape, kind, limit",
                         [pytest.param(*case[1:], id=case[0]) for case in OTHER_LAYERS])
def test_operator_upper_bound_of_other_layers(module, shape, kind, limit):
    """Against the dense Jacobian SVD; ``limit``: the largest upper/exact ratio expected."""
    torch.manual_seed(3)
    for p in module.parameters():
        nn.init.normal_(p)
    upper = operator_upper_bound(module.eval(), shape)
    exact = _sigma(module, shape)
    assert upper.kind == kind
    assert exact * (1 - 1e-9) <= upper.value <= exact * limit * (1 + 1e-5)


class Flip(nn.Module):
    """2 x the input reversed along its last axis: linear, norm 2, and nothing the walker
    knows a formula for (a childless custom module: one operator)."""

    def forward(self, x):
        return 2 * x.flip(-1)


def _exact_product(name: str) -> float:
    model = FIXTURES[name]
    return (_sigma(model.normalize, SHAPE) * _sigma(nn.Sequential(model.conv, model.bn), SHAPE)
            * _sigma(model.fc, (108,)))


@pytest.mark.parametrize("name", ["conv+bn", "wrapped conv+bn"])
def test_network_bound_without_exact_sigmas_is_an_upper_bound(name):
    """exact_max_dim=0: no Gram matrix; the composite gets its FFT bound."""
    bound, layers = lipschitz_report(FIXTURES[name], SHAPE, exact_max_dim=0)
    exact = _exact_product(name)
    assert exact * (1 - 1e-9) <= bound <= exact * 1.2
    rows = layers.set_index("name")
    assert rows.loc["conv+bn", "bound_kind"] == "upper"
    assert math.isnan(rows.loc["conv+bn", "sigma_exact"])
    assert rows.loc["conv+bn", "sigma_upper"] >= rows.loc["conv+bn", "sigma"]
    assert list(rows.loc[["normalize", "fc"], "bound_kind"]) == ["exact", "exact"]
    assert layers.attrs["bound_kind"] == network_bound_kind(layers) == "upper"
    assert bound == pytest.approx(math.prod(layers["sigma_upper"]), rel=1e-12)


def test_network_bound_of_a_residual_model_without_exact_sigmas():
    model = FIXTURES["residual"]
    bound, layers = lipschitz_report(model, SHAPE, exact_max_dim=0)
    exact, _ = lipschitz_report(model, SHAPE)
    kinds = dict(zip(layers["name"], layers["bound_kind"]))
    assert kinds == {"normalize": "exact", "conv1": "upper", "conv2": "exact",
                     "avg_pool2d": "upper", "fc": "exact"}  # conv2: circular, stride 1
    assert exact * (1 - 1e-9) <= bound <= exact * 1.2
    assert layers.attrs["bound_kind"] == "upper"


def test_conv_on_an_input_above_exact_max_dim_gets_an_fft_bound():
    """A 1 x 33 x 33 input (1089 values > 1024): the default report has no exact sigma
    for the conv and bounds it by the FFT; checked against the float64 Gram matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 33 * 33, 4)).eval()
    shape = (1, 33, 33)
    bound, layers = lipschitz_report(model, shape)
    conv = float(torch.linalg.eigvalsh(gram_matrix(model[1], shape))[-1].sqrt())
    exact = _sigma(model[0], shape) * conv * _sigma(model[4], (2 * 33 * 33,))
    assert list(layers["bound_kind"]) == ["exact", "upper", "exact"]
    assert layers.attrs["bound_kind"] == "upper"
    assert exact * (1 - 1e-9) <= bound <= exact * 1.05


class Flipped(nn.Module):
    """normalize -> 2 x the input reversed along its last axis -> linear: the flip and the
    product with 2 are traced as functions the bound knows to be linear."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize, self.fc = Normalize(), nn.Linear(36, 4)

    def forward(self, x):
        return self.fc((2 * self.normalize(x).flip(-1)).flatten(1))


def test_a_linear_function_without_upper_bound_makes_the_network_an_estimate():
    model = Flipped().eval()
    bound, layers = lipschitz_report(model, SHAPE, exact_max_dim=0)
    mul = layers.set_index("name").loc["mul"]
    assert mul["bound_kind"] == "estimate" and math.isnan(mul["sigma_upper"])
    assert mul["sigma"] == pytest.approx(2.0, rel=1e-5)
    assert bound == pytest.approx(_sigma(model.normalize, SHAPE) * mul["sigma"] * _sigma(model.fc, (36,)),
                                  rel=1e-12)
    assert layers.attrs["bound_kind"] == network_bound_kind(layers) == "estimate"
    # with its Gram matrix (input 36 <= exact_max_dim) the proven linear product is exact
    _, small = lipschitz_report(model, SHAPE)
    assert set(small["bound_kind"]) == {"exact"} and small.attrs["bound_kind"] == "upper"


def test_an_unknown_module_stays_an_estimate_even_with_its_gram_matrix():
    """Flip is linear, but a custom module is only probed, never proved: its Gram-matrix
    value would be "exact" for whatever the probe happened to see."""
    model = nn.Sequential(Normalize(), Flip(), nn.Flatten(), nn.Linear(36, 4)).eval()
    for limit in (0, 1024):
        bound, layers = lipschitz_report(model, SHAPE, exact_max_dim=limit)
        flip = layers.set_index("name").loc["1"]
        assert flip["bound_kind"] == "estimate" and math.isnan(flip["sigma_upper"])
        assert flip["sigma"] == pytest.approx(2.0, rel=1e-5)
        assert layers.attrs["bound_kind"] == "estimate"


def test_a_wrong_input_shape_is_one_line_without_traceback(capfd):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    with pytest.raises(RobustclipError, match=r"model fails on input shape \(3, 28, 28\): .*channels"):
        lipschitz_report(model, (3, 28, 28))
    assert "Traceback" not in capfd.readouterr().err


ROW_NAMES = {  # one name per operator, whatever the method: a module path, or conv+bn paths
    "simpleconv": ["normalize", "conv1+bn1", "fc1"],
    "simpleconv-composite": ["normalize", "conv1", "fc1"],
    "mnist-cnn": ["normalize", "block1", "block2", "block3", "avg_pool2d", "fc"],
}


@pytest.mark.parametrize("name", sorted(ROW_NAMES))
def test_rows_are_named_by_module_path_whatever_the_method(name):
    """A conv+BN module (models.ConvBN) is one row named by its path, as its composite
    wrapper is (``sigma/conv1`` in metrics.csv), whether a wrapper holds it or the walk
    pairs its conv and bn; a flat conv + BN is named by both paths."""
    args = {"width": 2} if name == "mnist-cnn" else {"channels": 2}
    for method in models.METHODS:
        if method == "fastclip-composite" and name == "simpleconv":
            continue  # no composite to wrap
        model = models.build_model(name, "mnist", method, **args).eval()
        _, rows = lipschitz_report(model, (1, 28, 28), iters=5, exact_max_dim=0)
        assert list(rows["name"]) == ROW_NAMES[name], method
        # the rows a wrapper's sigma/<name> estimates: the dense layer, and the composites
        # that fastclip-composite wraps whole
        composites = set(ROW_NAMES[name]) & {"conv1", "block1", "block2", "block3"}
        wrapped = {w.name for w in models.wrappers(model)} & set(rows["name"])
        assert wrapped == {ROW_NAMES[name][-1]} | (composites if method == "fastclip-composite"
                                                   else set()), method


def _jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """The exact spectral norm of the model's Jacobian at one input x (no batch dim), float64."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).flatten(), x)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2))


@pytest.mark.parametrize("group_size", [2, 3])
def test_groupsort_is_bounded_by_one_and_its_jacobian_norm_is_one(group_size):
    """GroupSort's Jacobian is a permutation matrix wherever it is differentiable: norm
    exactly 1, so the bound 1 is tight; a network through it is bounded by the product."""
    sort = GroupSort(group_size)
    bound, rows = lipschitz_report(nn.Sequential(sort), (6, 2, 2))
    assert bound == 1.0 and rows.empty
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert _jacobian_norm(sort.double(), torch.randn(6, 2, 2, generator=g, dtype=torch.float64)) \
            == pytest.approx(1.0, abs=1e-12)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), GroupSort(group_size), nn.Linear(12, 3)).double()
    bound, rows = lipschitz_report(net, (6,))
    exact = math.prod(float(torch.linalg.matrix_norm(m.weight.detach(), 2)) for m in (net[0], net[2]))
    assert bound == pytest.approx(exact, rel=1e-9) and rows.attrs["bound_kind"] == "upper"
    assert max(_jacobian_norm(net, torch.randn(6, generator=g, dtype=torch.float64))
               for _ in range(20)) <= bound


@pytest.mark.parametrize("name, args, layers", [("lipnet", {"width": 2, "hidden": 4}, 7),
                                               ("smallcnn", {"width": 2, "hidden": 6}, 4)])
def test_model_bound_holds_against_its_exact_jacobian(name, args, layers):
    """lipnet (MaxMin, pixel unshuffle) and smallcnn (ReLU, strided 4x4 convs) with
    fastclip: a guaranteed bound, the product of the rows (centring is an isometry), at
    least the exact Jacobian norm at random inputs."""
    torch.manual_seed(0)
    model = models.build_model(name, "mnist", "fastclip", **args).eval()
    bound, rows = lipschitz_report(model, (1, 28, 28))
    assert rows.attrs["bound_kind"] == "upper" and len(rows) == 1 + layers  # normalise + layers
    assert bound == pytest.approx(math.prod(rows["sigma_upper"]), rel=1e-12)
    twin = float64_twin(model)
    g = torch.Generator().manual_seed(1)
    norms = [_jacobian_norm(twin, torch.rand(1, 28, 28, generator=g, dtype=torch.float64))
             for _ in range(3)]
    assert 0 < max(norms) <= bound


def test_pixel_unshuffle_is_an_isometry():
    unshuffle = nn.PixelUnshuffle(2).double()
    assert lipschitz_report(nn.Sequential(unshuffle), (2, 4, 4))[0] == 1.0
    assert _jacobian_norm(unshuffle, torch.rand(2, 4, 4, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-12)
