"""Lipschitz bounds of whole networks (empirical ratios: ``robustclip.empirical``;
certificates: ``robustclip.certificates``).

:func:`lipschitz_report` traces a model with :mod:`torch.fx` (spectral wrappers and
standard layers stay leaves), propagates shapes for one input of ``input_shape`` and walks
the graph, bounding the L2 Lipschitz constant L(node) of every node as a function of the
model input.

What is proved about each operator is decided by :mod:`robustclip.known_ops`, by type
and arguments, never by probing outputs:

* an operator linear by construction (conv, linear, BatchNorm in eval, average pooling,
  padding, the input normalisation, robustclip's spectral wrappers of these, sums,
  means, products with constants): sigma(operator at its input shape) * L(input);
* a conv whose only user is its BatchNorm: ONE composite operator Sequential(conv, bn);
* an activation, max pool or reshape with a proven Lipschitz constant c (1 for ReLU,
  tanh, GroupSort, flatten, ...; 1/4 for sigmoid; 1.129 for GELU; sqrt(max windows
  holding one input) for max pooling): c * L(input), a row where c != 1;
* add/sub: L(a) + L(b) (|alpha| L(b) for torch.add(a, b, alpha)); cat: sqrt(sum L_i^2);
* anything else: if the linearity probe (``spectral.check_linear``) fails,
  :class:`RobustclipError` "cannot bound <op>"; if it passes, the operator's PowerQR
  value, a row of kind "estimate" that makes the network bound an estimate.

A proven linear operator's sigma is estimated by PowerQR (a Ritz value: a LOWER estimate
that converges from below; ``rel_change`` says how far from converged) and bounded from
above where possible (:mod:`robustclip.upper_bounds`): exact from the weights (linear,
lone BatchNorm, input normalisation, circular stride-1 conv), exact from the float64 Gram
matrix where the input has at most ``exact_max_dim`` values, else a guaranteed upper
bound (FFT for convs and conv+BN, Schur test for average pools).  The network bound
multiplies these; an operator with neither gets its PowerQR estimate, and the report says
so (``bound_kind`` "estimate"): such a bound is not a certificate.

Row names are module paths, as the wrappers' ``sigma/<name>`` (robustclip.models): an
operator that is one module is named by its path (``fc1``; ``block1`` for a conv+BN
module such as models.ConvBN, whether a wrapper holds it or the walk pairs its ``conv``
and ``bn``); a composite the walk forms from two modules, by both (``conv1+bn1``).
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Any, Sequence

import pandas as pd
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx.passes.shape_prop import ShapeProp
from tqdm import tqdm

from robustclip.errors import RobustclipError, first_line
from robustclip.known_ops import (AVG_POOL_FUNCTIONS, function_lipschitz, is_linear_function,
                                  is_linear_module, module_lipschitz, unwrapped)
from robustclip.spectral import (_BATCHNORMS, _CONVS, SpectralEstimate, _unwrap, eval_mode,
                                 spectral_estimate)
from robustclip.upper_bounds import sigma_upper_bound

log = logging.getLogger(__name__)

_ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_ESTIMATE_SLACK = 1e-3  # PowerQR above a bound by more than this (TF32 convs on GPU: ~1e-3) is logged
_COLUMNS = ["name", "type", "input_shape", "sigma", "rel_change", "iterations", "sigma_exact",
            "sigma_upper", "bound_kind"]


class _LeafTracer(fx.Tracer):
    """Keeps spectral wrappers, standard layers and childless custom modules (e.g. the
    input normalisation) as leaves: each is bounded as one operator."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (getattr(m, "is_spectral_wrapper", False) or super().is_leaf_module(m, qualname)
                or next(m.children(), None) is None)


class _ValueProp(ShapeProp):
    """ShapeProp that also keeps the values of nodes not depending on the input."""

    def __init__(self, gm: fx.GraphModule, dependent: set[fx.Node]) -> None:
        super().__init__(gm)
        self.dependent, self.values = dependent, {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n not in self.dependent:
            self.values[n] = result
        return result


class _Op(nn.Module):
    """One graph call as a module of its single input-dependent tensor argument.

    Constant tensor arguments become buffers (so device/dtype moves reach them)."""

    def __init__(self, node: fx.Node, args: tuple, kwargs: dict, fn: Any) -> None:
        super().__init__()
        self.fn, self.label = fn, _label(node)
        self.names: list[str] = []

        def hold(a: Any) -> Any:
            if isinstance(a, Tensor):
                name = f"const{len(self.names)}"
                self.register_buffer(name, a)
                self.names.append(name)
                return _Const(name)
            return a
        self.call_args = [hold(a) for a in args]
        self.call_kwargs = {k: hold(v) for k, v in kwargs.items()}

    def forward(self, x: Tensor) -> Tensor:
        def sub(a: Any) -> Any:
            return x if isinstance(a, _Slot) else getattr(self, a.name) if isinstance(a, _Const) else a
        return self.fn(*[sub(a) for a in self.call_args],
                       **{k: sub(v) for k, v in self.call_kwargs.items()})


class _Const:
    """Placeholder for a constant tensor argument held as buffer ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Slot:
    """Where the input goes among a call's arguments (a class: survives deepcopy)."""


_SLOT = _Slot()


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape[1:])


class _Walker:
    """Computes L(node) over the traced graph and collects one row per measured operator."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any], dependent: set[fx.Node],
                 tol: float, iters: int | None, exact_max_dim: int, exact_max_entries: int,
                 seed: int, pairs: dict[tuple[str, str], str], progress: str = "") -> None:
        self.gm, self.values, self.dependent, self.pairs = gm, values, dependent, pairs
        self.progress = progress  # the bar's title; "" shows none
        self.tol, self.iters, self.seed = tol, iters, seed
        self.exact_max_dim, self.exact_max_entries = exact_max_dim, exact_max_entries
        self.L: dict[fx.Node, float] = {}
        self.rows: list[dict] = []

    # ----------------------------------------------------------------- helpers

    def _dep_nodes(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs),
                        lambda a: found.append(a) if a in self.dependent else None)
        return found

    def _tensor_deps(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in self._dep_nodes(node) if "tensor_meta" in a.meta]

    def _measure(self, module: nn.Module, shape: tuple[int, ...], name: str, kind: str,
                 nonnegative: bool = False) -> float:
        """Upper bound of the spectral norm of an implicitly linear ``module`` on inputs of
        ``shape`` (its PowerQR estimate where none is known); adds a row.

        nonnegative: the operator's matrix has no negative entry (a functional average pool).
        """
        est = self._estimate(module, shape, name, kind)
        sigma = float(est.values[0])
        upper = sigma_upper_bound(module, shape, nonnegative=nonnegative,
                                  exact_max_dim=self.exact_max_dim,
                                  max_entries=self.exact_max_entries)
        bound, bound_kind, how = ((upper.value, upper.kind, upper.how) if upper is not None
                                  else (math.nan, "estimate", "PowerQR only"))
        if sigma > bound * (1 + _ESTIMATE_SLACK):
            log.warning("%s (%s): PowerQR estimate %.6g exceeds the %s bound %.6g (%s)",
                        name, kind, sigma, bound_kind, bound, how)
        log.debug("%s (%s) on %s: sigma %.6g after %d iterations (change %.2g), %s %.6g (%s)",
                  name, kind, shape, sigma, est.iterations, float(est.rel_change), bound_kind,
                  bound, how)
        self.rows.append({"name": name, "type": kind, "input_shape": shape, "sigma": sigma,
                          "rel_change": float(est.rel_change), "iterations": est.iterations,
                          "sigma_exact": bound if bound_kind == "exact" else math.nan,
                          "sigma_upper": bound, "bound_kind": bound_kind})
        return sigma if math.isnan(bound) else bound

    def _estimate(self, module: nn.Module, shape: tuple[int, ...], name: str,
                  kind: str) -> SpectralEstimate:
        """PowerQR's top singular value of ``module``; a module the linearity probe
        refuses raises RobustclipError "cannot bound <name>"."""
        try:
            return spectral_estimate(module, shape, k=1, iters=self.iters, tol=self.tol,
                                     seed=self.seed)
        except RobustclipError as err:
            raise RobustclipError(f"cannot bound {name} ({kind}): {err}") from None

    def _composite_bn(self, node: fx.Node) -> fx.Node | None:
        """The BatchNorm node fed only by conv ``node``, if that is the pattern."""
        if node.op != "call_module" or len(node.users) != 1:
            return None
        conv = self.gm.get_submodule(node.target)
        if not (isinstance(unwrapped(conv), _CONVS) and is_linear_module(conv)):
            return None
        (user,) = node.users
        if (user.op == "call_module" and user.args[:1] == (node,) and len(user.args) == 1
                and not user.kwargs):
            bn = self.gm.get_submodule(user.target)
            if isinstance(unwrapped(bn), _BATCHNORMS) and is_linear_module(bn):
                return user
        return None

    def _as_op(self, node: fx.Node, dep: fx.Node) -> _Op:
        """Wrap a call_function/call_method node as a module of its input-dependent arg."""
        def fill(a: fx.Node) -> Any:
            if a is dep:
                return _SLOT
            if a in self.dependent:
                raise RobustclipError(f"cannot bound {_label(node)}: an argument depends on "
                                      f"the input shape ({a.name})")
            return self.values[a]
        args = fx.node.map_arg(node.args, fill)
        kwargs = fx.node.map_arg(node.kwargs, fill)
        if node.op == "call_method":
            name = node.target
            fn = lambda self_, *a, **k: getattr(self_, name)(*a, **k)  # noqa: E731
        else:
            fn = node.target
        return _Op(node, tuple(args), dict(kwargs), fn)

    # ----------------------------------------------------------------- the walk

    def run(self) -> float:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise RobustclipError(f"cannot bound a model with {len(placeholders)} inputs; it must take one tensor")
        deferred: set[fx.Node] = set()
        nodes = tqdm(self.gm.graph.nodes, total=len(self.gm.graph.nodes), desc=self.progress,
                     unit="op", disable=not self.progress, leave=False)
        for node in nodes:
            nodes.set_postfix_str(str(node.target)[-30:], refresh=False)
            if node.op == "placeholder":
                self.L[node] = 1.0
            elif node.op == "output":
                (out,) = node.args
                if not isinstance(out, fx.Node) or out not in self.L:
                    raise RobustclipError("cannot bound a model whose output is not one tensor")
                return self.L[out]
            elif node not in self.dependent or "tensor_meta" not in node.meta:
                continue  # constants and shape arithmetic
            elif self._composite_bn(node) is not None:
                deferred.add(node)
            elif node.op == "call_module" and node.args[:1] and node.args[0] in deferred:
                conv = node.args[0]
                composite = nn.Sequential(self.gm.get_submodule(conv.target),
                                          self.gm.get_submodule(node.target))
                kind = (f"{type(_unwrap(composite[0])).__name__}+"
                        f"{type(_unwrap(composite[1])).__name__}")
                name = self.pairs.get((conv.target, node.target), f"{conv.target}+{node.target}")
                sigma = self._measure(composite, _shape(conv.args[0]), name, kind)
                self.L[node] = sigma * self.L[conv.args[0]]
            else:
                self.L[node] = self._bound(node)
        raise RobustclipError("cannot bound a graph without an output")

    def _bound(self, node: fx.Node) -> float:
        deps = self._tensor_deps(node)
        target = node.target
        if node.op == "call_function" and target in _ADDS:
            alpha = abs(float(node.kwargs.get("alpha", 1)))
            a, b = (node.args + (None, None))[:2]
            return sum(self.L.get(x, 0.0) * (alpha if i == 1 else 1.0)
                       for i, x in enumerate((a, b)) if isinstance(x, fx.Node))
        if node.op == "call_function" and target is torch.cat:
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            return math.sqrt(sum(self.L[d] ** 2 for d in tensors
                                 if isinstance(d, fx.Node) and d in self.L))
        if len(deps) != 1:
            raise RobustclipError(f"cannot bound {_label(node)}: it combines {len(deps)} "
                                  "input-dependent tensors (only add, sub and cat can)")
        (dep,) = deps
        factor = self._factor(node, dep)
        return factor * self.L[dep]

    def _factor(self, node: fx.Node, dep: fx.Node) -> float:
        """Lipschitz factor of the single-input op ``node``: a proven constant, the measured
        sigma of a proven linear operator, or (anything else) an estimate."""
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            name, kind = str(node.target), _kind(module)
            inner = unwrapped(module)
            if inner is not None and (constant := module_lipschitz(inner)) is not None:
                return self._constant_row(node, constant, kind)
            if is_linear_module(module):
                return self._measure(module, _shape(dep), name, kind)
            return self._unproven(module, _shape(dep), name, kind)
        if node.op == "call_function" and node.target in _DROPOUTS and \
                (node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)):
            raise RobustclipError(f"cannot bound {_label(node)}: dropout in training mode")
        if (constant := function_lipschitz(node)) is not None:
            return self._constant_row(node, constant, "function")
        op = self._as_op(node, dep)
        if is_linear_function(node, self.dependent):
            return self._measure(op, _shape(dep), op.label, "function",
                                 nonnegative=node.op == "call_function"
                                 and node.target in AVG_POOL_FUNCTIONS)
        return self._unproven(op, _shape(dep), op.label, "function")

    def _unproven(self, module: nn.Module, shape: tuple[int, ...], name: str, kind: str) -> float:
        """An operator nothing proves anything about (``robustclip.known_ops``): refused when
        the linearity probe shows it is not linear, else its PowerQR value as an estimate
        (a row of kind "estimate": no certificate rests on it)."""
        est = self._estimate(module, shape, name, kind)
        sigma = float(est.values[0])
        log.warning("%s (%s): not an operator robustclip can prove a bound for (it only passed "
                    "a linearity probe); its PowerQR value %.6g makes the network bound an "
                    "estimate, which certifies nothing", name, kind, sigma)
        self.rows.append({"name": name, "type": kind, "input_shape": shape, "sigma": sigma,
                          "rel_change": float(est.rel_change), "iterations": est.iterations,
                          "sigma_exact": math.nan, "sigma_upper": math.nan,
                          "bound_kind": "estimate"})
        return sigma

    def _constant_row(self, node: fx.Node, factor: float, kind: str) -> float:
        """A proven Lipschitz constant ``factor``; a row for it unless it is 1."""
        if factor != 1.0:
            self.rows.append({"name": _label(node), "type": f"{kind} (Lipschitz constant)",
                              "input_shape": _shape(node.args[0]), "sigma": factor,
                              "rel_change": 0.0, "iterations": 0, "sigma_exact": math.nan,
                              "sigma_upper": factor, "bound_kind": "upper"})
        return factor


def _kind(module: nn.Module) -> str:
    inner = _unwrap(module)
    name = type(inner).__name__
    return f"{type(module).__name__}({name})" if inner is not module else name


def _dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model input (the placeholders, transitively)."""
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _conv_bn_modules(model: nn.Module) -> dict[tuple[str, str], str]:
    """(conv path, bn path) -> path of each Sequential of exactly a conv then a BatchNorm
    (wrapped or not) below the root: the module that is that composite."""
    pairs = {}
    for path, module in model.named_modules():
        children = list(module.named_children())
        if (path and isinstance(module, nn.Sequential) and len(children) == 2
                and isinstance(_unwrap(children[0][1]), _CONVS)
                and isinstance(_unwrap(children[1][1]), _BATCHNORMS)):
            pairs[(f"{path}.{children[0][0]}", f"{path}.{children[1][0]}")] = path
    return pairs


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx graph with spectral wrappers and standard layers as leaves."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # fx raises many types for untraceable Python
        raise RobustclipError(f"cannot trace {type(model).__name__} with torch.fx: "
                              f"{' '.join(str(err).split())}") from None
    return fx.GraphModule(model, graph)


def lipschitz_report(model: nn.Module, input_shape: Sequence[int], *, tol: float = 1e-6,
                     iters: int | None = None, exact_max_dim: int = 1024,
                     exact_max_entries: int = 2**22, seed: int = 0,
                     progress: str = "") -> tuple[float, pd.DataFrame]:
    """L2 Lipschitz bound of ``model`` from its input (float), and per-layer rows.

    input_shape: one input without batch dim, e.g. (1, 28, 28), in the model's input
    units (pixels in [0, 1]: the normalisation layer is part of the model).
    tol / iters: PowerQR convergence target / fixed iteration count per layer.
    exact_max_dim: the exact sigma of an operator without an exact formula (the top
    eigenvalue of the float64 Gram matrix A^T A, see ``spectral.gram_matrix``) is
    computed only when its input has at most this many values; exact_max_entries: output
    values per chunk of that computation (memory).  progress: a title for a progress bar
    over the graph's operators (on stderr; "" shows none).

    Rows (pandas.DataFrame), one per measured operator: name, type, input_shape, sigma
    (PowerQR estimate, a lower bound), rel_change, iterations, sigma_exact (exact sigma
    or NaN), sigma_upper (guaranteed upper bound, equal to sigma_exact where that is
    known; NaN if none) and bound_kind ("exact", "upper" or "estimate": what the network
    bound used for this row: sigma_upper for the first two, sigma for "estimate").
    ``rows.attrs["bound_kind"]`` (see :func:`network_bound_kind`) is "upper" when the
    returned bound is a guaranteed upper bound of the Lipschitz constant (a certificate
    may use it) and "estimate" when some operator had only its PowerQR estimate.  The
    model is evaluated in eval mode, its modes restored.
    """
    shape = tuple(int(s) for s in input_shape)
    with eval_mode(model), torch.no_grad():
        gm = trace(model)
        dependent = _dependent(gm.graph)
        like = next(iter([*model.parameters(), *model.buffers()]), torch.zeros(()))
        example = torch.zeros((1, *shape), device=like.device,
                              dtype=like.dtype if like.is_floating_point() else torch.float32)
        try:  # the model's own error on this shape, in one line (fx would print a traceback)
            model(example)
        except Exception as err:
            first = first_line(err)
            raise RobustclipError(f"model fails on input shape {shape}: {first}") from None
        prop = _ValueProp(gm, dependent)
        prop.propagate(example)
        walker = _Walker(gm, prop.values, dependent, tol, iters, exact_max_dim,
                         exact_max_entries, seed, _conv_bn_modules(model), progress)
        bound = walker.run()
    rows = pd.DataFrame(walker.rows, columns=_COLUMNS)
    rows.attrs["bound_kind"] = network_bound_kind(rows)
    return float(bound), rows


def network_bound_kind(rows: pd.DataFrame) -> str:
    """"estimate" if any row of a :func:`lipschitz_report` is an estimate, else "upper".

    A product (and sum, over residual branches) of per-operator norms bounds the
    network's Lipschitz constant from above and is never claimed exact, even when every
    factor is.
    """
    return "estimate" if (rows["bound_kind"] == "estimate").any() else "upper"
