"""The Lipschitz-margin loss (Tsuzuku et al. 2018) and the network bound L it trains with.

The loss adds sqrt(2) * L * eps_cert to every logit but the true one before the
cross-entropy, so that training pushes the margin above the one a certificate of L2
radius eps_cert needs when L bounds the network's Lipschitz constant.

:class:`TrainingBound` computes L during training over the model's graph, as
``robustclip.bounds`` walks it (products along a path, sums over residual branches,
sqrt of the sum of squares over a cat), with these factors:

* a spectral wrapper: its clip target c in *constant* mode; in *sound* mode
  (``train.margin_bound = "sound"``) the guaranteed upper bound the certificate uses
  (``robustclip.upper_bounds.differentiable_bound``: the exact sigma of a dense layer,
  the FFT bound of a conv or conv + BN), differentiable in the weights, a conv + BN's
  BatchNorm taken as the training forward applies it (below); otherwise (*tracked*)
  its tracked sigma as a differentiable function of the weights, ||A v|| for the
  wrapper's current top singular vector v (held fixed: a Rayleigh-quotient estimate, as
  Miyato et al.'s; a conv + BN's BatchNorm again as the training forward applies it);
* a BatchNorm that no wrapper holds: max |gamma| / sqrt(var + eps), its exact norm
  (differentiable in gamma);
* everything without trainable weights (the input normalisation, activations, pooling,
  reshapes): the factor ``robustclip.bounds`` gives it, computed once (1 for ReLU,
  GroupSort, flatten, pixel unshuffle; max-pool and average-pool bounds; 1/std for the
  normalisation).  A layer with trainable weights that no wrapper tracks is refused.

A BatchNorm's var (a lone one, or one in a conv + BN in sound and tracked mode) is, in
training mode, the batch variance its last forward normalised with (biased, per channel,
differentiable in the weights before it; recorded by a forward pre-hook), and in eval
mode its running variance.  The batch's, because that is the map the training forward
applies: with the running variance (a buffer, no gradient) the bound of a conv + BN
grows linearly with the conv's weights while the forward, which divides by the batch's
statistics, does not change, and the margin shrinks the weights for nothing.  The
certificate, at evaluation, uses the running variance.

Constant mode is used when every wrapper clips and no BatchNorm lies outside one: L is
then the product of the clip targets and the constant factors, fixed for the run.  It
warns when a clipped layer is held at its target only at clip events (no
``rescale_every_step``): the margin loss rewards larger weights, and between two events
such a layer's sigma grows (measured on lipnet, lr 0.01, clip events every 50 steps:
sigma 3.9 for a conv clipped to 1), so the margin trains for an L several times too small.

What L is worth.  L is never a certificate, though in sound mode it is the network
bound :func:`robustclip.bounds.lipschitz_report` computes for the same weights, or a
larger one (its per-layer factors are the same formulas, but for layers with small
inputs, which the report bounds exactly; float32 rounding aside), once the BatchNorms'
running statistics are those of the batch (in eval mode, always).  In constant mode it is a target: FastClip
enforces sigma <= c (1 + tol) at its clip events only (every clip_steps steps, after
init_delay; a conv+BN composite and gouk rescale every step), and against PowerQR's
estimate, which can lie below the true sigma (directions outside the tracked block rise
unseen); between events a layer may exceed c.  In
tracked mode each factor is an estimate from below that converges as the tracking
iterations do.  Certificates at evaluation time always come from the sound bound of
``robustclip.bounds.lipschitz_report`` (guaranteed per-operator upper bounds), never
from this L.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from robustclip.bounds import _ADDS, _Walker, _ValueProp, _dependent, _shape, trace
from robustclip.errors import RobustclipError
from robustclip.known_ops import observer
from robustclip.spectral import _BATCHNORMS, _unwrap, eval_mode, linear_map
from robustclip.upper_bounds import _bn_scale, _layers, _conv_batchnorm, differentiable_bound

log = logging.getLogger(__name__)

Value = float | Tensor


def margin_logits(logits: Tensor, y: Tensor, L: Value, eps_cert: float) -> Tensor:
    """logits (N, classes) with sqrt(2) * L * eps_cert added to every logit but y's."""
    others = torch.ones_like(logits).scatter(1, y.unsqueeze(1), 0.0)  # no host sync (one_hot checks)
    return logits + (math.sqrt(2) * eps_cert) * L * others


def _sigma(wrapper: nn.Module, bn_scale: Tensor | None = None) -> Tensor:
    """||A v|| for the wrapper's top tracked vector v (unit norm, detached): differentiable
    in the weights, <= sigma_1, equal to it when v is the top singular vector.  bn_scale
    (C,): a conv + BN's per-channel scale to apply after the conv instead of its BatchNorm
    in eval mode."""
    if wrapper.vectors.numel() == 0:
        raise RobustclipError(f"{wrapper.name}: no tracked singular vector yet (run a training "
                              f"forward first)")
    v = wrapper.vectors[0].detach()
    v = (v / v.norm()).unsqueeze(0)
    with eval_mode(wrapper.module):
        if bn_scale is None:
            return linear_map(wrapper.module, tuple(v.shape[1:]))(v).norm()
        out = linear_map(_layers(wrapper.module)[0], tuple(v.shape[1:]))(v)
        return (out * bn_scale.to(out.dtype).reshape((1, -1) + (1,) * (out.dim() - 2))).norm()


class _BatchVariances:
    """The batch variance (biased, per channel, differentiable) each training-mode
    BatchNorm of ``bns`` normalised its last forward with, recorded by a forward pre-hook
    and cleared once the bound has used them."""

    def __init__(self, bns: Sequence[nn.Module]) -> None:
        self.var: dict[nn.Module, Tensor] = {}
        for bn in bns:
            bn.register_forward_pre_hook(self._record)

    @observer
    def _record(self, bn: nn.Module, args: tuple[Tensor, ...]) -> None:
        if bn.training:
            x = args[0]
            self.var[bn] = x.var(dim=[d for d in range(x.dim()) if d != 1], unbiased=False)

    def of(self, bn: nn.Module) -> Tensor | None:
        """The batch variance (C,) in training mode; None in eval mode (the running one)."""
        if not bn.training:
            return None
        if bn not in self.var:
            raise RobustclipError("lipschitz-margin: no batch statistics since the bound was "
                                  "last taken (take it once after each training forward)")
        return self.var[bn]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class TrainingBound:
    """The network's L for the Lipschitz-margin loss (see the module doc).

    model: the (unwrapped-by-DDP) model with its spectral wrappers; input_shape: one
    input, no batch dim; sound: every wrapper's factor is its guaranteed upper bound
    (sound mode), else its clip target or tracked estimate.  Call it after the step's
    training forward (the wrappers' vectors are then current): a float in constant mode,
    else a 0-dim tensor on the model's device, differentiable in the weights.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], sound: bool = False) -> None:
        shape = tuple(int(s) for s in input_shape)
        like = next(iter(model.parameters()), torch.zeros(()))
        with eval_mode(model), torch.no_grad():
            gm = trace(model)
            dependent = _dependent(gm.graph)
            prop = _ValueProp(gm, dependent)
            prop.propagate(torch.zeros((1, *shape), device=like.device, dtype=like.dtype))
            walker = _Walker(gm, prop.values, dependent, tol=1e-6, iters=None, exact_max_dim=1024,
                             exact_max_entries=2**22, seed=0, pairs={})
            self.program = [step for node in gm.graph.nodes
                            if (step := self._compile(gm, walker, dependent, node)) is not None]
        self.wrappers = [p[0] for op, _, _, p in self.program if op == "wrapper"]
        self.sound = sound
        self.constant = (not sound and all(w.clip is not None for w in self.wrappers)
                         and not any(op == "bn" for op, *_ in self.program))
        self.batch = _BatchVariances([] if self.constant else [
            m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.running_var is not None])
        self.value = self._evaluate() if self.constant else None
        drifting = [w.name for w in self.wrappers if not w.rescale_every_step] if self.constant else []
        if drifting:
            warnings.warn(
                f"lipschitz-margin with a constant L: {len(drifting)} clipped layer(s) "
                f"({', '.join(drifting)}) are held at their clip target only at clip events, "
                f"and between them the margin loss drives their sigma above it; set "
                f"method.rescale_every_step = true (README: Certified training)", stacklevel=2)
        self.estimated = [row["name"] for row in walker.rows if row["bound_kind"] == "estimate"]

    @staticmethod
    def _compile(gm: fx.GraphModule, walker: _Walker, dependent: set[fx.Node],
                 node: fx.Node) -> tuple[str, fx.Node, Any, Any] | None:
        """(op, node, inputs, payload) for the nodes of the model input; None for others."""
        if node.op == "placeholder":
            return ("input", node, None, None)
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise RobustclipError("lipschitz-margin: the model's output must be one tensor")
            return ("output", node, node.args[0], None)
        if node not in dependent or "tensor_meta" not in node.meta:
            return None
        if node.op == "call_function" and node.target in _ADDS:
            alpha = abs(float(node.kwargs.get("alpha", 1)))
            terms = [(a, alpha if i else 1.0) for i, a in enumerate(node.args[:2])
                     if isinstance(a, fx.Node) and a in dependent]
            return ("sum", node, terms, None)
        if node.op == "call_function" and node.target is torch.cat:
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            return ("cat", node, [t for t in tensors if t in dependent], None)
        deps = walker._tensor_deps(node)
        if len(deps) != 1:
            raise RobustclipError(f"lipschitz-margin: cannot bound {node.target}: it combines "
                                  f"{len(deps)} input-dependent tensors")
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if getattr(module, "is_spectral_wrapper", False):
                conv_bn = _conv_batchnorm(module)  # its BatchNorm, priced by _BatchVariances.of
                bn = None if conv_bn is None else conv_bn[1]
                return ("wrapper", node, deps[0], (module, _shape(deps[0]), bn))
            if isinstance(_unwrap(module), _BATCHNORMS) and module.running_var is not None:
                return ("bn", node, deps[0], _unwrap(module))
            if _trainable(module):
                raise RobustclipError(f"lipschitz-margin: cannot bound {node.target} during "
                                      f"training: it has trainable weights and no spectral "
                                      f"wrapper tracks it")
        if any(a.op == "get_attr" and isinstance(getattr(gm, str(a.target), None), nn.Parameter)
               for a in node.all_input_nodes):
            raise RobustclipError(f"lipschitz-margin: cannot bound {node.target} during "
                                  f"training: it uses a parameter outside a layer")
        return ("const", node, deps[0], walker._factor(node, deps[0]))

    def _evaluate(self) -> Value:
        L: dict[fx.Node, Value] = {}
        for op, node, inputs, payload in self.program:
            if op == "input":
                L[node] = 1.0
            elif op == "output":
                return L[inputs]
            elif op == "sum":
                L[node] = sum(L[a] * coef for a, coef in inputs)
            elif op == "cat":
                L[node] = sum(L[a] ** 2 for a in inputs) ** 0.5
            elif op == "wrapper":
                L[node] = self._factor(*payload) * L[inputs]
            elif op == "bn":
                scale = _bn_scale(payload, self.batch.of(payload))
                L[node] = scale.abs().max().to(payload.running_var.dtype) * L[inputs]
            else:
                L[node] = payload * L[inputs]
        raise RobustclipError("lipschitz-margin: the model has no output")

    def _factor(self, wrapper: nn.Module, shape: tuple[int, ...], bn: nn.Module | None) -> Value:
        if self.constant:
            return wrapper.clip
        var = None if bn is None else self.batch.of(bn)  # None: the running variance
        if self.sound:
            dtype = next(wrapper.module.parameters()).dtype
            try:
                return differentiable_bound(wrapper.module, shape, var).to(dtype)
            except torch.linalg.LinAlgError as err:  # non-finite weights: the training diverged
                raise RobustclipError(f"lipschitz-margin: no sound bound of {wrapper.name}: "
                                      f"{str(err).splitlines()[0]}; the training diverged? "
                                      f"lower train.lr") from None
        return _sigma(wrapper, None if var is None else _bn_scale(bn, var))

    def __call__(self) -> Value:
        if self.constant:
            return self.value
        try:
            return self._evaluate()
        finally:  # the recorded variances hold the step's graph: never keep them past it
            self.batch.var.clear()

    def describe(self) -> str:
        """One line for the log: the mode, what L multiplies and what it is worth."""
        bns = sum(op == "bn" for op, *_ in self.program)
        with_bns = f" and {bns} BatchNorm norms" if bns else ""
        if self.sound:
            text = (f"L = the differentiable product of {len(self.wrappers)} guaranteed per-layer "
                    f"upper bounds (exact sigma of dense layers, FFT bounds of convs){with_bns} "
                    f"and the fixed factors: the certificate's own bound")
        elif self.constant:
            text = (f"L = {self.value:.4g}, constant: the clip targets of {len(self.wrappers)} "
                    f"clipped layers times the fixed factors (a target the clipping maintains "
                    f"at its clip events, not a guarantee)")
        else:
            text = (f"L = the differentiable product of {len(self.wrappers)} tracked sigma "
                    f"estimates (||A v||, from below){with_bns} "
                    f"and the fixed factors (an estimate, not a guarantee)")
        if self.estimated:
            text += f"; fixed factors without a guaranteed bound: {', '.join(self.estimated)}"
        return text + "; certificates come from robustclip.bounds, never from this L"
