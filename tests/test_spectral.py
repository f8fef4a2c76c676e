"""PowerQR extraction against exact references (dense operator SVD, FFT for circular conv)."""
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


# ---------------------------------------------------------------- the small eigensolver of per-step tracking

#: per dtype: tolerance on eigenvalues and residuals (relative to ||M||), on orthonormality,
#: and on the projector onto each group of equal or nearly equal eigenvalues
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _spectrum(k: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, list[list[int]]]:
    """Eigenvalues (descending, float64) of a test matrix and its groups (positions of
    equal or nearly equal eigenvalues; groups are >= 0.7 apart).  kind: ``distinct``,
    ``repeated`` (exact repeats) or ``clustered`` (repeats perturbed by 1e-7)."""
    sizes = [1] * k if kind == "distinct" else [[3, 2, 1, 2][i % 4] for i in range(k)]
    while sum(sizes) > k:
        sizes[-1] -= 1
        sizes = [s for s in sizes if s]
    centres = torch.linspace(3.0, -2.0, len(sizes), dtype=torch.float64) if len(sizes) > 1 \
        else torch.tensor([1.5], dtype=torch.float64)
    spread = 1e-7 if kind == "clustered" else 0.0
    values, groups = [], []
    for centre, size in zip(centres, sizes):
        groups.append(list(range(len(values), len(values) + size)))
        values += (centre + spread * torch.randn(size, generator=gen, dtype=torch.float64)).tolist()
    return torch.tensor(values, dtype=torch.float64), groups


def _symmetric(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Q diag(values) Q^T for a random orthogonal Q (float64)."""
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    m = (q * values) @ q.T
    return (m + m.T) / 2


def _check_eig(m: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor,
               groups: list[list[int]] | None) -> None:
    """values/vectors of m against torch.linalg.eigh (same dtype): eigenvalues, residual,
    orthonormality, and, with ``groups``, the projector onto each group's eigenspace."""
    tol = TOL[m.dtype]
    norm = float(torch.linalg.matrix_norm(m.double(), 2))
    ref_values, ref_vectors = torch.linalg.eigh(m)
    ref_values, ref_vectors = ref_values.flip(0), ref_vectors.flip(1)
    assert values.dtype == vectors.dtype == m.dtype
    assert float((values - ref_values).abs().max()) <= tol * norm, (values, ref_values)
    assert bool((values[:-1] >= values[1:]).all())
    eye = torch.eye(len(values), dtype=m.dtype)
    assert float((vectors.T @ vectors - eye).abs().max()) <= tol
    assert float((m @ vectors - vectors * values).abs().max()) <= tol * norm
    for group in groups or []:
        mine = vectors[:, group] @ vectors[:, group].T
        ref = ref_vectors[:, group] @ ref_vectors[:, group].T
        assert float((mine - ref).abs().max()) <= 10 * tol, (group, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["distinct", "repeated", "clustered"])
@pytest.mark.parametrize("k", range(1, 9))
def test_symmetric_eig_matches_eigh(k, kind, dtype):
    """Jacobi in its default 10 sweeps against LAPACK: eigenvalues, residual,
    orthonormality, and the eigenspace of each group of (nearly) repeated eigenvalues."""
    gen = torch.Generator().manual_seed(100 * k)
    for _ in range(5):
        values, groups = _spectrum(k, kind, gen)
        m = _symmetric(values, gen).to(dtype)
        _check_eig(m, *spectral.symmetric_eig(m), groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_symmetric_eig_on_random_and_degenerate_matrices(dtype):
    """Gaussian symmetric matrices (any gaps), scaled ones, a zero matrix, the identity, a
    diagonal one out of order and a rank-one one."""
    gen = torch.Generator().manual_seed(7)
    cases = []
    for k in range(1, 9):
        a = torch.randn(k, k, generator=gen, dtype=torch.float64)
        cases += [a + a.T, 1e6 * (a + a.T), 1e-6 * (a + a.T)]
        cases += [torch.zeros(k, k, dtype=torch.float64), torch.eye(k, dtype=torch.float64),
                  torch.diag(torch.randn(k, generator=gen, dtype=torch.float64)),
                  a[:, :1] @ a[:, :1].T]
    for m in cases:
        m = m.to(dtype)
        _check_eig(m, *spectral.symmetric_eig(m), None)


def test_symmetric_eig_sweeps_are_what_converges_it():
    """One sweep does not diagonalise a random 8 x 8 matrix; the default does."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    m = a + a.T
    exact = torch.linalg.eigvalsh(m).flip(0)
    assert float((spectral.symmetric_eig(m, sweeps=1)[0] - exact).abs().max()) > 1e-3
    assert float((spectral.symmetric_eig(m)[0] - exact).abs().max()) < 1e-12


def test_symmetric_eig_solves_a_batch_as_one_matrix_at_a_time():
    gen = torch.Generator().manual_seed(11)
    batch = torch.stack([_symmetric(_spectrum(6, kind, gen)[0], gen)
                         for kind in ("distinct", "repeated", "clustered")]).reshape(3, 1, 6, 6)
    values, vectors = spectral.symmetric_eig(batch)
    assert values.shape == (3, 1, 6) and vectors.shape == (3, 1, 6, 6)
    for i in range(3):
        one_values, one_vectors = spectral.symmetric_eig(batch[i, 0])
        assert torch.allclose(values[i, 0], one_values, rtol=0, atol=1e-13)
        assert torch.allclose(vectors[i, 0], one_vectors, rtol=0, atol=1e-12)
        _check_eig(batch[i, 0], values[i, 0], vectors[i, 0], None)
    expanded, _ = spectral.symmetric_eig(batch[0, 0].mT.expand(2, 6, 6))  # not contiguous
    assert torch.allclose(expanded, values[0].expand(2, 6), rtol=0, atol=1e-13)


def test_power_qr_steps_of_several_layers_match_one_at_a_time():
    """Blocks of different sizes and layers, batched by size: each result is the
    single-layer step's (one-vector blocks need no eigensolver)."""
    torch.manual_seed(0)
    cases = [(nn.Conv2d(2, 4, 3, padding=1), (2, 6, 6), 5), (nn.Linear(12, 7), (12,), 5),
             (nn.Sequential(nn.Conv2d(1, 3, 3), _bn(3)), (1, 7, 7), 3), (nn.Linear(5, 9), (5,), 1)]
    steps = [(spectral.linear_map(m, shape), spectral.random_block(p, shape)) for m, shape, p in cases]
    with spectral.eval_mode(cases[2][0]):
        together = spectral.power_qr_steps(steps, sweeps=10)
        alone = [spectral.power_qr_step(A, x, sweeps=10) for A, x in steps]
    for (sigma, nxt), (one_sigma, one_nxt), (_, x) in zip(together, alone, steps):
        assert sigma.shape == (x.shape[0],) and nxt.shape == x.shape
        assert torch.allclose(sigma, one_sigma, rtol=1e-6)
        assert torch.allclose(nxt, one_nxt, atol=1e-5)


def test_power_qr_step_with_jacobi_matches_eigh():
    """The sync-free Rayleigh-Ritz step gives eigh's Ritz values and the same next block."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn(4))
    shape = (2, 6, 6)
    A = spectral.linear_map(conv, shape)
    x = spectral.random_block(5, shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # a cold block, then warmer ones
        with spectral.eval_mode(conv):
            ref_sigma, ref_next = spectral.power_qr_step(A, x)
            sigma, nxt = spectral.power_qr_step(A, x, sweeps=10)
        assert torch.allclose(sigma, ref_sigma, rtol=1e-5), (sigma, ref_sigma)
        overlap = (nxt.flatten(1) * ref_next.flatten(1)).sum(1).abs()  # rows agree up to sign
        assert torch.allclose(overlap, torch.ones(5), atol=1e-4), overlap
        x = ref_next


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    conv = nn.Conv2d(2, 4, 3, padding=1)
    cpu = singular_values(conv, (2, 8, 8), k=2)
    gpu = singular_values(conv.cuda(), (2, 8, 8), k=2)
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-4)
