"""PowerQR extraction against exact references (dense operator SVD, FFT for circular conv)."""
import warnings

import pytest
import torch
import torch.nn as nn

from robustclip import (
    SpectralClip,
    circular_conv_singular_values,
    dense_singular_values,
    singular_values,
    spectral_estimate,
)
from robustclip.errors import RobustclipError
from robustclip import spectral
from robustclip.spectral import dense_operator, gram_matrix
from helpers import inflate


def _bn(channels: int, dims: int = 2) -> nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    gen = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.2, 3.0, generator=gen)
        bn.weight.uniform_(-2, 2, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
    return bn


def _cases():
    pads = ["zeros", "reflect", "replicate", "circular"]
    cases = []
    for mode in pads:
        for stride in (1, 2):
            cases.append((f"conv2d-{mode}-s{stride}",
                          lambda m=mode, s=stride: nn.Conv2d(2, 4, 3, stride=s, padding=1, padding_mode=m),
                          (2, 8, 8)))
    cases += [
        ("conv2d-dilation2", lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 9, 9)),
        ("conv2d-groups2", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 7, 7)),
        ("conv2d-nopad-stride2", lambda: nn.Conv2d(1, 5, 4, stride=2), (1, 10, 10)),
        ("conv1d-replicate-dil2-groups2",
         lambda: nn.Conv1d(4, 6, 5, dilation=2, groups=2, padding=3, padding_mode="replicate"), (4, 16)),
        ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 4, 4, 4)),
        ("conv3d-circular-s2", lambda: nn.Conv3d(1, 2, 3, stride=2, padding=1, padding_mode="circular"),
         (1, 6, 6, 6)),
        ("linear", lambda: nn.Linear(30, 12), (30,)),
        ("batchnorm1d", lambda: _bn(7, 1), (7, 5)),
        ("batchnorm2d", lambda: _bn(3), (3, 4, 4)),
        ("avgpool2d", lambda: nn.AvgPool2d(2), (2, 6, 6)),
        ("avgpool2d-overlap", lambda: nn.AvgPool2d(3, stride=1, padding=1), (1, 6, 6)),
        ("conv+bn", lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), _bn(5)), (3, 6, 6)),
        ("conv+bn-circular-s2",
         lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="circular"), _bn(4)),
         (2, 8, 8)),
        ("conv-conv-pool", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3),
                                                 nn.AvgPool2d(2)), (2, 8, 8)),
        ("wrapped-composite", lambda: SpectralClip(nn.Sequential(SpectralClip(nn.Conv2d(2, 4, 3, padding=1)),
                                                                 _bn(4)), clip=None), (2, 6, 6)),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_top4_match_dense_reference(name, make, shape):
    torch.manual_seed(0)
    module = make()
    exact = dense_singular_values(module, shape, k=4)
    est = singular_values(module, shape, k=4)
    rel = ((est.double() - exact).abs() / exact).max().item()
    assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"


def test_circular_conv_matches_fft_formula_at_32x32():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
    exact = circular_conv_singular_values(conv.weight, (32, 32))[:4]
    est = singular_values(conv, (3, 32, 32), k=4)
    assert ((est.double() - exact).abs() / exact).max() <= 1e-4


def test_fft_formula_agrees_with_dense_operator():
    """The two references agree with each other: neither is trusted alone."""
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False)
    fft = circular_conv_singular_values(conv.weight, (6, 6))
    dense = dense_singular_values(conv, (2, 6, 6))
    assert torch.allclose(fft, dense[: fft.numel()], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_entries", [10**9, 500])  # one chunk; one basis input at a time
def test_gram_matrix_agrees_with_dense_operator(chunk_entries):
    torch.manual_seed(2)
    composite = nn.Sequential(nn.Conv2d(2, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5))
    with torch.no_grad():
        composite[1].running_var.uniform_(0.1, 0.5)
    shape = (2, 7, 7)
    dense = dense_operator(composite, shape)
    gram = gram_matrix(composite, shape, max_entries=chunk_entries)
    assert gram.dtype == torch.float64
    assert torch.allclose(gram, dense.T @ dense, rtol=1e-10, atol=1e-12)
    top = torch.linalg.eigvalsh(gram)[-1].sqrt()
    assert float(top) == pytest.approx(float(dense_singular_values(composite, shape, k=1)[0]), rel=1e-10)


def test_qr_sign_convention_does_not_matter(monkeypatch):
    """Flip the signs of QR's factors (still a valid QR): the estimate must not change.

    Reading sigma off diag(R) without abs loses up to 50% on such a flip.
    """
    conv = nn.Conv2d(2, 4, 3, padding=1)
    shape = (2, 8, 8)
    plain = singular_values(conv, shape, k=4, iters=300)
    qr = torch.linalg.qr

    def flipped(a, mode="reduced"):
        q, r = qr(a, mode=mode)
        signs = -torch.ones(r.shape[-2], dtype=r.dtype)
        return q * signs, r * signs.unsqueeze(-1)

    monkeypatch.setattr(torch.linalg, "qr", flipped)
    assert torch.allclose(singular_values(conv, shape, k=4, iters=300), plain, rtol=1e-5)


def test_state_grad_and_mode_untouched():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _bn(3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    singular_values(model, (1, 6, 6), k=2)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_convergence_is_reported(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    est = spectral_estimate(conv, (2, 8, 8), k=1, iters=2)
    assert est.iterations == 2 and float(est.rel_change) > 0
    # the iteration budget runs out (3 iterations instead of 5000) before tol is reached
    power_qr = spectral.power_qr
    monkeypatch.setattr(spectral, "power_qr", lambda A, x, iters, tol=None: power_qr(A, x, 3))
    with pytest.warns(UserWarning, match="stopped after 3 iterations with relative change"):
        singular_values(conv, (2, 16, 16), k=1, tol=1e-12)


@pytest.mark.parametrize("seed, scale", [(0, 20.0), (1, 1.0), (1, 20.0)])
def test_a_rank_deficient_map_converges_without_a_warning(seed, scale):
    """Linear 4 -> 3: the oversampled block of 4 holds a null vector, whose value (0)
    has no relative change and must not keep PowerQR from converging on sigma_1."""
    torch.manual_seed(seed)
    layer = inflate(nn.Linear(4, 3), scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = spectral_estimate(layer, (4,), k=1, tol=1e-6)
    assert est.iterations < 5000 and float(est.rel_change) <= 1e-6
    assert float(est.values[0]) == pytest.approx(float(torch.linalg.matrix_norm(layer.weight.detach(), 2)),
                                                 rel=1e-5)


def test_ritz_values_are_lower_bounds_along_the_way():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    exact = dense_singular_values(conv, (1, 8, 8), k=1)
    for iters in (1, 3, 10):
        assert singular_values(conv, (1, 8, 8), iters=iters)[0] <= exact[0] * (1 + 1e-6)


@pytest.mark.parametrize("module,shape", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 6, 6)),
    (nn.ReLU(), (1, 6, 6)),
    (nn.Sequential(nn.Linear(4, 4), nn.Tanh()), (4,)),
], ids=["conv-relu", "relu", "linear-tanh"])
def test_nonlinear_module_is_refused(module, shape):
    with pytest.raises(RobustclipError, match="not implicitly linear"):
        singular_values(module, shape)


def test_bad_k_and_nan_weights():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(RobustclipError, match="k must be"):
        singular_values(conv, (1, 5, 5), k=0)
    conv.weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(RobustclipError, match="'Conv2d'.*NaN"):
        singular_values(conv, (1, 5, 5))


# ---------------------------------------------------------------- the step of per-step tracking

#: blocks of several sizes and layers (the composite's 5 vectors among them), and a one-vector block
TRACKED = [(lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6), 5),
           (lambda: nn.Linear(12, 7), (12,), 5),
           (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), _bn(3)), (1, 7, 7), 3),
           (lambda: nn.Linear(5, 9), (5,), 1)]


def _projector(block: torch.Tensor) -> torch.Tensor:
    flat = block.flatten(1).double()
    return flat.T @ flat


def test_tracking_step_bounds_the_ritz_values_and_keeps_the_ritz_span():
    """Against the exact Rayleigh-Ritz step (eigh): the same next subspace (projectors),
    an orthonormal block, values sorted, the top value never below the top Ritz value and
    every squared value within twice the largest off-diagonal row mass of the
    Rayleigh-Ritz matrix of its squared Ritz value (Weyl, then the bounds' own shift); a
    one-vector block is exactly power_qr_step's."""
    torch.manual_seed(0)
    for make, shape, p in TRACKED:
        layer = make()
        A = spectral.linear_map(layer, shape)
        x = spectral.random_block(p, shape, generator=torch.Generator().manual_seed(p))
        for _ in range(4):  # a cold block, then warmer ones
            with spectral.eval_mode(layer):
                (values, nxt), = spectral.tracking_steps([(A, x)])
                ritz_values, ritz_next = spectral.power_qr_step(A, x)
                y = A(x).detach().flatten(1).double()
            gram = y @ y.T
            off = float((gram - torch.diag(gram.diagonal())).abs().sum(1).max())
            assert values.shape == (p,) and nxt.shape == x.shape
            assert bool((values[:-1] >= values[1:]).all())
            assert float(values[0]) >= float(ritz_values[0]) * (1 - 1e-6)
            assert float((values.double() ** 2 - ritz_values.double() ** 2).abs().max()) <= 2 * off + 1e-5
            assert torch.allclose(_projector(nxt), _projector(ritz_next), atol=1e-5)
            assert torch.allclose(nxt.flatten(1) @ nxt.flatten(1).T, torch.eye(p), atol=1e-5)
            if p == 1:
                assert torch.equal(values, ritz_values) and torch.equal(nxt, ritz_next)
            x = nxt


def test_tracking_step_of_a_ritz_basis_gives_the_ritz_values():
    """On a block that is its own Ritz basis (the Rayleigh-Ritz matrix diagonal, as after
    an initialisation or a clip event) the Gershgorin bounds are the Ritz values."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    shape = (2, 6, 6)
    A = spectral.linear_map(conv, shape)
    values, vectors = spectral.ritz(A, spectral.random_block(5, shape))
    (bounded, _), = spectral.tracking_steps([(A, vectors)])
    assert torch.allclose(bounded, values, rtol=1e-5)


def test_tracking_steps_of_several_layers_match_one_at_a_time():
    """Blocks of different sizes, batched by size: each result is the single-layer step's."""
    torch.manual_seed(0)
    layers = [(make(), shape, p) for make, shape, p in TRACKED]
    steps = [(spectral.linear_map(m, shape), spectral.random_block(p, shape)) for m, shape, p in layers]
    with spectral.eval_mode(layers[2][0]):
        together = spectral.tracking_steps(steps)
        alone = [spectral.tracking_steps([step])[0] for step in steps]
    for (values, nxt), (one_values, one_nxt), (_, x) in zip(together, alone, steps):
        assert values.shape == (x.shape[0],) and nxt.shape == x.shape
        assert torch.allclose(values, one_values, rtol=1e-6)
        assert torch.allclose(nxt, one_nxt, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    cpu = singular_values(conv, (2, 8, 8), k=2)
    gpu = singular_values(conv.cuda(), (2, 8, 8), k=2)
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-4)
