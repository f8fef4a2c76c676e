"""robustclip.evaluation: attacks, suites, ensembles, transfer and sanity warnings.

Fixture models are tiny convnets trained for a second on synthetic 1x10x10 data (CPU).
Independent references: torchattacks and foolbox called directly, hand-computed
margins, ``torch.linalg.vector_norm``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

import robustclip.evaluation as H
from robustclip.bounds import lipschitz_report
from robustclip.errors import RobustclipError
from robustclip.report import plot_robust_vs_lipschitz
from helpers import SHAPE, Offset, tiny_classifier

with warnings.catch_warnings():  # foolbox imports a deprecated scipy module
    warnings.simplefilter("ignore", DeprecationWarning)
    import foolbox

FAST = {  # few steps: tests check the harness, not attack strength
    "fgsm": {}, "pgd": {"steps": 10}, "pgdl2": {"steps": 10}, "cw": {"steps": 30, "c": 1.0},
    "apgd": {"steps": 10}, "apgdt": {"steps": 10, "n_target_classes": 2},
    "fab": {"steps": 10, "n_target_classes": 2}, "square": {"n_queries": 30},
}
EPS = {"Linf": [0.0, 0.03, 0.06, 0.1, 0.2], "L2": [0.0, 0.3, 0.6, 1.0, 2.0]}



def _spec(name: str, eps: float, **extra) -> H.AttackSpec:
    return H.make_spec(name, eps, **(FAST[name] | extra))


def _norm(name: str) -> str:
    return _spec(name, 0.0).norm


def _acc(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


ATTACKS = ["fgsm", "pgd", "pgdl2", "cw", "apgd", "square"]


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_zero_gives_robust_equal_clean(models, data, name):
    x, y = data
    ev = H.evaluate({"a": models["a"]}, x, y, [_spec(name, 0.0)], bounds=False, batch_size=50)
    (row,) = ev.results
    assert torch.equal(row.clean, _acc(models["a"], x, y))  # independent clean pass
    assert torch.equal(row.robust, row.clean)
    assert not ev.warnings


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgdl2", "cw", "apgd"])
def test_accuracy_does_not_rise_with_eps(models, data, name):
    x, y = data
    specs = [_spec(name, e) for e in EPS[_norm(name)]]
    ev = H.evaluate({"a": models["a"]}, x, y, specs, bounds=False, batch_size=50)
    acc = [float(r.robust.float().mean()) for r in ev.results if r.name == name]
    assert acc == sorted(acc, reverse=True), acc
    assert acc[0] > 0.9 and acc[-1] < acc[0]  # the eps range is informative


@pytest.mark.parametrize("name", ATTACKS)
def test_perturbation_within_eps(models, data, name):
    x, y = data
    eps = 0.1 if _norm(name) == "Linf" else 0.6
    spec = _spec(name, eps)
    (x_adv,) = H.adversarial(models["a"], [spec], x, y, seed=0, batch=0).values()
    order = math.inf if spec.norm == "Linf" else 2
    dist = torch.linalg.vector_norm((x_adv - x).flatten(1), ord=order, dim=1)
    assert bool((dist <= eps + 1e-6).all()), float(dist.max())
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.isnan().any()
    assert bool((dist > 0).any())  # the attack did move


def test_certified_le_robust_le_clean(models, data):
    x, y = data
    model = models["a"]
    specs = [_spec("pgdl2", e) for e in (0.0, 0.01, 0.05, 0.3)] + \
            [_spec("pgd", e) for e in (0.001, 0.003, 0.1)]
    ev = H.evaluate({"a": model}, x, y, specs, batch_size=50)
    bound, _ = lipschitz_report(model, SHAPE)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    for r in ev.results:
        assert r.lipschitz_bound == pytest.approx(bound)
        assert not bool((r.certified & ~r.robust).any()) and not bool((r.robust & ~r.clean).any())
        radius = r.eps if r.norm == "L2" else r.eps * 10  # sqrt(1 * 10 * 10)
        hand = r.clean & (margin > math.sqrt(2) * bound * radius)
        assert torch.equal(r.certified, hand), (r.attack, r.eps)
    assert any(0 < float(r.certified.float().mean()) < 1 for r in ev.results)
    assert 0 < ev.results[0].lipschitz_empirical <= bound


def test_pgd_agrees_with_foolbox(models, data):
    """Same samples, eps 0.06, 10 steps of eps/10.  Without random start both run the same
    deterministic iteration: at most 2 of 100 samples may differ (float rounding of
    gradient signs); with random start the starts differ: tolerance 0.06."""
    x, y = data
    model = models["a"]
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)  # else cuda when present
    for random_start, tol in [(False, 0.02), (True, 0.06)]:
        spec = H.make_spec("pgd", 0.06, steps=10, rel_stepsize=0.1, random_start=random_start)
        ev = H.evaluate({"a": model}, x, y, [spec], bounds=False, batch_size=100)
        ours = float(ev.results[0].robust.float().mean())
        torch.manual_seed(0)
        attack = foolbox.attacks.LinfPGD(abs_stepsize=0.006, steps=10, random_start=random_start)
        _, _, success = attack(fmodel, x, y, epsilons=[0.06])
        theirs = float((~success[0]).float().mean())
        assert abs(ours - theirs) <= tol, (random_start, ours, theirs)
        assert 0.1 < ours < 0.9  # an informative operating point


def test_cw_eps_is_a_filter(models, data):
    x, y = data
    model = models["a"]
    eps = [0.3, 0.6, 1.0]
    ev = H.evaluate({"a": model}, x, y, [_spec("cw", e) for e in eps], bounds=False,
                    batch_size=100)
    # reference: the unfiltered examples of the same (deterministic) CW run
    raw = H.craft(model, _spec("cw", 1.0), x, y, H.craft_seed(0, _spec("cw", 1.0), 0))
    dist = (raw - x).flatten(1).norm(dim=1)
    fooled = ~_acc(model, raw, y)
    clean = _acc(model, x, y)
    for r, e in zip([r for r in ev.results if r.name == "cw"], eps):
        assert torch.equal(r.robust, clean & ~(fooled & (dist <= e))), e
        assert "filter" in r.params["eps"]


def test_pairs_a_rounding_apart_keep_empirical_below_bound(models, data):
    """Regression (issue 4): CW returns x moved by its tanh round trip (~1e-7) where it
    fails.  In float32 the logits' rounding over such a distance (made visible here by a
    constant offset of 1000, which leaves the Lipschitz constant alone) gave ratios far
    above the bound.  PGD-L2 at eps 1e-6 makes such pairs for every sample."""
    x, y = data
    model = Offset(models["a"], 1000.0).eval()
    spec = _spec("pgdl2", 1e-6)
    ev = H.evaluate({"a": model}, x, y, [spec], batch_size=50)
    assert 0 < ev.results[0].lipschitz_empirical <= ev.results[0].lipschitz_bound


def test_cw_works_with_negative_logits(models, data):
    """torchattacks' CW alone does nothing when all logits are negative (as for the
    log-probabilities of a softmax ensemble); the harness result is shift-invariant."""
    x, y = data
    specs = [_spec("cw", 0.6)]
    shifted = Offset(models["a"], -100.0).eval()
    ours = H.evaluate({"a": models["a"]}, x, y, specs, bounds=False).results[0].robust
    neg = H.evaluate({"neg": shifted}, x, y, specs, bounds=False).results[0].robust
    assert torch.equal(ours, neg) and int(ours.sum()) < int(_acc(models["a"], x, y).sum())
    raw = torchattacks.CW(shifted, c=1.0, kappa=0.1, steps=30, lr=0.01)(x, y)
    clean = _acc(models["a"], x, y)
    assert not bool((clean & ~_acc(shifted, raw, y)).any())  # the library bug guarded against


def test_suite_is_a_per_sample_worst_case(models, data):
    x, y = data
    specs = [_spec("fgsm", 0.06), _spec("pgd", 0.06), _spec("apgd", 0.06)]
    ev = H.evaluate({"a": models["a"]}, x, y, specs, suite="mine", bounds=False)
    members = [r for r in ev.results if r.name != "suite"]
    (suite,) = [r for r in ev.results if r.name == "suite"]
    assert suite.attack == "mine" and suite.params["attacks"] == ["fgsm", "pgd", "apgd"]
    expected = members[0].robust & members[1].robust & members[2].robust
    assert torch.equal(suite.robust, expected)
    assert float(suite.robust.float().mean()) <= min(float(m.robust.float().mean()) for m in members)


def test_pgd_restarts_keep_the_worst_case(models, data):
    x, y = data
    one = H.evaluate({"a": models["a"]}, x, y, [_spec("pgd", 0.06, steps=3)], bounds=False)
    three = H.evaluate({"a": models["a"]}, x, y, [_spec("pgd", 0.06, steps=3, n_restarts=3)],
                       bounds=False)
    again = H.evaluate({"a": models["a"]}, x, y, [_spec("pgd", 0.06, steps=3)], bounds=False)
    r1, r3 = one.results[0].robust, three.results[0].robust
    assert torch.equal(r1, again.results[0].robust)  # seeded: reproducible
    assert not bool((r3 & ~r1).any())  # restart 0 is the 1-restart run; later ones only add
    assert int(r3.sum()) < int(r1.sum())


def test_transfer_diagonal_equals_white_box(models, data):
    x, y = data
    x, y = x[:60], y[:60]
    specs = [_spec("pgd", 0.06), _spec("cw", 0.6)]
    tr = H.transfer(models, x, y, specs, batch_size=30)
    ev = H.evaluate(models, x, y, specs, bounds=False, batch_size=30)
    for r in (r for r in ev.results if r.name != "suite"):
        matrix = tr.matrix(r.attack, r.eps)
        assert matrix.shape == (2, 2)
        assert matrix.loc[r.model, r.model] == pytest.approx(float(r.robust.double().mean()), abs=0)
    surrogate = tr.table[tr.table.kind == "surrogate"]
    assert sorted(surrogate.target) == ["a", "a", "b", "b"]
    assert set(surrogate.source) == {"all-but-a", "all-but-b"}
    # with N = 2 the surrogate of b is the (softmax) ensemble of a alone: same loss as a
    for _, row in surrogate.iterrows():
        source = "a" if row.target == "b" else "b"
        assert row.accuracy == pytest.approx(tr.matrix(row.attack, row.eps).loc[source, row.target],
                                             abs=0.02)
    assert not any(m.training for model in models.values() for m in model.modules())
    plain = H.transfer(models, x, y, specs, batch_size=30, surrogates=False)
    assert set(plain.table.kind) == {"white-box", "transfer"}
    assert plain.table.equals(tr.table[tr.table.kind != "surrogate"].reset_index(drop=True)
                              .assign(seconds=plain.table.seconds))


def test_transfer_does_not_depend_on_model_order(models, data):
    """Regression: torchattacks calls .train() after attacking a model in training mode; a
    fresh ensemble wrapper left its members' BatchNorm in training mode for later rows."""
    x, y = data
    spec = [_spec("pgd", 0.06)]
    forward = H.transfer(models, x[:40], y[:40], spec).table
    backward = H.transfer(dict(reversed(models.items())), x[:40], y[:40], spec).table
    key = ["source", "target", "kind"]
    merged = forward.merge(backward, on=key, suffixes=("", "_reversed"))
    assert len(merged) == 6 and (merged.accuracy == merged.accuracy_reversed).all()


class _Quantise(nn.Module):
    """Rounds inputs to 1/255: zero gradient everywhere (gradient masking)."""

    def forward(self, x):
        return torch.round(x * 255) / 255


def test_white_box_weaker_than_transfer_is_reported(models, data):
    x, y = data
    masked = nn.Sequential(_Quantise(), models["a"])
    masked.robustclip_meta = models["a"].robustclip_meta
    tr = H.transfer({"plain": models["a"], "masked": masked}, x[:50], y[:50],
                    [_spec("pgd", 0.1, random_start=False)], batch_size=50)
    m = tr.matrix("pgd", 0.1)
    assert m.loc["plain", "masked"] < m.loc["masked", "masked"]
    assert any("white-box attack is weaker" in w.message and w.model == "masked"
               for w in tr.warnings)


class _Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1e-2 * torch.randn(len(x), 10)


def test_sanity_warnings_in_plain_words(models, data):
    x, y = data
    model = models["a"]
    ev = H.evaluate({"noisy": _Noisy(model)}, x[:20], y[:20], [_spec("fgsm", 0.1)], bounds=False)
    assert any("not deterministic" in str(w) for w in ev.warnings)
    ev = H.evaluate({"a": model}, x[:20] * 1.5, y[:20], [_spec("fgsm", 0.1)], bounds=False)
    assert any("outside [0, 1]" in str(w) for w in ev.warnings)
    ev = H.evaluate({"a": model}, x, y, [_spec("pgd", 0.1)], bounds={"a": 1e-9})
    assert any("certified yet the attack broke them" in str(w) for w in ev.warnings)
    weak = H.make_spec("pgd", 0.1, steps=1, rel_stepsize=0.01, random_start=False)
    ev = H.evaluate({"a": model}, x, y, [_spec("fgsm", 0.1), weak], bounds=False)
    assert any("weaker than one FGSM step" in str(w) for w in ev.warnings)


def test_ensemble_outputs_and_datasets(models, data):
    x, _ = data
    a, b = models["a"], models["b"]
    with torch.no_grad():
        soft = H.Ensemble([a, b], "softmax")(x)
        mean_prob = (F.softmax(a(x), 1) + F.softmax(b(x), 1)) / 2
        assert torch.allclose(soft.exp(), mean_prob, atol=1e-6)
        assert torch.allclose(H.Ensemble([a, b], "logits")(x), (a(x) + b(x)) / 2, atol=1e-6)
    other = tiny_classifier(2, dataset="fashion-mnist")
    with pytest.raises(RobustclipError, match="different datasets"):
        H.Ensemble([a, other])
    ens = H.Ensemble([a, b], "logits")
    assert ens.robustclip_meta["ensemble_output"] == "logits"
    assert H.model_bound(ens, SHAPE).value == pytest.approx(
        (lipschitz_report(a, SHAPE)[0] + lipschitz_report(b, SHAPE)[0]) / 2)
    assert math.isnan(H.model_bound(H.Ensemble([a, b]), SHAPE).value)


def test_old_parameter_names_are_accepted_with_a_note(caplog):
    with caplog.at_level("WARNING"):
        spec = H.make_spec("square", 0.1, queries=7, restarts=2)
    assert spec.kwargs["n_queries"] == 7 and spec.kwargs["n_restarts"] == 2
    assert "'queries' is now 'n_queries'" in caplog.text


def test_specs_and_suites(tmp_path):
    suite = H.load_suite(Path(__file__).parents[1] / "attacks" / "mnist.toml")
    pgd = [s for s in suite.specs if s.name == "pgd"]
    assert [s.eps for s in pgd] == [0.1, 0.2, 0.3, 0.4]
    assert pgd[0].kwargs == {"steps": 50, "rel_stepsize": 0.1, "random_start": True, "n_restarts": 1}
    assert {s.label for s in suite.specs if s.name == "cw"} == {"cw-c0.02", "cw-c0.1"}
    assert H.load_suite(Path(__file__).parents[1] / "attacks" / "cifar10.toml").specs
    with pytest.raises(RobustclipError, match="valid attacks: fgsm, pgd"):
        H.make_spec("pgdd", 0.1)
    with pytest.raises(RobustclipError, match="unknown key 'stepz'.*valid keys: steps"):
        H.make_spec("pgd", 0.1, stepz=3)
    with pytest.raises(RobustclipError, match="Linf eps 2 > 1"):
        H.make_spec("pgd", 2)
    with pytest.raises(RobustclipError, match=">= 0"):
        H.make_spec("cw", -0.5)
    bad = tmp_path / "bad.toml"
    bad.write_text('[eps]\nLinf = [0.1]\n[[attack]]\nname = "pgd"\nalpha = 0.1\n')
    with pytest.raises(RobustclipError, match="unknown key 'alpha'"):
        H.load_suite(bad)


@pytest.mark.parametrize("bounds", [[8891.2], [2.0, 8891.2], [1.1, 1.3, 1.2]])
def test_robust_vs_lipschitz_names_every_model_inside_the_frame(monkeypatch, bounds):
    """Each model's name is drawn within the axes, the rightmost model's (alone or not)
    to the left of its point."""
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    table = pd.DataFrame([{"model": f"a-rather-long-model-name-s{i}", "norm": "Linf", "eps": eps,
                           "attack": "standard", "robust_acc": acc, "clean_acc": 1.0,
                           "lipschitz_bound": bound}
                          for i, bound in enumerate(bounds) for eps, acc in [(0.1, 0.99), (0.3, 0.8)]])
    plot_robust_vs_lipschitz(table, "unused.png")
    (fig,) = drawn
    fig.canvas.draw()
    ax = fig.axes[0]
    frame = ax.get_window_extent()
    names = [t for t in ax.texts if t.get_text().startswith("a-rather")]
    assert len(names) == len(bounds)
    for text in names:
        box = text.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()
