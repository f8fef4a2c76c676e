"""Guaranteed upper bounds of the spectral norm of implicitly linear operators.

PowerQR (``spectral.spectral_estimate``) gives Ritz values, which converge from BELOW:
a certificate needs an upper bound of every sigma (method.md section 4).  This module
bounds sigma = ||A||_2 (output L2 norm per input L2 norm, dimensionless) of one operator
on inputs of one fixed shape ``input_shape`` = (C, *spatial) or (F,), from its weights,
without iterating:

* ``nn.Linear``: exact, the largest singular value of the weight (float64 SVD).
* eval-mode BatchNorm alone: exact, max_c |gamma_c| / sqrt(running_var_c + eps).
* the input normalisation :class:`robustclip.models.Normalize`: exact, max_c 1 / |std_c|.
* Conv1d/2d/3d of any padding mode, stride, dilation and groups, alone or followed by its
  eval-mode BatchNorm (``Sequential(conv, bn)``, spectral wrappers unwrapped): the BN is
  folded into the kernel (row c times gamma_c / sqrt(var_c + eps); its shift does not
  change a Lipschitz constant), then :func:`conv_upper_bound` (FFT, Sedghi et al. 2019).
* average pooling (any kernel, stride, padding, ``ceil_mode``, ``count_include_pad``,
  ``divisor_override``, adaptive): :func:`nonnegative_upper_bound` (Schur test).

Anything else: None (no bound known; the caller falls back to an estimate).
:func:`sigma_upper_bound` adds the exact sigma of any operator with a small input (the
float64 Gram matrix) and is what ``bounds.lipschitz_report`` uses.

Every computation runs in float64.  ``kind`` "exact" means equal to sigma up to float64
rounding (relative error ~1e-13, far below the float32 rounding of the network's own
forward pass, which no bound here covers).  ``kind`` "upper" values are multiplied by
(1 + SAFETY) for rounding.  With u = 1.1e-16: each kernel DFT coefficient, a sum of K
taps, is off by at most ~K u sum_j |w_j|, so each frequency's matrix by at most
K^1.5 u ||w||_F (Frobenius), and its SVD adds ~u of its norm; by Parseval some frequency
has ||W(f)||_F >= ||w||_F, so the largest ||W(f)||_2 is at least ||w||_F / sqrt(min(c_out,
c_in)).  The relative error is thus below K^1.5 sqrt(min(c_out, c_in)) u: 7e-14 for a 3x3
kernel with 512 channels, 5e-11 for a 7x7x7 Conv3d with 4096 channels.  The
Schur test's sums of n nonnegative terms are off by at most n u relative.  SAFETY = 1e-6
covers all of it and is invisible next to the bounds' own slack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from robustclip.errors import RobustclipError
from robustclip.models import Normalize
from robustclip.spectral import _BATCHNORMS, _CONVS, _unwrap, float64_twin, gram_matrix

SAFETY = 1e-6
"""Relative margin added to every "upper" value for float64 rounding (module docstring)."""

AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_SVD_BATCH = 4096  # per-frequency matrices per svdvals call (bounds the workspace)


@dataclass(frozen=True)
class UpperBound:
    """sigma <= value (kind "upper") or sigma == value up to float64 rounding ("exact");
    ``how`` says which argument gave it (for logs and the report)."""

    value: float
    kind: str
    how: str


def sigma_upper_bound(module: nn.Module, input_shape: Sequence[int], *, nonnegative: bool = False,
                      exact_max_dim: int = 1024, max_entries: int = 2**22) -> UpperBound | None:
    """The best bound known of sigma of ``module`` on inputs of ``input_shape``.

    In order: an exact formula (:func:`operator_upper_bound` of kind "exact"); the exact
    sigma from the float64 Gram matrix A^T A (``spectral.gram_matrix``, ``max_entries``
    output values per chunk) when the input has at most ``exact_max_dim`` values; a
    guaranteed upper bound; None.
    """
    shape = tuple(int(s) for s in input_shape)
    upper = operator_upper_bound(module, shape, nonnegative=nonnegative)
    if (upper is None or upper.kind != "exact") and math.prod(shape) <= exact_max_dim:
        gram = gram_matrix(module, shape, max_entries=max_entries)
        return UpperBound(float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()), "exact",
                          "Gram matrix")
    return upper


def operator_upper_bound(module: nn.Module, input_shape: Sequence[int], *,
                         nonnegative: bool = False) -> UpperBound | None:
    """Upper bound of sigma of the implicitly linear ``module`` on inputs of ``input_shape``.

    input_shape: one input without the batch dimension.  nonnegative: the caller knows
    that the operator's matrix has no negative entry (a functional average pool), which
    allows :func:`nonnegative_upper_bound`.  Returns None where no bound is known.
    """
    shape = tuple(int(s) for s in input_shape)
    if (conv_bn := _conv_batchnorm(module)) is not None:
        with torch.no_grad():
            return conv_upper_bound(conv_bn[0], shape, _bn_scale(conv_bn[1]))
    layers = _layers(module)
    if len(layers) != 1:
        return None
    (layer,) = layers
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            top = torch.linalg.svdvals(layer.weight.detach().double())[0]
            return UpperBound(float(top), "exact", "SVD of the weight")
        if _is_eval_bn(layer):
            return UpperBound(float(_bn_scale(layer).abs().max()), "exact",
                              "max |gamma| / sqrt(var + eps)")
        if isinstance(layer, _CONVS):
            return conv_upper_bound(layer, shape)
        if isinstance(layer, Normalize):
            return _normalize_bound(layer, shape)
    if nonnegative or isinstance(layer, AVG_POOLS):
        return nonnegative_upper_bound(module, shape)
    return None


def _layers(module: nn.Module) -> list[nn.Module]:
    """The layers of ``module`` (spectral wrappers unwrapped): a Sequential's, else itself."""
    inner = _unwrap(module)
    return [_unwrap(m) for m in inner] if isinstance(inner, nn.Sequential) else [inner]


def _conv_batchnorm(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(conv, BatchNorm) of a conv followed by a BatchNorm with running statistics (a
    conv + BN composite, spectral wrappers unwrapped); None for any other module."""
    layers = _layers(module)
    if len(layers) == 2 and isinstance(layers[0], _CONVS) and _is_eval_bn(layers[1]):
        return layers[0], layers[1]
    return None


def _is_eval_bn(module: nn.Module) -> bool:
    return isinstance(module, _BATCHNORMS) and module.running_var is not None


def _bn_scale(bn: nn.Module, var: Tensor | None = None) -> Tensor:
    """gamma / sqrt(var + eps) per channel, (C,), computed in float64 and differentiable in
    gamma (take it under ``torch.no_grad`` for a number); var: the running variance unless
    given (a training batch's, differentiable in what produced it)."""
    var = bn.running_var.detach() if var is None else var
    scale = torch.rsqrt(var.double() + bn.eps)
    return scale if bn.weight is None else scale * bn.weight.double()


def _normalize_bound(layer: Normalize, shape: tuple[int, ...]) -> UpperBound | None:
    """(x - mean) / std is a diagonal scaling by 1 / std_c when mean and std broadcast to
    the input's shape without enlarging it (every channel has at least one element)."""
    full = (1, *shape)
    if any(torch.broadcast_shapes(full, t.shape) != full for t in (layer.mean, layer.std)):
        return None
    inv = 1 / layer.std.detach().double().abs()
    return UpperBound(float(inv.max()), "exact", "max 1 / std")


def conv_upper_bound(conv: nn.Module, input_shape: Sequence[int],
                     scale: Tensor | None = None) -> UpperBound:
    """Upper bound of sigma of ``conv`` (Conv1d/2d/3d) on inputs (C, *n), via the FFT.

    scale: optional (c_out,) per-output-channel factor folded into the kernel (an
    eval-mode BatchNorm after the conv).  With padding (l_i, r_i) per spatial dim, the
    layer is A = S o C_N o P:

    * P maps the input (grid n) to the padded input (grid N = n + l + r): each padded
      pixel copies one input pixel (reflect, replicate) or is 0 (zeros).  P^T P is then
      diagonal with the number of copies of each input pixel, so ||P|| = sqrt(max copies)
      exactly: 1 for zeros, up to 2 per padded dim for reflect/replicate.  The copy counts
      are read off ``F.pad`` of the pixel indices, the function the layer itself uses.
    * C_N: the stride-1 circular correlation with the dilated kernel on grid N.  A valid
      (unpadded) conv of the padded input reads windows that never wrap on grid N (the
      layer's output is non-empty, so the dilated kernel fits), hence equals C_N followed
      by a crop.  ||C_N|| = max over the N frequencies of the top singular value of the
      c_out x c_in matrix of kernel DFT coefficients (Sedghi, Gupta & Long 2019): exact.
    * S: crop and stride-s subsampling, a selection of distinct rows: ||S|| <= 1.

    Circular padding instead reads the input itself periodically: output i is row
    (s i - l) mod n of C_n on the input grid (a dilated kernel longer than n aliases;
    the DFT on grid n handles that), so A = S o C_n with S a row selection that may
    repeat rows: ||S|| = sqrt(max repeats).  With stride 1 and an output as large as the
    input, S is a permutation and the bound is exact.

    Groups: the per-frequency matrix is block diagonal, so its norm is the max over the
    groups' blocks.  Returns kind "exact" (circular, stride 1, output grid = input grid)
    or "upper" (value times 1 + SAFETY).
    """
    grid, factor, exact, how = _conv_geometry(conv, input_shape)
    with torch.no_grad():
        w = _scaled_kernel(conv.weight.detach().double(), scale)
        sigma = circular_conv_norm(w, grid, conv.dilation, conv.groups) * factor
    if exact:
        return UpperBound(sigma, "exact", how)
    return UpperBound(sigma * (1 + SAFETY), "upper", how)


def _scaled_kernel(weight: Tensor, scale: Tensor | None) -> Tensor:
    """The kernel (c_out, ...) with output channel c times scale_c (a folded BatchNorm)."""
    if scale is None:
        return weight
    return weight * scale.to(weight.dtype).reshape((-1,) + (1,) * (weight.dim() - 1))


def _conv_geometry(conv: nn.Module, input_shape: Sequence[int]
                   ) -> tuple[tuple[int, ...], float, bool, str]:
    """(grid, factor, exact, how) of :func:`conv_upper_bound`'s argument: sigma <= factor
    times the norm of the circular correlation on ``grid``, with equality when ``exact``."""
    kernel = tuple(conv.weight.shape[2:])
    n = tuple(int(s) for s in input_shape[1:])
    dil, stride = tuple(conv.dilation), tuple(conv.stride)
    pads = _padding(conv.padding, kernel, dil)
    out = tuple((ni + l + r - d * (k - 1) - 1) // s + 1
                for ni, (l, r), d, k, s in zip(n, pads, dil, kernel, stride))
    if conv.padding_mode == "circular":
        repeats = math.prod(max(_counts(torch.arange(o) * s - l, ni))
                            for o, s, (l, _), ni in zip(out, stride, pads, n))
        exact = all(s == 1 for s in stride) and out == n
        return n, math.sqrt(repeats), exact, f"FFT on the input grid {n}, row repeats {repeats}"
    grid = tuple(ni + l + r for ni, (l, r) in zip(n, pads))
    copies = _pad_copies(n, pads, conv.padding_mode)
    return (grid, math.sqrt(copies), False,
            f"FFT on the padded grid {grid}, {conv.padding_mode} padding copies {copies}")


def _padding(padding: str | Sequence[int], kernel: Sequence[int],
             dilation: Sequence[int]) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as torch applies it ('same' puts the odd
    pixel on the right)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(int(p), int(p)) for p in padding]


def _counts(index: Tensor, size: int) -> list[int]:
    """How often each of 0 .. size - 1 occurs in ``index`` taken modulo ``size``."""
    return torch.bincount(index.remainder(size), minlength=size).tolist()


def _pad_copies(n: tuple[int, ...], pads: list[tuple[int, int]], mode: str) -> int:
    """Largest number of padded pixels that copy one input pixel (1 for zero padding)."""
    if mode == "zeros":
        return 1
    d = math.prod(n)
    index = torch.arange(d, dtype=torch.float64).reshape(1, 1, *n)
    flat = [p for lr in reversed(pads) for p in lr]  # F.pad wants the last dim first
    padded = F.pad(index, flat, mode=mode).flatten().long()
    return int(torch.bincount(padded, minlength=d).max())


def circular_conv_norm(weight: Tensor, grid: Sequence[int], dilation: Sequence[int],
                       groups: int = 1) -> float:
    """Spectral norm of the stride-1 circular correlation with ``weight`` on ``grid``.

    weight: (c_out, c_in / groups, *k) for 1, 2 or 3 spatial dims; grid: spatial sizes N;
    dilation: per dim.  Tap j sits at (j * dilation) mod N (taps landing on one cell add:
    that is what the periodic operator does).  Returns, in float64, the max over the
    frequencies of the top singular value of each group's (c_out / groups) x (c_in /
    groups) block of the kernel DFT (Sedghi et al. 2019; a real kernel's spectrum at -f
    is the conjugate of that at f, so the half spectrum of ``rfftn`` suffices).
    """
    per_freq, _ = _kernel_spectrum(weight.detach().to(torch.float64), grid, dilation, groups)
    return max(float(torch.linalg.matrix_norm(chunk, ord=2).max())
               for chunk in per_freq.split(_SVD_BATCH))


def _tap_cells(kernel: Sequence[int], grid: Sequence[int], dilation: Sequence[int],
               device: torch.device) -> Tensor:
    """(K,) row-major flat index on ``grid`` of each kernel tap, dilated, modulo the grid."""
    axes = [torch.arange(k, device=device) * d % g for k, d, g in zip(kernel, dilation, grid)]
    cells = torch.zeros((), dtype=torch.long, device=device)
    for axis, g in zip(axes, grid):
        cells = (cells * g).unsqueeze(-1) + axis
    return cells.flatten()


def _kernel_spectrum(w: Tensor, grid: Sequence[int], dilation: Sequence[int],
                     groups: int) -> tuple[Tensor, tuple[int, ...]]:
    """(per_freq, spectrum_shape): the (c_out / groups) x (c_in / groups) kernel DFT
    matrices of every (half-spectrum frequency, group), frequency-major, shape (F *
    groups, c_out / groups, c_in / groups), and the rfftn grid they come from."""
    c_out, c_in, *k = w.shape
    grid = tuple(int(g) for g in grid)
    blocks = w.reshape(groups, c_out // groups, c_in, -1)
    embedded = torch.zeros(*blocks.shape[:3], math.prod(grid), dtype=w.dtype, device=w.device)
    embedded.index_add_(3, _tap_cells(k, grid, dilation, w.device), blocks)
    spectrum = torch.fft.rfftn(embedded.reshape(*blocks.shape[:3], *grid),
                               dim=tuple(range(3, 3 + len(grid))))
    per_freq = spectrum.flatten(3).permute(3, 0, 1, 2).reshape(-1, c_out // groups, c_in)
    return per_freq, tuple(spectrum.shape[3:])


def differentiable_bound(module: nn.Module, input_shape: Sequence[int],
                         bn_var: Tensor | None = None) -> Tensor:
    """The bound :func:`operator_upper_bound` gives a Linear, a conv or a conv + eval-mode
    BatchNorm (without the rounding SAFETY), as a 0-dim float64 tensor differentiable in
    the weights (and the BatchNorm's gamma), for training against the certificate's bound.
    bn_var (C,): a conv + BatchNorm's variance to use instead of its running one (the
    training forward's batch variance).

    The top singular pair (u, v) of the matrix whose norm is the bound is found without
    gradient (a dense layer's from the top eigenvector of its smaller Gram matrix); the
    value is then Re(u^H M v), equal to that norm, and its gradient is that of sigma_1
    (u v^H pulled back to the weights): Linear, M = W; conv, M = the kernel DFT matrix of
    the frequency (and group) with the largest norm, times the padding factor of
    :func:`conv_upper_bound`.  Raises RobustclipError for any other module.
    """
    layers, scale = _layers(module), None
    if (conv_bn := _conv_batchnorm(module)) is not None:
        layers, scale = [conv_bn[0]], _bn_scale(conv_bn[1], bn_var)
    if len(layers) == 1 and isinstance(layers[0], nn.Linear):
        w = layers[0].weight.double()
        with torch.no_grad():  # the top eigenvector of the smaller Gram matrix, the other side
            wide = w.shape[0] <= w.shape[1]
            m = w if wide else w.T
            u = torch.linalg.eigh(m @ m.T)[1][:, -1]
            v = m.T @ u
            v = v / v.norm()
        return u @ w @ v if wide else v @ w @ u
    if len(layers) != 1 or not isinstance(layers[0], _CONVS):
        raise RobustclipError(f"no differentiable bound for {type(_unwrap(module)).__name__}: only Linear, "
                              f"conv and conv + BatchNorm layers have one")
    conv = layers[0]
    grid, factor, _, _ = _conv_geometry(conv, input_shape)
    w = _scaled_kernel(conv.weight.double(), scale)
    groups, (c_out, c_in, *k) = conv.groups, w.shape
    with torch.no_grad():
        per_freq, rshape = _kernel_spectrum(w.detach(), grid, conv.dilation, groups)
        norms = torch.cat([torch.linalg.matrix_norm(c, ord=2) for c in per_freq.split(_SVD_BATCH)])
        top = int(norms.argmax())
        u, _, vh = torch.linalg.svd(per_freq[top])
        freq = torch.stack(torch.unravel_index(torch.tensor(top // groups, device=w.device), rshape))
        cells = _tap_cells(k, grid, conv.dilation, w.device)
        position = torch.stack(torch.unravel_index(cells, tuple(int(g) for g in grid)), 1)
        phase = torch.exp(-2j * math.pi * (position.double() / torch.tensor(
            grid, dtype=torch.float64, device=w.device) * freq.double()).sum(1))
    block = w.reshape(groups, c_out // groups, c_in, -1)[top % groups]
    matrix = block.to(phase.dtype) @ phase  # (c_out / groups, c_in / groups) at that frequency
    return (u[:, 0].conj() @ matrix @ vh[0].conj()).real * factor


def nonnegative_upper_bound(module: nn.Module, input_shape: Sequence[int]) -> UpperBound:
    """Schur test for an operator whose matrix A has no negative entry (average pooling).

    ||A||_2 <= sqrt(||A||_1 ||A||_inf) for any matrix, and for A >= 0 the max absolute
    row sum is max(A 1) and the max absolute column sum is max(A^T 1) (the absolute
    values make it hold for A <= 0 too, e.g. a negative divisor): one forward pass
    of the all-ones input and one gradient, on a float64 copy.  Tight for non-overlapping
    pools (e.g. a 2x2 pool: 1/2) and for a global average pool (1 / sqrt(H W)).
    Kind "upper", value times 1 + SAFETY.
    """
    twin = float64_twin(module)
    like = next(iter([*twin.parameters(), *twin.buffers()]), torch.zeros((), dtype=torch.float64))
    x = torch.zeros((1, *input_shape), dtype=torch.float64, device=like.device,
                    requires_grad=True)
    with torch.enable_grad():
        offset = twin(x)
        (col_sums,) = torch.autograd.grad(offset.sum(), x)
    with torch.no_grad():
        row_sums = twin(torch.ones_like(x)) - offset
    value = math.sqrt(float(row_sums.abs().max()) * float(col_sums.abs().max()))
    return UpperBound(value * (1 + SAFETY), "upper", "Schur test sqrt(max row sum x max column sum)")
