"""Spectral numerics of implicitly linear layers.

A layer L is *implicitly linear* when A(x) = L(x) - L(0) is linear in x: convolutions of
any padding mode, stride, dilation or groups, Linear, BatchNorm with running statistics,
average pooling, and Sequential compositions of these (a conv followed by its BatchNorm).
The spectral norm of such a layer is the largest singular value of A as an operator on
inputs of one fixed shape ``input_shape`` = (C, H, W) (or (C, L), (C, D, H, W), (F,)).

PowerQR (Senderovich et al. 2022) finds the top-k singular values through autograd only:
for a block x of k orthonormal inputs, g = A^T A x is the input gradient of
0.5 * ||A(x)||^2, and a QR factorisation of g gives the next block.  Two choices here
differ from the reference implementation, both for accuracy:

* We iterate on A^T A rather than I + A^T A.  The fixed points are the same, and the
  convergence ratio is (sigma_{i+1} / sigma_i)^2 instead of
  (1 + sigma_{i+1}^2) / (1 + sigma_i^2), which is close to 1 for small sigmas.
* The singular values are Rayleigh-Ritz values, sqrt(eig(Y Y^T)) with Y = A(x), not
  read off the diagonal of R.  They are exact singular values of A restricted to the
  current block, always lower bounds of the true ones, and carry no QR sign ambiguity
  (reading R_ii without abs gives sqrt(2 + sigma^2)-type nonsense after a sign flip).
  Per-step tracking (:func:`tracking_steps`) bounds the Rayleigh-Ritz matrix instead of
  diagonalising it: no eigensolver, no host synchronisation.

Only input gradients are taken (``torch.autograd.grad`` with respect to x); no weight's
``.grad`` is touched.  Layers are evaluated in eval mode (BatchNorm uses and never
updates its running statistics) and their modes are restored afterwards.

Exact references: :func:`dense_operator` (impulse responses, then SVD) for small shapes,
:func:`gram_matrix` (A^T A, chunked) for small inputs with large outputs, and
:func:`circular_conv_singular_values` (Sedghi et al. 2019) for circular padding.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from robustclip.errors import RobustclipError

LinearMap = Callable[[Tensor], Tensor]
"""A(x) for a batch x of shape (n, *input_shape); output (n, *output_shape)."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` and all its children in eval mode; restore each one's mode on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _unwrap(module: nn.Module) -> nn.Module:
    """The layer inside spectral wrappers (they are pass-throughs in eval mode)."""
    while getattr(module, "is_spectral_wrapper", False):
        module = module.module
    return module


def _batchnorm_scale(bn: nn.Module, weight: Tensor | None = None) -> Tensor:
    """Per-channel scale gamma / sqrt(running_var + eps) of a BatchNorm in eval mode."""
    gamma = weight if weight is not None else bn.weight
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale if gamma is None else gamma * scale


def _fast_map(module: nn.Module) -> LinearMap | None:
    """A bias-free functional form of A for known layers, or None (use L(x) - L(0))."""
    module = _unwrap(module)
    if isinstance(module, nn.Linear):
        return lambda x: F.linear(x, module.weight)
    if isinstance(module, _CONVS):
        return lambda x: module._conv_forward(x, module.weight, None)
    if isinstance(module, _BATCHNORMS) and module.running_var is not None:
        def bn_map(x: Tensor) -> Tensor:
            scale = _batchnorm_scale(module)
            return x * scale.reshape((1, -1) + (1,) * (x.dim() - 2))
        return bn_map
    if isinstance(module, nn.Sequential):
        maps = [_fast_map(m) for m in module]
        if all(m is not None for m in maps):
            def seq_map(x: Tensor) -> Tensor:
                for m in maps:
                    x = m(x)
                return x
            return seq_map
    return None


def linear_map(module: nn.Module, input_shape: Sequence[int]) -> LinearMap:
    """Return A(x) = L(x) - L(0) for ``module`` on inputs of shape (n, *input_shape).

    Known layers (conv, linear, BatchNorm, Sequentials of them) get an exact bias-free
    functional form that never changes the module's state.  Any other module is run in
    eval mode and L(0) is subtracted; call it inside :func:`eval_mode` for speed, it
    also works outside (it switches the mode itself).
    """
    fast = _fast_map(module)
    if fast is not None:
        return fast

    def generic(x: Tensor) -> Tensor:
        with eval_mode(module):
            zero = torch.zeros((1, *input_shape), dtype=x.dtype, device=x.device)
            return module(x) - module(zero)

    return generic


def functional_linear_map(
    module: nn.Module, input_shape: Sequence[int], params: Mapping[str, Tensor]
) -> LinearMap:
    """A(x) for ``module`` with some parameters replaced by ``params`` (name -> tensor).

    Used to take gradients of A with respect to weights without touching ``.grad``.
    The module is evaluated in eval mode (running statistics used, never updated).
    """

    def mapped(x: Tensor) -> Tensor:
        with eval_mode(module):
            zero = torch.zeros((1, *input_shape), dtype=x.dtype, device=x.device)
            both = torch.func.functional_call(module, dict(params), (torch.cat([zero, x]),))
            return both[1:] - both[:1]

    return mapped


@dataclass
class SpectralEstimate:
    """Result of PowerQR.

    values:     (k,) singular values, descending (Ritz values: lower bounds that converge).
    vectors:    (k, *input_shape) orthonormal right singular vectors, in the same order.
    rel_change: scalar tensor, max_i |sigma_i - sigma_i(previous iteration)| / sigma_i at
                the last iteration: how far from convergence the estimate is.
    iterations: iterations run.
    """

    values: Tensor
    vectors: Tensor
    rel_change: Tensor
    iterations: int

    def converged(self, tol: float) -> bool:
        """True when the last iteration changed every sigma by at most ``tol`` (relative)."""
        return bool(self.rel_change <= tol)


def random_block(k: int, input_shape: Sequence[int], *, like: Tensor | None = None,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """k orthonormal random inputs, shape (k, *input_shape)."""
    if like is not None:
        dtype, device = like.dtype, like.device
    d = math.prod(input_shape)
    if k > d:
        raise RobustclipError(f"k={k} exceeds the input dimension {d} of shape {tuple(input_shape)}")
    x = torch.randn((d, k), generator=generator, dtype=dtype or torch.float32)
    q, _ = torch.linalg.qr(x)
    return q.T.reshape((k, *input_shape)).to(device)


def _products(A: LinearMap, x: Tensor) -> tuple[Tensor, Tensor]:
    """(A x, A^T A x) of the block x (k, *input_shape), without graph; A^T A x is the input
    gradient of 0.5 ||A x||^2 (no weight's .grad is touched)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = A(x)
        (g,) = torch.autograd.grad(y, x, grad_outputs=y)
    return y.detach(), g


def _next_block(g: Tensor, evals: Tensor, evecs: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Ritz values from the eigenpairs (descending) of the Rayleigh-Ritz matrix, and the
    next block: A^T A x rotated to the Ritz order, orthonormalised (QR), shape ``shape``."""
    q, _ = torch.linalg.qr(g.flatten(1).T @ evecs)  # (d, k), columns in Ritz order
    return evals.clamp_min(0).sqrt(), q.T.reshape(shape)


def power_qr_step(A: LinearMap, x: Tensor) -> tuple[Tensor, Tensor]:
    """One PowerQR iteration with a Rayleigh-Ritz step.

    x: (k, *input_shape) with orthonormal rows.  Returns (sigmas, x_next): the Ritz
    values of A on span(x), shape (k,) descending, and the next orthonormal block,
    ordered so that row i follows the i-th Ritz vector.  The k x k eigenproblem is
    solved by ``torch.linalg.eigh`` (exact; on CUDA it synchronises with the host):
    per-step tracking uses :func:`tracking_steps` instead.
    """
    y, g = _products(A, x)
    if x.shape[0] == 1:
        return _single(y, g)
    y = y.flatten(1)
    evals, evecs = torch.linalg.eigh(y @ y.T)  # ascending
    return _next_block(g, evals.flip(0), evecs.flip(1), x.shape)


def _single(y: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """A PowerQR step of a one-vector block: sigma = ||A x||, next x = g / ||g||."""
    sigma = torch.linalg.vector_norm(y, dim=tuple(range(1, y.dim())))
    return sigma, g / torch.linalg.vector_norm(g).clamp_min(torch.finfo(g.dtype).tiny)


def tracking_steps(steps: Sequence[tuple[LinearMap, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """One warm PowerQR step for each (A, x) of ``steps``, as per-step tracking runs it:
    torch operations only, no eigendecomposition, no host synchronisation.

    A one-vector block is as in :func:`power_qr_step`: sigma = ||A x||, next x = A^T A x,
    normalised.  A block of k > 1 vectors is not rotated to its Ritz vectors: the next
    block is the Q factor of A^T A x in the block's own order (orthogonal iteration,
    whose span is the one the Rayleigh-Ritz step gives), and its values are the square
    roots of the Gershgorin row bounds r_i = sum_j |G_ij| of its Rayleigh-Ritz matrix
    G = Y Y^T, Y = A x, sorted descending.  By Gershgorin's theorem the first is at least
    the block's top Ritz value sqrt(lambda_max(G)), so a rescale by it never clips less
    than the exact Rayleigh-Ritz step would; it is above it by the off-diagonal mass of
    G, small while the block stays near a Ritz basis, as orthogonal iteration and the
    exact Ritz step of every initialisation and clip event keep it.  Measured by
    ``bench/tracking_bound.py`` on simpleconv-composite (5 vectors, MNIST, SGD momentum
    0.9, 300 steps, clip events every 50): median 0.2% and at most 1.5% above the top
    Ritz value at lr 0.01, median 0.3% and at most 3.6% at lr 0.05.  Each squared value
    is within twice the largest off-diagonal row mass of G of the squared Ritz value of
    its rank (Weyl's inequality).

    The Rayleigh-Ritz matrices of the blocks of one size, dtype and device are bounded
    together, so the number of operations launched grows by one product per layer.
    Returns (values (k,), x_next (k, *input_shape)) per step.
    """
    products = [_products(A, x) for A, x in steps]
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(steps)
    batches: dict[tuple, list[int]] = {}
    for i, ((_, x), (y, g)) in enumerate(zip(steps, products)):
        if x.shape[0] == 1:
            out[i] = _single(y, g)
        else:
            batches.setdefault((x.shape[0], y.dtype, y.device), []).append(i)
    for members in batches.values():
        ys = [products[i][0].flatten(1) for i in members]
        grams = torch.stack([y @ y.T for y in ys]) if len(ys) > 1 else (ys[0] @ ys[0].T)[None]
        values = grams.abs().sum(-1).sort(dim=-1, descending=True).values.sqrt()
        for j, i in enumerate(members):
            g = products[i][1]
            q, _ = torch.linalg.qr(g.flatten(1).T)
            out[i] = (values[j], q.T.reshape(g.shape))
    return out  # type: ignore[return-value]


def power_qr(A: LinearMap, x: Tensor, iters: int, tol: float | None = None,
             check_every: int = 10) -> SpectralEstimate:
    """Run up to ``iters`` PowerQR iterations from the orthonormal block ``x``.

    With ``tol``, stop early once the relative change of every Ritz value over one
    iteration is below ``tol`` (checked every ``check_every`` iterations: each check is
    one host synchronisation).  A Ritz value sigma_i comes from an eigenvalue of the
    Gram matrix of the block, whose rounding error (machine epsilon eps times sigma_1^2)
    moves sigma_i by about eps (sigma_1 / sigma_i)^2 / 2 relative: values below
    sigma_1 sqrt(eps / tol), which no iteration can settle to ``tol`` (the null space of
    a rank-deficient map, Linear 4 -> 3 with a block of 4, among them), count as
    converged.  The returned vectors are the Ritz vectors of the last
    evaluated block, and values are the singular values of A on them.
    """
    if iters < 1:
        raise RobustclipError(f"iters must be >= 1, got {iters}")
    rel = None
    prev = None
    done = 0
    for done in range(1, iters + 1):
        sigma, x = power_qr_step(A, x)
        if prev is not None:
            rel = _relative_change(sigma, prev, tol)
            if tol is not None and done % check_every == 0 and rel <= tol:
                break
        prev = sigma
    values, vectors = ritz(A, x)
    if rel is None:
        rel = torch.full((), float("inf"), dtype=values.dtype, device=values.device)
    return SpectralEstimate(values, vectors, rel, done)


def _relative_change(sigma: Tensor, prev: Tensor, tol: float | None) -> Tensor:
    """max_i |sigma_i - prev_i| / sigma_i over the values above the rounding floor
    sigma_1 sqrt(eps / tol) (sqrt(eps) without ``tol``; sigma descending); a scalar
    tensor, no host synchronisation."""
    eps = torch.finfo(sigma.dtype).eps
    floor = sigma[0] * math.sqrt(eps / (tol if tol else 1.0))
    change = (sigma - prev).abs() / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.where(sigma > floor, change, torch.zeros_like(change)).max()


def ritz(A: LinearMap, x: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh-Ritz on span(x): (values (k,) descending, Ritz vectors (k, *shape))."""
    with torch.no_grad():
        y = A(x).flatten(1)
        if x.shape[0] == 1:
            return y.norm(dim=1), x
        evals, evecs = torch.linalg.eigh(y @ y.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
        vectors = (evecs.T @ x.flatten(1)).reshape(x.shape)
        return evals.clamp_min(0).sqrt(), vectors


def check_finite(module: nn.Module, name: str) -> None:
    """Raise a clear error naming the layer when any parameter or buffer is NaN/inf."""
    for pname, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RobustclipError(f"layer {name!r}: {pname} has NaN or infinite values")


def check_linear(module: nn.Module, input_shape: Sequence[int], name: str = "",
                 rtol: float = 1e-3) -> None:
    """Refuse a module that is not linear once L(0) is removed (e.g. one holding a ReLU).

    Probes A(a x1 + b x2) = a A(x1) + b A(x2) and A(-x) = -A(x) on random inputs, in
    eval mode.  Raises :class:`RobustclipError` naming the layer when the relative
    defect exceeds ``rtol``.
    """
    label = name or type(module).__name__
    param = next(iter([*module.parameters(), *module.buffers()]), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(1234)
    x1, x2 = (torch.randn((2, *input_shape), generator=gen, dtype=dtype).to(device)
              for _ in range(2))
    a, b = 0.7, -1.3
    try:
        with torch.no_grad(), eval_mode(module):
            zero = torch.zeros((1, *input_shape), dtype=dtype, device=device)
            batch = torch.cat([zero, x1, x2, a * x1 + b * x2, -x1])
            out = module(batch)
    except Exception as err:  # a layer that cannot take this input shape at all
        raise RobustclipError(f"layer {label!r} fails on input shape {tuple(input_shape)}: {err}") from None
    if not isinstance(out, Tensor) or out.shape[0] != batch.shape[0]:
        raise RobustclipError(f"layer {label!r} does not map a batch to a batch of tensors")
    A = out[1:] - out[:1]
    ax1, ax2, mix, neg = A[0:2], A[2:4], A[4:6], A[6:8]
    scale = (ax1.abs().max() + ax2.abs().max()).clamp_min(1e-12)
    defect = max(float((mix - (a * ax1 + b * ax2)).abs().max() / scale),
                 float((neg + ax1).abs().max() / scale))
    if not math.isfinite(defect) or defect > rtol:
        raise RobustclipError(
            f"layer {label!r} is not implicitly linear (L(x) - L(0) fails the linearity "
            f"probe by {defect:.2g}); wrap only conv, linear, batch-norm, pooling or "
            f"compositions of them, without activations")


def singular_values(module: nn.Module, input_shape: Sequence[int], k: int = 1,
                    iters: int | None = None, tol: float = 1e-6, seed: int = 0) -> Tensor:
    """Top-k singular values (descending) of the implicitly linear ``module``.

    input_shape: shape of one input without the batch dimension, e.g. (1, 28, 28).
    iters:       PowerQR iterations; None iterates to relative change ``tol`` (max 5000).
    The block is oversampled (k + 4 vectors) so that sigma_k converges as fast as
    sigma_1.  Warns when the estimate did not reach ``tol``.  Mode and running
    statistics of the module are left exactly as they were.
    """
    est = spectral_estimate(module, input_shape, k=k, iters=iters, tol=tol, seed=seed)
    return est.values


def spectral_estimate(module: nn.Module, input_shape: Sequence[int], k: int = 1,
                      iters: int | None = None, tol: float = 1e-6, seed: int = 0,
                      oversample: int = 4) -> SpectralEstimate:
    """Like :func:`singular_values`, returning the vectors and convergence too."""
    if k < 1:
        raise RobustclipError(f"k must be >= 1, got {k}")
    input_shape = tuple(int(s) for s in input_shape)
    name = type(_unwrap(module)).__name__
    check_finite(module, name)
    check_linear(module, input_shape, name)
    A = linear_map(module, input_shape)
    param = next(iter([*module.parameters(), *module.buffers()]), None)
    like = param if param is not None and param.is_floating_point() else torch.zeros(())
    p = min(k + oversample, math.prod(input_shape))
    x = random_block(p, input_shape, like=like, generator=torch.Generator().manual_seed(seed))
    with eval_mode(module):
        est = power_qr(A, x, iters if iters is not None else 5000,
                       tol=None if iters is not None else tol)
    if iters is None and not est.converged(tol):
        warnings.warn(f"{name}: PowerQR stopped after {est.iterations} iterations with "
                      f"relative change {float(est.rel_change):.2g} > tol {tol:g}", stacklevel=2)
    return SpectralEstimate(est.values[:k], est.vectors[:k], est.rel_change, est.iterations)


# ---------------------------------------------------------------- exact references


def dense_operator(module: nn.Module, input_shape: Sequence[int],
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix of A, shape (prod(output_shape), prod(input_shape)), from impulse responses.

    Computed on a float64 copy of the module in eval mode; the module itself is untouched.
    Meant for small shapes (the matrix is dense).
    """
    d = math.prod(input_shape)
    twin = copy.deepcopy(module).to(dtype)
    device = module_device(twin)
    eye = torch.eye(d, dtype=dtype, device=device).reshape((d, *input_shape))
    with torch.no_grad(), eval_mode(twin):
        zero = torch.zeros((1, *input_shape), dtype=dtype, device=device)
        cols = twin(eye) - twin(zero)
    return cols.reshape(d, -1).T


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with none)."""
    return next(iter([*module.parameters(), *module.buffers()]), torch.zeros(())).device


def float64_twin(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` in eval mode; the module itself is untouched.

    The copy computes the same function to about 1e-16 relative instead of 1e-7: the
    exact references here, and empirical Lipschitz ratios (``robustclip.bounds``), use it
    so that they measure the network rather than its rounding.
    """
    return copy.deepcopy(module).eval().to(torch.float64)


def gram_matrix(module: nn.Module, input_shape: Sequence[int], *,
                max_entries: int = 2**22) -> Tensor:
    """A^T A, shape (d, d) with d = prod(input_shape), in float64.

    Computed on a float64 copy of the module in eval mode, a chunk of basis inputs at a
    time (A^T A e_i is the input gradient of 0.5 ||A(e_i)||^2), with at most
    ``max_entries`` output values per chunk: memory grows with d^2, not with d x the
    output size as for :func:`dense_operator`.  Its largest eigenvalue is sigma_1^2.
    """
    d = math.prod(input_shape)
    twin = float64_twin(module)
    device = module_device(twin)
    with torch.no_grad(), eval_mode(twin):
        zero = torch.zeros((1, *input_shape), dtype=torch.float64, device=device)
        offset = twin(zero)
    chunk = max(1, min(d, max_entries // max(offset.numel(), 1)))
    columns = []
    with eval_mode(twin), torch.enable_grad():
        for start in range(0, d, chunk):
            n = min(chunk, d - start)
            basis = torch.zeros((n, d), dtype=torch.float64, device=device)
            basis[:, start:start + n] = torch.eye(n, dtype=torch.float64, device=device)
            x = basis.reshape((n, *input_shape)).requires_grad_(True)
            y = twin(x) - offset
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
            columns.append(g.detach().reshape(n, d))
    return torch.cat(columns)  # symmetric: rows are the columns


def dense_singular_values(module: nn.Module, input_shape: Sequence[int],
                          k: int | None = None) -> Tensor:
    """Exact singular values (descending, float64) of A via the dense matrix; top ``k``."""
    s = torch.linalg.svdvals(dense_operator(module, input_shape))
    return s if k is None else s[:k]


def circular_conv_singular_values(weight: Tensor, input_size: Sequence[int]) -> Tensor:
    """All singular values (descending, float64) of a stride-1 circular 2-D convolution.

    weight: (c_out, c_in, kh, kw) with groups = 1; input_size: (H, W) with kh <= H and
    kw <= W.  Sedghi et al. (2019): they are the singular values of the c_out x c_in
    matrices of the 2-D FFT of the kernel zero-padded to (H, W), one per frequency.
    """
    if weight.dim() != 4:
        raise RobustclipError("circular_conv_singular_values takes a 2-D conv kernel (c_out, c_in, kh, kw)")
    spectrum = torch.fft.fft2(weight.detach().to(torch.float64), s=tuple(input_size))
    per_freq = torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1))
    return per_freq.flatten().sort(descending=True).values
