"""SpectralClip: track and clip the top singular values of an implicitly linear layer.

The wrapper follows the contract of ``torch.nn.utils.parametrizations.spectral_norm``:
its state lives in buffers (singular vectors, last singular values, step counter, input
shape), and it acts only in training mode.  In eval mode it is a pure pass-through.

Training-mode forward, per call (one optimiser step):

1. one warm-started PowerQR iteration (``iters_per_step``) on the layer's operator
   A(x) = L(x) - L(0) for the current input shape: the top-k estimate follows the
   weights as they move, for a fraction of the cost of the training step;
2. after ``init_delay`` steps, every ``clip_steps`` steps, a *clip event* (FastClip):
   for every tracked singular value above ``clip``, least-squares descent on the
   layer's ``weight`` tensors pulls A v_i towards (clip / sigma_i) A v_i and keeps the
   other tracked directions where they are; exact line search, then re-estimation, in
   rounds until the re-estimated sigma_1 is within ``tol`` of the clip;
3. with ``rescale_every_step`` (the default for a conv+BN composite), after each
   optimiser step (a global ``torch.optim`` post-step hook; or at the next forward
   when no torch optimiser is used), one more tracking iteration, and the last
   ``weight`` of the layer (BN's gamma in a composite) is multiplied by
   min(1, clip / sigma), without a host synchronisation.
   BatchNorm in training mode divides by batch statistics, so a clip that moves the
   conv kernel is undone over the next steps as ``running_var`` catches up; the
   eval-mode composite (what users deploy and certify) would drift above the clip
   between clip events.  Gamma is not normalised away, so this keeps it bounded at
   every step.  BN running statistics are never changed by clipping.

A lone BatchNorm is clipped as in Gouk et al. (2021): gamma is clamped to
+-clip * sqrt(running_var + eps), which is exact.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
import weakref
import zlib
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from robustclip.errors import RobustclipError
from robustclip.spectral import (
    _BATCHNORMS,
    check_finite,
    check_linear,
    eval_mode,
    functional_linear_map,
    linear_map,
    power_qr,
    random_block,
    ritz,
    tracking_steps,
)

log = logging.getLogger(__name__)

# Wrappers with ``rescale_every_step`` whose forward ran and whose rescale waits for the
# optimiser step that follows it (see SpectralClip.rescale_now).
_AWAITING_RESCALE: "weakref.WeakSet[SpectralClip]" = weakref.WeakSet()


def _rescale_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimiser post-step hook: rescale the wrappers whose weights just moved."""
    if not _AWAITING_RESCALE:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    rescale([w for w in list(_AWAITING_RESCALE) if id(w._rescaled_param()) in stepped])


@torch.no_grad()
def track(wrappers: Sequence["SpectralClip"]) -> None:
    """Warm-started PowerQR iterations (``iters_per_step`` each) on the operators of
    ``wrappers`` as they are now (:func:`robustclip.spectral.tracking_steps`: a block of
    several vectors is bounded by the Gershgorin bounds of its Rayleigh-Ritz matrix, not
    diagonalised; the top value is never below the block's top Ritz value).  No host
    synchronisation."""
    with contextlib.ExitStack() as modes:
        for w in wrappers:
            modes.enter_context(eval_mode(w.module))
        maps = {w: linear_map(w.module, w._shape) for w in wrappers}
        for i in range(max((w.iters_per_step for w in wrappers), default=0)):
            due = [w for w in wrappers if w.iters_per_step > i]
            stepped = dict(zip(due, tracking_steps([(maps[w], w.vectors) for w in due])))
            # a step keeps the block size, so the new values have the old ones' shape
            for members in _groups(due, lambda w: (w.sigmas.shape, w.sigmas.dtype, w.sigmas.device)):
                rel = _relative_change([stepped[w][0] for w in members], [w.sigmas for w in members])
                for r, w in zip(rel, members):
                    w.rel_change = r
                    w.sigmas, w.vectors = stepped[w]


def _groups(wrappers: Sequence["SpectralClip"], key: Any) -> list[list["SpectralClip"]]:
    """``wrappers`` grouped by ``key(wrapper)``: the members of a group are computed with
    one batched operation each."""
    groups: dict[Any, list[SpectralClip]] = {}
    for w in wrappers:
        groups.setdefault(key(w), []).append(w)
    return list(groups.values())


def _relative_change(new: Sequence[Tensor], old: Sequence[Tensor]) -> Sequence[Tensor]:
    """max_i |new_i - old_i| / new_i for each pair of (k,) singular values (one k for
    all), as scalars; stacked into one batched computation when there are several."""
    if len(new) == 1:
        return [torch.linalg.vector_norm((new[0] - old[0]) / new[0].clamp_min(1e-30), ord=math.inf)]
    stacked = torch.stack(list(new))
    return torch.linalg.vector_norm((stacked - torch.stack(list(old))) / stacked.clamp_min(1e-30),
                                    ord=math.inf, dim=1)


@torch.no_grad()
def rescale(wrappers: Sequence["SpectralClip"]) -> None:
    """:meth:`SpectralClip.rescale_now` of every wrapper of ``wrappers``, their tracking
    iterations batched (:func:`track`): one tracking iteration on the operator as the
    training step left it, then the last weight *= min(1, c / sigma_1), the factors of
    wrappers with the same clip, dtype and device computed together.  No host
    synchronisation."""
    for w in wrappers:
        _AWAITING_RESCALE.discard(w)
    track(wrappers)
    for members in _groups(wrappers, lambda w: (w.clip, w.sigmas.dtype, w.sigmas.device)):
        tops = torch.stack([w.sigmas[0] for w in members]) if len(members) > 1 else members[0].sigmas[:1]
        factors = torch.reciprocal((tops / members[0].clip).clamp_min(1.0))  # min(1, c / sigma_1)
        for factor, w in zip(factors, members):
            w._rescaled_param().mul_(factor)
            w.sigmas = w.sigmas * factor
            w._log_due()


register_optimizer_step_post_hook(_rescale_after_step)


def _weight_names(module: nn.Module) -> list[str]:
    """Names of the trainable ``weight`` tensors of a layer (kernel, matrix, gamma)."""
    return [n for n, p in module.named_parameters()
            if n.rsplit(".", 1)[-1] == "weight" and p.requires_grad]


class SpectralClip(nn.Module):
    """Wrap an implicitly linear layer; track its top-k singular values and clip them.

    Args:
        module: conv, linear, BatchNorm, pooling, or a composition of them (e.g. a conv
            followed by its BatchNorm), possibly holding other wrappers.
        clip: target spectral norm c > 0; ``None`` tracks without clipping.
        k: number of singular values tracked and clipped (deflation).
        clip_steps: a clip event every this many training steps, after ``init_delay``.
        init_delay: training steps before the first clip event.
        iters_per_step: warm-started PowerQR iterations per training step.
        init_iters: PowerQR iterations from a random start at the first call.
        two_sided: also raise tracked singular values more than 0.05 below c up to c.
        rescale_every_step: multiply the last weight by min(1, c / sigma) every step;
            ``None`` means "yes for compositions holding a BatchNorm".
        track_extra: extra vectors tracked every step beyond k (default 4 with
            ``rescale_every_step``, else 0).  Clipping flattens the top of the spectrum
            into a plateau near c; with BatchNorm's running statistics drifting, a
            plateau member outside the tracked block can rise unseen.  Measured on a
            small conv+BN over 5 seeds: worst eval-mode sigma_1 1.059 c with 2 extra
            vectors, 1.004 c with 4, 1.001 c with 6.
        clip_events: run FastClip events; ``False`` with ``rescale_every_step=True`` is
            Gouk et al.'s baseline (power iteration, weight / max(1, sigma / c) every step).
        tol: a clip event ends when the re-estimated sigma_1 <= c * (1 + tol).
        max_rounds: descent + re-estimation rounds per clip event; if sigma_1 is still
            above c * (1 + tol) after them, the last weight is rescaled by c / sigma_1.
        descent_steps: exact-line-search descent steps per round.
        refine_iters: PowerQR iterations estimating sigma before the first and after
            the last round (half as many between rounds).
        name: tag for logging (TensorBoard ``sigma/<name>``); default: the class name.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or None).
        log_every: log the tracked singular values every this many steps.
        input_shape: shape of one input (no batch dim); known up front, it validates
            the layer at construction, otherwise at the first training call.

    Buffers: ``vectors`` (p, *input_shape), ``sigmas`` (p,) descending, with
    p = k + track_extra: Ritz values and vectors after initialisation and clip events;
    after a per-step tracking iteration with p > 1, the block in orthogonal-iteration
    order and the Gershgorin bounds of its Rayleigh-Ritz matrix, whose first is at least
    the top Ritz value (``robustclip.spectral.tracking_steps``); ``rel_change`` (),
    ``step`` (), ``input_shape`` (ndim,).  Shapes are taken from a loaded state dict,
    so a freshly built model loads them before seeing any input.
    """

    is_spectral_wrapper = True

    def __init__(self, module: nn.Module, clip: float | None = 1.0, *, k: int = 1,
                 clip_steps: int = 50, init_delay: int = 0, iters_per_step: int = 1,
                 init_iters: int = 100, two_sided: bool = False,
                 rescale_every_step: bool | None = None, track_extra: int | None = None,
                 clip_events: bool = True,
                 tol: float = 0.005,
                 max_rounds: int = 3, descent_steps: int = 5, refine_iters: int = 20,
                 name: str | None = None,
                 writer: Any = None, log_every: int = 10,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
            raise RobustclipError(f"clip must be a positive number or None, got {clip!r}")
        for label, value, low in [("k", k, 1), ("clip_steps", clip_steps, 1),
                                  ("iters_per_step", iters_per_step, 0),
                                  ("init_iters", init_iters, 1), ("init_delay", init_delay, 0),
                                  ("log_every", log_every, 1), ("max_rounds", max_rounds, 1),
                                  ("descent_steps", descent_steps, 1),
                                  ("refine_iters", refine_iters, 1)]:
            if not isinstance(value, int) or value < low:
                raise RobustclipError(f"{label} must be an integer >= {low}, got {value!r}")
        self.module = module
        self.clip = None if clip is None else float(clip)
        self.k, self.clip_steps, self.init_delay = k, clip_steps, init_delay
        self.iters_per_step, self.init_iters = iters_per_step, init_iters
        self.two_sided, self.tol = two_sided, tol
        self.max_rounds, self.descent_steps = max_rounds, descent_steps
        self.refine_iters = refine_iters
        self.clip_events = clip_events
        self.name = name or type(module).__name__
        self.writer, self.log_every = writer, log_every
        self.is_batchnorm = isinstance(module, _BATCHNORMS)
        holds_bn = any(isinstance(m, _BATCHNORMS) for m in module.modules())
        self.rescale_every_step = (holds_bn and not self.is_batchnorm
                                   if rescale_every_step is None else rescale_every_step)
        composite = holds_bn and not self.is_batchnorm
        self.track_extra = (4 if composite and self.rescale_every_step else 0) \
            if track_extra is None else track_extra
        if self.clip is not None and not _weight_names(module):
            raise RobustclipError(f"layer {self.name!r} has no trainable weight to clip; use clip=None to track it")
        self.register_buffer("vectors", torch.empty(0))
        self.register_buffer("sigmas", torch.empty(0))
        self.register_buffer("rel_change", torch.empty(0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("input_shape", torch.empty(0, dtype=torch.long))
        self._shape: tuple[int, ...] | None = None
        self._count = 0
        if input_shape is not None:
            self._initialise(tuple(input_shape), self._param_like())

    # ------------------------------------------------------------------ state

    def _param_like(self) -> Tensor:
        for t in [*self.module.parameters(), *self.module.buffers()]:
            if t.is_floating_point():
                return t
        return torch.zeros(())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        for key in ("vectors", "sigmas", "rel_change", "input_shape"):
            incoming = state_dict.get(prefix + key)
            if incoming is not None and incoming.shape != self._buffers[key].shape:
                self._buffers[key] = torch.empty_like(incoming, device=self.step.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        self._count = int(self.step)
        self._shape = tuple(self.input_shape.tolist()) if self.input_shape.numel() else None

    def _initialise(self, shape: tuple[int, ...], like: Tensor) -> None:
        """Validate the layer on ``shape`` and find its top-k vectors from a random start."""
        check_finite(self.module, self.name)
        check_linear(self.module, shape, self.name)
        p = min(self.k + self.track_extra, math.prod(shape))
        x = random_block(p, shape, like=like,
                         generator=torch.Generator().manual_seed(zlib.crc32(self.name.encode())))
        with eval_mode(self.module):
            est = power_qr(linear_map(self.module, shape), x, self.init_iters)
        self.vectors = est.vectors
        self.sigmas = est.values.detach().clone()
        self.rel_change = est.rel_change.detach().clone()
        self.input_shape = torch.tensor(shape, dtype=torch.long, device=self.step.device)
        self._shape = shape

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.module(x)
        shape = tuple(x.shape[1:])
        if self._shape != shape:
            if self._shape is not None:
                warnings.warn(f"{self.name}: input shape changed from {self._shape} to {shape}; "
                              f"re-initialising the singular vectors", stacklevel=2)
            self._initialise(shape, x)
        elif self in _AWAITING_RESCALE:  # no torch optimiser stepped since the last forward
            self.rescale_now()
        self._count += 1
        self.step.fill_(self._count)
        active = self.clip is not None and self._count > self.init_delay
        if self.clip_due():
            self.clip_now()
        out = self.module(x)
        if active and self.rescale_every_step:
            _AWAITING_RESCALE.add(self)  # rescale_now tracks and logs, after the optimiser step
        else:
            self._track()
            self._log_due()
        return out

    def _log_due(self) -> None:
        """Log the sigmas the step counted last leaves behind, every ``log_every`` steps."""
        if self.writer is not None and self._count % self.log_every == 0:
            self.log_sigmas(self.writer, self._count)

    def clip_due(self) -> bool:
        """Whether the training step counted last runs a clip event (before its forward)."""
        return (self.clip is not None and self.clip_events and self._count > self.init_delay
                and (self._count - self.init_delay) % self.clip_steps == 0)

    def changed_outside_gradient(self) -> list[Tensor]:
        """The parameters the last training step changed outside the optimiser's gradient
        update: the weights of a clip event, else the weight a per-step rescale multiplied.
        Data-parallel training broadcasts these from rank 0 (robustclip.distributed)."""
        if self.clip_due():
            return [self.module.get_parameter(name) for name in _weight_names(self.module)]
        if self.clip is not None and self.rescale_every_step:
            return [self._rescaled_param()]
        return []

    def _track(self) -> None:
        """Warm-started PowerQR iterations on the operator as it is now (:func:`track`).

        Run after the module's forward, so that a BatchNorm's running statistics
        already hold this step's update.
        """
        track([self])

    # ------------------------------------------------------------------ clipping

    def _rescaled_param(self) -> nn.Parameter:
        """The tensor that per-step rescaling multiplies: the layer's last ``weight``."""
        return self.module.get_parameter(_weight_names(self.module)[-1])

    def rescale_now(self) -> None:
        """One tracking iteration, then the last weight *= min(1, c / sigma_1).

        With ``rescale_every_step`` this runs after each optimiser step (a global
        optimiser post-step hook, which rescales all the wrappers the step moved
        together: :func:`rescale`), so the operator left behind by a training step,
        running statistics and weight update included, is within the clip.  No host
        synchronisation.
        """
        rescale([self])

    @torch.no_grad()
    def clip_now(self) -> Tensor:
        """Run one clip event now; return the re-estimated top-k singular values."""
        if self.clip is None or self._shape is None:
            raise RobustclipError(f"{self.name}: nothing to clip (clip=None or no input seen yet)")
        check_finite(self.module, self.name)
        if self.is_batchnorm:
            return self._clip_batchnorm()
        # Fresh vectors from (name, step), not the global RNG: every replica of a
        # distributed run, and any rank layout, draws the same ones.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.name}/{self._count}".encode()))
        with eval_mode(self.module):
            A = linear_map(self.module, self._shape)
            est = power_qr(A, self._refine_block(self.vectors, gen), self.refine_iters)
            descended = False
            for _ in range(self.max_rounds):
                scale = self._targets(est.values)
                if scale is None:
                    break
                self._descend(est.vectors, scale)
                descended = True
                est = power_qr(A, self._refine_block(est.vectors, gen), max(self.refine_iters // 2, 1))
            if descended:  # the short in-round estimates are lower bounds: verify
                est = power_qr(A, self._refine_block(est.vectors, gen), self.refine_iters)
            sigma_1 = float(est.values[0])
        p = self.vectors.shape[0]
        self.vectors, self.sigmas = est.vectors[:p].clone(), est.values[:p].clone()
        if sigma_1 > self.clip * (1 + self.tol) or (self.two_sided and sigma_1 < self.clip - 0.05):
            log.debug("%s: after %d clip rounds sigma_1 = %.4f (clip %.4f); rescaling",
                      self.name, self.max_rounds, sigma_1, self.clip)
            factor = self.clip / est.values[0]
            self._rescaled_param().mul_(factor)
            self.sigmas = self.sigmas * factor
        return self.sigmas

    def _refine_block(self, vectors: Tensor, generator: torch.Generator) -> Tensor:
        """The leading vectors plus 2 fresh random ones (k + 4 in all), orthonormalised.

        Starting only from converged vectors, the Ritz values barely move between
        iterations even while a direction that was below them (and is now on top after
        a clip) slowly grows: fixed iteration counts and fresh random vectors every
        round are what let it be found.
        """
        d = math.prod(self._shape)
        size = min(max(self.k + 4, self.vectors.shape[0] + 2), d)
        keep = vectors.flatten(1)[: max(size - 2, self.k)]
        fresh = random_block(size - keep.shape[0], self._shape, like=keep,
                             generator=generator).flatten(1) \
            if size > keep.shape[0] else keep[:0]
        q, _ = torch.linalg.qr(torch.cat([keep, fresh]).T)
        return q.T.reshape((-1, *self._shape))

    def _targets(self, values: Tensor) -> Tensor | None:
        """Per-vector scale factors for the descent, or None when nothing is to be done."""
        c = self.clip
        over = values > c * (1 + self.tol)
        scale = torch.where(over, c / values, torch.ones_like(values))
        if self.two_sided:
            under = torch.zeros_like(over)
            under[: self.k] = values[: self.k] < c - 0.05
            scale = torch.where(under, c / values.clamp_min(1e-30), scale)
            over = over | under
        return scale if bool(over.any()) else None

    def _descend(self, vectors: Tensor, scale: Tensor) -> None:
        """Least-squares descent on the weights: A_new(v_i) -> scale_i * A_old(v_i).

        Block-coordinate steepest descent, one ``weight`` tensor at a time: A is linear
        in each of them alone (a conv+BN composite is bilinear in kernel and gamma, and
        joint steps are badly scaled), so the step along the gradient is found exactly
        from the directional derivative of A, which is A evaluated with that tensor
        replaced by the gradient.  Gradients are taken
        with ``torch.autograd.grad``: no ``.grad`` is touched.
        """
        params = dict(self.module.named_parameters())
        shape = self._shape
        theta = {n: params[n].detach().clone() for n in _weight_names(self.module)}

        def apply(name: str, value: Tensor) -> Tensor:
            return functional_linear_map(self.module, shape, {**theta, name: value})(vectors).flatten(1)

        with torch.no_grad():
            target = scale.reshape(-1, 1) * functional_linear_map(self.module, shape, theta)(vectors).flatten(1)
        for _ in range(self.descent_steps):
            for name in theta:
                value = theta[name].requires_grad_(True)
                with torch.enable_grad():
                    residual = apply(name, value) - target
                    (grad,) = torch.autograd.grad(0.5 * residual.pow(2).sum(), value)
                value = value.detach()
                slope = apply(name, grad)  # A is linear in this tensor alone: A(grad) = dA/dt
                alpha = (residual.detach() * slope).sum() / slope.pow(2).sum().clamp_min(1e-30)
                theta[name] = value - alpha * grad
        for name, value in theta.items():
            params[name].copy_(value)

    def _clip_batchnorm(self) -> Tensor:
        bn = self.module
        bound = self.clip * torch.sqrt(bn.running_var + bn.eps)
        bn.weight.copy_(torch.maximum(torch.minimum(bn.weight, bound), -bound))
        with eval_mode(bn):
            values, vectors = ritz(linear_map(bn, self._shape), self.vectors)
        self.sigmas, self.vectors = values, vectors
        return values

    # ------------------------------------------------------------------ logging

    def log_sigmas(self, writer: Any, step: int) -> None:
        """Write the tracked singular values as scalars ``sigma/<name>[/i]``."""
        values = self.sigmas.tolist()
        if not all(math.isfinite(v) for v in values):
            raise RobustclipError(f"layer {self.name!r}: singular value estimate is not finite "
                                  f"(NaN or infinite weights?)")
        for i, v in enumerate(values):
            writer.add_scalar(f"sigma/{self.name}" + (f"/{i + 1}" if i else ""), v, step)

    def extra_repr(self) -> str:
        return (f"clip={self.clip}, k={self.k}, clip_steps={self.clip_steps}, "
                f"init_delay={self.init_delay}, rescale_every_step={self.rescale_every_step}")


class SpectralNorm(SpectralClip):
    """The tutorial's API (Senderovich et al. 2022): same keywords and defaults.

    ``SpectralNorm(module, clip_flag=True, clip=1., summary=True, writer=writer)`` tracks
    the layer's largest singular value, clips it every ``clip_steps`` steps after
    ``init_delay`` steps, and logs it to ``writer`` every step when ``summary``.
    ``device`` is accepted for compatibility: the wrapper follows the device of its
    module and inputs.  ``clip_opt_stepsize`` is accepted but unused: robustclip's clip
    descent uses an exact line search.  ``bn_hard`` chooses Gouk's clamp for a lone
    BatchNorm (the only BN rule offered).  ``exact`` selects the two-sided variant.
    """

    def __init__(self, module: nn.Module, name: str = "weight", k: int = 1,
                 clip_flag: bool = True, deflate_iter: int = 1, init_delay: int = 500,
                 clip: float = 1.0, init_pqr_iter: int = 100, pqr_iter: int = 1,
                 clip_steps: int = 50, clip_opt_iter: int = 5, clip_opt_stepsize: float = 0.35,
                 clip_rsv_size: int = 1, summary: bool = False, device: Any = None,
                 bn_hard: bool = True, writer: Any = None, identifier: str | None = None,
                 save_info: bool = False, exact: bool = False) -> None:
        if name != "weight":
            raise RobustclipError(f"SpectralNorm clips the 'weight' tensors only, got name={name!r}")
        super().__init__(module, clip if clip_flag else None, k=max(k, clip_rsv_size),
                         clip_steps=clip_steps, init_delay=init_delay, iters_per_step=pqr_iter,
                         init_iters=init_pqr_iter, two_sided=exact,
                         descent_steps=max(clip_opt_iter, 1),
                         name=f"{type(module).__name__}{identifier or ''}",
                         writer=writer if summary else None, log_every=1)
