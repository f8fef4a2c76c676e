"""Ensembles: N models as one classifier, and the checks that let models be combined."""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from robustclip.bounds import lipschitz_report
from robustclip.data import DataSource, data_source
from robustclip.errors import RobustclipError


def meta_name(meta: Mapping[str, Any], key: str) -> str:
    """``meta[key]`` as a name: checkpoints store {"name": ..., "args": ...} there."""
    value = meta.get(key, "")
    return str(value.get("name", "")) if isinstance(value, Mapping) else str(value or "")


def check_one_dataset(models: Sequence[nn.Module]) -> DataSource | None:
    """The test data shared by ``models`` (robustclip.data.data_source of their
    ``robustclip_meta``): one dataset, and one synthetic split for runs trained on
    synthetic data; mixed datasets or splits raise."""
    sources = {data_source(m.robustclip_meta) for m in models
               if getattr(m, "robustclip_meta", {}).get("dataset")}
    datasets = sorted({s.dataset for s in sources})
    if len(datasets) > 1:
        raise RobustclipError(f"models of different datasets cannot be combined: {', '.join(datasets)}")
    if len(sources) > 1:
        raise RobustclipError("models of different test data cannot be combined: "
                              f"{', '.join(sorted(map(str, sources)))}")
    return next(iter(sources), None)


class Ensemble(nn.Module):
    """N models as one: output (n, classes) is log(mean softmax) or the mean of logits.

    With ``output='softmax'`` the cross-entropy of the output is -log of the members' mean
    probability of the label (the loss attacks maximise).  Members of different datasets
    raise RobustclipError.  ``robustclip_meta`` records the members and the choice.
    """

    OUTPUTS = ("softmax", "logits")

    def __init__(self, members: Sequence[nn.Module], output: str = "softmax") -> None:
        super().__init__()
        if output not in self.OUTPUTS:
            raise RobustclipError(f"ensemble output must be one of {', '.join(self.OUTPUTS)}, got {output!r}")
        if not members:
            raise RobustclipError("an ensemble needs at least one model")
        source = check_one_dataset(members)
        metas = [getattr(m, "robustclip_meta", {}) for m in members]
        self.members = nn.ModuleList(members)
        self.output = output
        self.training = any(m.training for m in members)  # a new Module says True: it would
        # make torchattacks call .train() on the members after each attack
        self.robustclip_meta = {
            "model": "ensemble", "dataset": source.dataset if source else None, "data_source": source,
            "ensemble_output": output,
            "method": "+".join(meta_name(m, "method") or "?" for m in metas),
            "members": [meta_name(m, "model") or "?" for m in metas],
        }

    def forward(self, x: Tensor) -> Tensor:
        outs = torch.stack([m(x) for m in self.members])  # (N, n, classes)
        if self.output == "logits":
            return outs.mean(0)
        return torch.logsumexp(F.log_softmax(outs, dim=-1), dim=0) - math.log(len(self.members))


class Bound(NamedTuple):
    """A network Lipschitz bound (L2, logits per input unit) and how sure it is: 'exact',
    'upper' (guaranteed upper bound), 'estimate' (no guarantee), 'given' (by the user),
    'none' (NaN), or 'refuted' (sound by construction, but the evaluation measured a pair
    ratio above it or broke a point it certified: ``evaluate.refutation``)."""

    value: float
    kind: str


SOUND = ("exact", "upper", "given")
"""The bound kinds a certificate may rest on."""
_ORDER = ("exact", "upper", "given", "estimate", "none")


def model_bound(model: nn.Module, input_shape: Sequence[int], **kwargs: Any) -> Bound:
    """Lipschitz bound of the logits (``bounds.lipschitz_report``) and its kind; for an
    ensemble of logits the mean of the members' bounds (its kind the weakest of theirs),
    for a softmax ensemble none (no certificate)."""
    if isinstance(model, Ensemble):
        if model.output != "logits":
            return Bound(math.nan, "none")
        parts = [model_bound(m, input_shape, **kwargs) for m in model.members]
        return Bound(sum(p.value for p in parts) / len(parts),
                     max((p.kind for p in parts), key=_ORDER.index))
    value, rows = lipschitz_report(model, input_shape, **kwargs)
    return Bound(value, rows.attrs.get("bound_kind", "estimate"))
