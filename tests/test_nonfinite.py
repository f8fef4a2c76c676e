"""Non-finite logits (NaN or an infinity anywhere in a row) count as wrong and raise a
sanity warning: in the clean pass, in every attack's scoring, in a cascade's stages and
in the certificates."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import robustclip.evaluation as H
from robustclip.certificates import certified, predicted_correct
from robustclip.evaluation.cascade import cascade_of
from robustclip.evaluation.checks import Tally, start_point_warnings


class InfiniteTop(nn.Module):
    """``model`` with its top logit replaced by +inf: the prediction is the model's, and
    the loss gradient is NaN, so no gradient attack can move it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        top = z == z.max(1, keepdim=True).values
        return torch.where(top, torch.full_like(z, math.inf), z)


@pytest.mark.parametrize("attack, params", [("pgd", {"steps": 5}), ("fgsm", {}),
                                            ("apgd", {"steps": 5})])
def test_an_infinite_top_logit_is_not_robust(models, data, attack, params):
    x, y = (t[:40] for t in data)
    finite, infinite = models["a"], InfiniteTop(models["a"]).eval()
    spec = H.make_spec(attack, 0.3, **params)
    ev = H.evaluate({"finite": finite, "infinite": infinite}, x, y, [spec], bounds=False)
    rows = {r.model: r for r in ev.results}
    assert int(rows["finite"].clean.sum()) > 20  # the same predictions, all finite
    assert not rows["infinite"].clean.any() and not rows["infinite"].robust.any()
    said = [w.message for w in ev.warnings if w.model == "infinite"]
    assert any("NaN or infinite logits on clean inputs" in m for m in said)
    assert any("NaN or infinite loss gradient" in m for m in said)
    assert not [w for w in ev.warnings if w.model == "finite" and "infinite" in w.message]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_row_with_any_non_finite_logit_is_wrong(bad):
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])
    logits[1, 2] = bad  # not the top logit (for +inf it becomes the top)
    labels = torch.tensor([0, 0])
    assert predicted_correct(logits, labels).tolist() == [True, False]
    assert certified(logits, labels, 1.0, 0.1).tolist() == [True, False]


def test_an_infinite_logit_on_the_label_is_never_certified():
    logits = torch.tensor([[math.inf, 0.0, 0.0]])
    assert not certified(logits, torch.tensor([0]), 1.0, 1e6).any()


def test_the_tally_counts_infinite_adversarial_logits():
    spec = H.make_spec("fgsm", 0.1)
    x = torch.zeros(3, 1, 2, 2)
    logits = torch.tensor([[1.0, 0.0], [math.inf, 0.0], [0.0, -math.inf]])
    tally = Tally(spec)
    ok = torch.ones(3, dtype=torch.bool)
    tally.add(x, x, logits, ok, predicted_correct(logits, torch.zeros(3, dtype=torch.long)))
    (warning,) = tally.warnings("m")
    assert warning.message.startswith("2 samples have NaN in the adversarial example or NaN or infinite")


def test_a_cascade_stage_counts_an_infinite_adversarial_logit_as_fooled():
    """The model is finite on clean inputs and puts +inf on a wrong class off them: a
    stage's example with such logits fools it (it is not taken as still robust)."""

    class Cliff(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1)  # the loss of label 0 grows with m
            z = torch.stack([torch.ones_like(m), m], 1)
            top = (m > 0.5)[:, None] & (torch.arange(2) == 0)
            return torch.where(top, torch.full_like(z, math.inf), z)

    model = Cliff().eval()
    x, y = torch.full((4, 1, 2, 2), 0.45), torch.zeros(4, dtype=torch.long)
    cascade = cascade_of([H.make_spec("fgsm", 0.1, label="c:fgsm")], "c")
    ev = H.evaluate({"m": model}, x, y, [cascade], bounds=False)
    assert all(r.clean.all() for r in ev.results)
    assert not any(r.robust.any() for r in ev.results)


def test_a_nan_gradient_is_a_start_point_warning():
    class NanGrad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = x.flatten(1)[:, :4]
            return z + 0 * torch.sqrt(-z.abs() - 1).nan_to_num(0)  # finite out, NaN grad

    x = torch.rand(3, 1, 2, 2)
    model = NanGrad()
    said = [w.message for w in start_point_warnings(model, "m", x, torch.zeros(3, dtype=torch.long),
                                                    model(x))]
    assert any("3 of 3 samples have a NaN or infinite loss gradient" in m for m in said)
