"""What the network bound may take as proved about one operator: decided by its type and
arguments, never by probing its outputs.

A numerical probe (L(x) - L(0) linear on a few random inputs, ``spectral.check_linear``)
is a test, not a proof: ``nn.Hardshrink(4)`` maps small inputs to 0 and passes it as a
linear map of norm 0, and a map that bends only far from the probed inputs passes as
exactly linear.  So ``bounds.lipschitz_report`` takes an operator as proved only when
this module says so:

* :func:`module_lipschitz` / :func:`function_lipschitz`: a proven L2 Lipschitz constant
  of a nonlinear or norm-preserving operator (an activation, a reshape, a dropout in eval
  mode).  Elementwise functions f are Lipschitz with constant sup |f'| (mean value
  theorem, coordinate by coordinate, then the L2 norm); the constants below are those
  suprema rounded up (GELU: f'(x) = Phi(x) + x phi(x) peaks at x = sqrt(2) with 1.12890;
  its tanh form 1.12899; SiLU 1.09984 near x = 2.40; Mish 1.08850 near x = 1.49;
  Hardswish (2x + 3) / 6 below 1.5 on (-3, 3); SELU scale * alpha = 1.75810 left of 0).
  Softmax's Jacobian diag(p) - p p^T is positive semi-definite and below diag(p), so its
  norm is at most max p <= 1.  Softplus switches to the identity above ``threshold``
  with a jump of log(1 + e^-t) / beta (2.1e-9 / beta at the default 20), below float32
  rounding, which no bound here covers.
* :func:`is_linear_module` / :func:`is_linear_function`: implicitly linear by
  construction (conv, linear, eval-mode BatchNorm with running statistics, pooling by
  averaging, padding, upsampling, the input normalisation, sums and means, products
  with a constant): their spectral norm is then measured (``bounds``), and an exact
  Gram-matrix value is exact.

A module counts as its torch class only when it is an instance whose ``forward`` is that
class's own (a subclass that overrides ``forward`` can compute anything) and that has no
forward hook or pre-hook, except hooks marked with :func:`observer` (they only record
inputs).  Everything else is unknown: the bound is then an estimate, or refused.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustclip.activations import GroupSort
from robustclip.clip import SpectralClip
from robustclip.models import Normalize

GELU_LIPSCHITZ = 1.1290
SILU_LIPSCHITZ = 1.1000
MISH_LIPSCHITZ = 1.0890
HARDSWISH_LIPSCHITZ = 1.5
SELU_LIPSCHITZ = 1.0507009873554805 * 1.6732632423543772 * (1 + 1e-12)


def observer(hook: Callable) -> Callable:
    """Mark a forward (pre-)hook as one that only records and never changes a forward."""
    hook.robustclip_observer = True
    return hook


def _plain(module: nn.Module) -> bool:
    """No forward hook or pre-hook other than :func:`observer` ones."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return all(getattr(h, "robustclip_observer", False) for h in hooks)


def _is(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """``module`` is one of ``classes`` with that class's own forward, and plain."""
    return (isinstance(module, classes) and _plain(module)
            and any(type(module).forward is c.forward for c in classes if isinstance(module, c)))


def unwrapped(module: nn.Module) -> nn.Module | None:
    """The layer a chain of robustclip spectral wrappers holds (``module`` itself if it
    is none); None when a wrapper is not robustclip's own (its forward is unknown)."""
    while getattr(module, "is_spectral_wrapper", False):
        if not _is(module, (SpectralClip,)):
            return None
        module = module.module
    return module


_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, GroupSort, nn.CELU,
                  nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink, nn.Softplus,
                  nn.Softmax, nn.Softmin, nn.Softmax2d)
_NORM_PRESERVING = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_FIXED_CONSTANTS: tuple[tuple[type, tuple[Callable, ...], float], ...] = (
    (nn.Sigmoid, (torch.sigmoid, F.sigmoid), 0.25),
    (nn.Hardsigmoid, (F.hardsigmoid,), 1 / 6),
    (nn.GELU, (F.gelu,), GELU_LIPSCHITZ),
    (nn.SiLU, (F.silu,), SILU_LIPSCHITZ),
    (nn.Mish, (F.mish,), MISH_LIPSCHITZ),
    (nn.Hardswish, (F.hardswish,), HARDSWISH_LIPSCHITZ),
    (nn.SELU, (F.selu,), SELU_LIPSCHITZ),
)
"""(module class, its functional forms, Lipschitz constant) of activations without a
parameter that changes the constant."""
_CONSTANTS: dict[type, Callable[[nn.Module], float | None]] = {
    **{cls: (lambda m, c=c: c) for cls, _, c in _FIXED_CONSTANTS},
    nn.ELU: lambda m: max(1.0, abs(m.alpha)),
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)),
    nn.RReLU: lambda m: max(1.0, abs(m.lower), abs(m.upper)),
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
}


_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_MAXPOOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


def maxpool_factor(kernel: Any, stride: Any, dilation: Any, dims: int) -> float:
    """Lipschitz constant of a max pool: sqrt of the largest number of pooling windows one
    input element can fall into (each output moves by at most its window's largest move)."""
    tup = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    k, d = tup(kernel), tup(dilation)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else tup(stride)
    count = 1
    for ki, si, di in zip(k, s, d):
        count *= min(ki, math.ceil(((ki - 1) * di + 1) / si))
    return math.sqrt(count)


def module_lipschitz(module: nn.Module) -> float | None:
    """A proven L2 Lipschitz constant of the activation, max pool or norm-preserving
    ``module`` (on any input shape, eval mode), or None when this module knows none."""
    if _is(module, _MAXPOOLS):
        if module.return_indices:
            return None
        return maxpool_factor(module.kernel_size, module.stride, module.dilation,
                              _MAXPOOLS.index(type(module)) + 1)
    if _is(module, _NORM_PRESERVING):
        return 1.0
    if _is(module, _ONE_LIPSCHITZ):
        return 1.0
    for cls, constant in _CONSTANTS.items():
        if _is(module, (cls,)):
            return constant(module)
    return None


_LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                   nn.ConvTranspose2d, nn.ConvTranspose3d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                   nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
                   nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                   nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
                   nn.CircularPad2d, nn.CircularPad3d, nn.Upsample, nn.Fold, nn.Unfold,
                   Normalize) + _NORM_PRESERVING
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_linear_module(module: nn.Module) -> bool:
    """``module`` (in eval mode) is implicitly linear by construction: a layer of the
    kinds above, a BatchNorm with running statistics, a plain Sequential of such layers,
    or robustclip's spectral wrapper of one."""
    inner = unwrapped(module)
    if inner is None:
        return False
    if _is(inner, _BATCHNORMS):
        return inner.running_var is not None
    if _is(inner, (nn.Sequential,)):
        return all(is_linear_module(m) for m in inner)
    return _is(inner, _LINEAR_MODULES)


def _arg(node: Any, index: int, name: str, default: Any) -> Any:
    """Argument ``name`` (position ``index``) of an fx call node, else ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


_ONE_LIPSCHITZ_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, F.tanh,
                            F.celu, F.softsign, F.logsigmoid, F.tanhshrink, F.softshrink,
                            F.softplus, F.softmax, F.softmin, torch.softmax, torch.abs,
                            torch.clamp, torch.clip}
_NORM_PRESERVING_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                              torch.permute, torch.transpose, torch.flip, torch.roll,
                              F.pixel_shuffle, F.pixel_unshuffle}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
             F.feature_alpha_dropout}
_FUNCTION_CONSTANTS: dict[Any, Callable[[Any], float | None]] = {
    **{fn: (lambda n, c=c: c) for _, fns, c in _FIXED_CONSTANTS for fn in fns},
    F.elu: lambda n: max(1.0, abs(float(_arg(n, 1, "alpha", 1.0)))),
    F.leaky_relu: lambda n: max(1.0, abs(float(_arg(n, 1, "negative_slope", 0.01)))),
}
_ONE_LIPSCHITZ_METHODS = {"relu", "tanh", "abs", "clamp", "clip", "softmax"}
_NORM_PRESERVING_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
                            "permute", "transpose", "clone", "flip", "roll"}
_METHOD_CONSTANTS = {"sigmoid": 0.25}


def function_lipschitz(node: Any) -> float | None:
    """A proven L2 Lipschitz constant of an fx ``call_function`` / ``call_method`` node in
    its one input-dependent argument (the first), or None.  Dropout counts as the identity
    only with ``training=False``; a basic index (ints, slices, None, Ellipsis) selects
    coordinates (norm 1)."""
    target = node.target
    if node.op == "call_method":
        if target in _NORM_PRESERVING_METHODS or target in _ONE_LIPSCHITZ_METHODS:
            return 1.0
        return _METHOD_CONSTANTS.get(target)
    if target in _NORM_PRESERVING_FUNCTIONS or target in _ONE_LIPSCHITZ_FUNCTIONS:
        return 1.0
    if target in _DROPOUTS:
        return None if _arg(node, 2, "training", True) else 1.0
    if target is operator.getitem and _basic_index(node.args[1]):
        return 1.0
    if target in _MAXPOOL_FUNCTIONS:
        return _functional_pool(node)
    if target in _FUNCTION_CONSTANTS:
        return _FUNCTION_CONSTANTS[target](node)
    return None


def _functional_pool(node: Any) -> float | None:
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    if bound.get("return_indices"):
        return None
    return maxpool_factor(bound["kernel_size"], bound.get("stride"), bound.get("dilation", 1),
                          _MAXPOOL_FUNCTIONS[node.target])


def _basic_index(index: Any) -> bool:
    """True for indices made of ints, slices, None and Ellipsis (a coordinate projection)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                      F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
"""Functional average pools (fx call_function targets) whose matrices are nonnegative."""

_LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                     F.conv_transpose2d, F.conv_transpose3d, F.pad, F.interpolate,
                     torch.sum, torch.mean, torch.neg, operator.neg, torch.cumsum,
                     torch.narrow, torch.select, torch.index_select, operator.getitem,
                     F.fold, F.unfold} | AVG_POOL_FUNCTIONS
_LINEAR_METHODS = {"sum", "mean", "neg", "cumsum", "narrow", "select", "index_select",
                   "expand", "expand_as", "repeat", "mul"}
_PRODUCTS = {operator.mul, torch.mul, operator.matmul, torch.matmul, torch.einsum}


def is_linear_function(node: Any, dependent: set) -> bool:
    """The fx call node is implicitly linear in its one input-dependent argument, all
    others being constants (``dependent``: the nodes that depend on the model input):
    a layer's functional form with constant weights, padding, upsampling, sums, means,
    selections, a product with a constant, a division of the input by a constant, and a
    batch norm with running statistics in eval mode."""
    target = node.target
    if node.op == "call_method":
        return target in _LINEAR_METHODS or (target == "div" and node.args[0] in dependent)
    if target in _LINEAR_FUNCTIONS or target in _PRODUCTS:
        return True
    if target in (operator.truediv, torch.div, torch.true_divide):
        return node.args[0] in dependent and node.kwargs.get("rounding_mode") is None
    if target is F.batch_norm:
        return not _arg(node, 5, "training", False) and _arg(node, 2, "running_var", None) is not None
    return False
