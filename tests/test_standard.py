"""The standard evaluation: cascades, the CW search, sound certificates, attack strength
against independent implementations (torchattacks called directly, foolbox), and every
sanity warning made to fire by a purpose-built model.

Fixture models: the tiny classifiers of 1x10x10 synthetic images (conftest), and a linear
classifier whose certified radius is known in closed form.
"""
from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

import robustclip.evaluation as H
from robustclip.evaluation.attacks import ATTACKS, AttackDef
from robustclip.evaluation.cascade import VERSIONS
from robustclip.errors import RobustclipError
from helpers import SHAPE

craft_module = importlib.import_module("robustclip.evaluation.craft")  # not the function

with warnings.catch_warnings():  # foolbox imports a deprecated scipy module
    warnings.simplefilter("ignore", DeprecationWarning)
    import foolbox

ROOT = Path(__file__).resolve().parents[1]
CHEAP = {"steps": 20, "n_queries": 300}  # cascade tests check bookkeeping, not strength


def _acc(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _rows(ev, model: str) -> dict[str, H.AttackResult]:
    return {r.attack: r for r in ev.results if r.model == model}


# ------------------------------------------------------------------------ cascades


def test_each_stage_attacks_only_the_points_still_robust(models, data, monkeypatch):
    x, y = data
    seen = []
    real = craft_module.craft

    def spy(model, spec, xs, ys, seed):
        seen.append((spec.label, len(xs)))
        return real(model, spec, xs, ys, seed)
    monkeypatch.setattr(craft_module, "craft", spy)
    cascade = H.make_cascade("standard", 0.3, "L2", **CHEAP)
    ev = H.evaluate({"a": models["a"]}, x, y, [cascade], batch_size=100, bounds=False)
    rows = _rows(ev, "a")
    clean = next(iter(rows.values())).clean
    before = clean
    for (label, n), member in zip(seen, cascade.members):
        row = rows[member.label]
        assert label == member.label and n == int(before.sum())
        assert row.broken == int((before & ~row.robust).sum())
        assert not bool((row.robust & ~before).any())  # robustness only falls
        before = row.robust
    final = rows["standard"]
    assert torch.equal(final.robust, before)
    assert final.broken == sum(rows[m.label].broken for m in cascade.members)
    assert final.broken == int((clean & ~final.robust).sum())
    assert not any(r.name == "suite" for r in ev.results)  # the cascade is its own worst case


def test_cascade_rows_are_reproducible_and_labelled(models, data):
    x, y = data
    spec = H.make_cascade("quick", 0.1, steps=20)
    one = H.evaluate({"a": models["a"]}, x, y, [spec], bounds=False, seed=3)
    two = H.evaluate({"a": models["a"]}, x, y, [spec], bounds=False, seed=3)
    assert [r.attack for r in one.results] == ["quick:apgd-ce", "quick:apgd-t", "quick"]
    assert all(torch.equal(a.robust, b.robust) for a, b in zip(one.results, two.results))
    assert one.results[-1].params == {"attacks": ["quick:apgd-ce", "quick:apgd-t"],
                                      "version": "quick"}


def test_standard_toml_is_the_builtin_cascade():
    suite = H.load_suite(ROOT / "attacks" / "standard.toml")
    by_key = {(s.norm, s.eps): s for s in suite.specs}
    assert set(by_key) == {("Linf", 0.1), ("Linf", 0.2), ("Linf", 0.3),
                           ("L2", 1.0), ("L2", 1.58), ("L2", 2.0)}
    for (norm, eps), spec in by_key.items():
        assert spec == H.make_cascade("standard", eps, norm)
    assert [m.name for m in by_key[("L2", 1.0)].members] == [a for a, _, _ in VERSIONS["standard"]]
    only_l2 = H.load_suite(ROOT / "attacks" / "standard.toml", norm="L2")
    assert {s.norm for s in only_l2.specs} == {"L2"}


def test_cascade_suite_and_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ncascade = true\n[eps]\nLinf = [0.1]\n'
                    '[[attack]]\nname = "fgsm"\n[[attack]]\nname = "pgd"\nsteps = 5\n')
    (spec,) = H.load_suite(path).specs
    assert isinstance(spec, H.Cascade) and [m.label for m in spec.members] == ["mine:fgsm", "mine:pgd"]
    with pytest.raises(RobustclipError, match="takes no parameter 'stepz'"):
        H.make_cascade("standard", 0.1, stepz=3)
    with pytest.raises(RobustclipError, match="Linf-only; for L2 use pgdl2"):
        H.specs_for(["pgd"], [0.5], "L2")
    assert H.specs_for(["standard"], [0.5], "L2")[0].members[0].norm == "L2"


# ------------------------------------------------------------------------ CW


def test_cw_moves_pixels_at_zero_and_one(models):
    """torchattacks' CW cannot move a pixel at exactly 0 or 1 (atanh(+-1) = +-inf): on
    blank images (all 0, all 1) it fools nothing; the search CW starts 1e-6 inside the box
    (as C&W's own code) and fools them, given the Adam steps an edge pixel needs to move
    (w starts at atanh(1 - 1e-6) = 7.25 and moves about lr = 0.01 per step)."""
    model = models["a"]
    x = torch.cat([torch.zeros(4, *SHAPE), torch.ones(4, *SHAPE)])
    y = model(x).argmax(1).detach()
    raw = torchattacks.CW(H.attacks.PositiveLogits(model), c=10.0, steps=200)(x, y)
    assert torch.equal(raw, x)
    ours = H.craft(model, H.make_spec("cw", 1.0, steps=1000, search_steps=2, c=10.0), x, y, 0)
    assert not bool(_acc(model, ours, y).any())


def test_cw_search_beats_fixed_c_and_fixed_c_is_labelled(models, data):
    x, y = data
    fixed = H.make_spec("cw", 1.0, c=1e-3, steps=50, search_steps=1)
    search = H.make_spec("cw", 1.0, c=1e-3, steps=50, search_steps=5)
    assert fixed.label == "cw (fixed c)" and search.label == "cw"
    ev = H.evaluate({"a": models["a"]}, x, y, [fixed, search], bounds=False)
    rows = _rows(ev, "a")
    assert rows["cw"].robust.double().mean() < rows["cw (fixed c)"].robust.double().mean() - 0.2


# ------------------------------------------------------------------------ strength


def _foolbox_acc(model, attack, x, y, eps, norm) -> float:
    """Robust accuracy that foolbox's ``attack`` leaves (its clipped examples, checked)."""
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    _, adv, success = attack(fmodel, x, y, epsilons=eps)
    delta = (adv - x).flatten(1)
    assert float(delta.abs().amax(1).max() if norm == "Linf" else delta.norm(dim=1).max()) <= eps * 1.001
    return float((_acc(model, x, y) & ~success).double().mean())


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps", [("Linf", 0.04), ("L2", 0.3)])
def test_standard_is_at_least_as_strong_as_pgd50_and_foolbox(models, data, norm, eps):
    x, y = data
    model = models["b"]
    standard = H.make_cascade("standard", eps, norm, n_queries=1000)
    pgd = H.make_spec("pgd" if norm == "Linf" else "pgdl2", eps, steps=50)
    ev = H.evaluate({"b": model}, x, y, [standard, pgd], bounds=False)
    rows = _rows(ev, "b")
    ours = float(rows["standard"].robust.double().mean())
    assert ours <= float(rows[pgd.label].robust.double().mean())
    if norm == "Linf":
        refs = [foolbox.attacks.LinfPGD(steps=50)]
    else:
        refs = [foolbox.attacks.L2FMNAttack(steps=200), foolbox.attacks.L2PGD(steps=100)]
    for attack in refs:
        assert ours <= _foolbox_acc(model, attack, x, y, eps, norm) + 0.005, type(attack).__name__
    assert 0 < ours < float(rows["standard"].clean.double().mean())  # a real test: some fall


class Linear(nn.Module):
    """f(x) = W x + b on 1x10x10 inputs, 10 classes: the exact L2 radius of x is
    min over j != y of (f_y - f_j) / ||w_y - w_j|| when the closest boundary point lies in
    the box [0, 1] (:func:`_interior`: pixels in [0.3, 0.7], radii below 0.25)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(100, 10)
        self.robustclip_meta = {"method": {"name": "none"}, "dataset": "mnist"}

    def forward(self, x):
        return self.fc(x.flatten(1))

    @torch.no_grad()
    def radius(self, x, y) -> torch.Tensor:
        z, w = self(x), self.fc.weight
        margin = z.gather(1, y[:, None]) - z
        dist = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
        r = margin / dist.clamp_min(1e-12)
        r[torch.arange(len(y)), y] = math.inf
        return r.min(1).values  # negative where misclassified


def _interior(x: torch.Tensor) -> torch.Tensor:
    """Pixels moved into [0.3, 0.7]: a step of L2 norm <= 0.3 stays inside [0, 1]."""
    return 0.3 + 0.4 * x


@pytest.mark.slow
def test_certificates_hold_and_the_standard_l2_attack_reaches_the_exact_radius(data):
    x = _interior(data[0])
    model = Linear().eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correct: the radius is its distance to the boundary
    radius = model.radius(x, y)
    assert float(radius.max()) * 1.05 < 0.3
    eps_list = [0.5 * float(radius.min())] + [float(radius.quantile(q)) for q in (0.5, 0.8)]
    specs = [H.make_cascade("standard", e, "L2", n_queries=500) for e in eps_list]
    ev = H.evaluate({"lin": model}, x, y, specs)
    for r in ev.results:
        if r.name != "cascade":
            continue
        inside, outside = radius > r.eps, radius * 1.05 < r.eps
        assert bool(r.robust[inside].all()), "an attack broke a point inside its exact radius"
        assert not bool(r.robust[outside].any()), "the standard attack missed a point outside"
        assert r.bound_kind == "upper"
        assert bool((radius[r.certified] >= r.eps).all())  # the certificate is sound
        assert bool((r.certified <= r.robust).all())
        if r.eps == min(eps_list):
            assert r.certified.double().mean() > 0.5


@pytest.mark.parametrize("name", ["apgd", "square"])
def test_apgd_and_square_each_break_a_weak_model(data, name):
    """At twice the largest exact radius every point of a linear model must fall."""
    x = _interior(data[0])
    model = Linear(1).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 2 * float(model.radius(x, y).max())
    spec = H.make_spec(name, eps, norm="L2", **({"n_queries": 2000} if name == "square" else {}))
    ev = H.evaluate({"lin": model}, x[:50], y[:50], [spec], bounds=False)
    assert float(ev.results[0].robust.double().mean()) == 0.0


# ------------------------------------------------------------------------ warnings


class _Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return F.softmax(self.inner(x), 1)


class _Round(nn.Module):
    """Rounds the input to 1/4: the gradient is zero everywhere (masked)."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class _Periodic(nn.Module):
    """Two classes from the mean pixel s: logit 0 = cos(8 pi s), logit 1 = 0.  FGSM moves
    s by exactly eps: robust at eps = 0.25 (a whole period), not at 0.125."""

    def forward(self, x):
        s = x.flatten(1).mean(1)
        return torch.stack([torch.cos(8 * math.pi * s), torch.zeros_like(s)], 1)


class _NaNRows(nn.Module):
    """NaN logits for the first half of the batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        z = self.inner(x).clone()
        z[: len(x) // 2] = math.nan
        return z


class _Trains(nn.Module):
    """Switches itself to training mode in every forward (as a buggy layer might)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.inner.training = True
        return self.inner(x)


class _Broken:
    """An 'attack' that breaks every rule: a pixel out of [0, 1] and beyond eps, and a NaN."""

    def __init__(self, model, spec, seed, n_classes):
        pass

    def __call__(self, x, y):
        adv = x.clone()
        adv[:, 0, 0, 0] = 1.6
        adv[:2, 0, 1, 1] = math.nan
        return adv


def _messages(ev) -> str:
    return "\n".join(str(w) for w in ev.warnings)


def test_a_clean_model_raises_no_warning(models, data):
    x, y = data
    ev = H.evaluate({"a": models["a"]}, x, y, [H.make_cascade("standard", 0.05, **CHEAP)])
    assert ev.warnings == []


def test_start_point_warnings_fire(models, data):
    x, y = data
    a = models["a"]
    one = lambda m: _messages(H.evaluate({"m": m}, x[:20], y[:20], [H.make_spec("fgsm", 0.1)],  # noqa: E731
                                         bounds=False))
    assert "look like probabilities" in one(_Softmax(a))
    assert "exactly zero loss gradient" in one(nn.Sequential(_Round(), a))
    few = nn.Sequential(nn.Flatten(), nn.Linear(100, 3))
    three = H.evaluate({"m": few}, x[:20], y[:20] % 3, [H.make_spec("fgsm", 0.1)], bounds=False)
    assert "3 classes" in _messages(three)
    nan = H.evaluate({"m": _NaNRows(a)}, x[:20], y[:20], [H.make_spec("fgsm", 0.1)], bounds=False)
    assert "NaN or infinite logits on clean inputs" in _messages(nan)
    assert not bool(nan.results[0].clean[:10].any())  # NaN is wrong, never class 0
    bad = x[:20].clone()
    bad[0, 0, 0, 0] = math.nan
    assert "outside [0, 1] or are NaN" in _messages(H.evaluate({"a": a}, bad, y[:20],
                                                               [H.make_spec("fgsm", 0.1)], bounds=False))


def test_square_stronger_than_white_box_fires(models, data):
    x, y = data
    masked = nn.Sequential(_Round(), models["a"])
    cascade = H.cascade_of([H.make_spec("apgd", 0.3, "c:apgd", steps=10),
                            H.make_spec("square", 0.3, "c:square", n_queries=300)], "c")
    ev = H.evaluate({"m": masked}, x[:50], y[:50], [cascade], bounds=False)
    assert _rows(ev, "m")["c:square"].broken > 0
    assert "Square broke" in _messages(ev)
    alone = H.evaluate({"m": masked}, x[:50], y[:50],
                       [H.make_spec("apgd", 0.3, steps=10), H.make_spec("square", 0.3, n_queries=300)],
                       bounds=False)
    assert "below the best white-box" in _messages(alone)


def test_cascade_missed_fires(models, data):
    """A one-step cascade against a 20-step PGD at the same eps: the points PGD alone broke
    are counted, per sample, in the warning."""
    x, y = data
    weak = H.cascade_of([H.make_spec("apgd", 0.05, "w:apgd", steps=1)], "w")
    ev = H.evaluate({"a": models["a"]}, x, y, [weak, H.make_spec("pgd", 0.05, steps=20)], bounds=False)
    rows = _rows(ev, "a")
    missed = int((rows["w"].robust & ~rows["pgd"].robust).sum())
    assert missed > 0
    assert f"{missed} of 100 points survived the w cascade but fell to pgd" in _messages(ev)
    strong = H.evaluate({"a": models["a"]}, x, y, [H.make_cascade("quick", 0.05, steps=20),
                                                   H.make_spec("fgsm", 0.05)], bounds=False)
    assert "survived the quick cascade" not in _messages(strong)


def test_rising_with_eps_fires():
    x = torch.full((20, 1, 4, 4), 0.5)
    y = torch.zeros(20, dtype=torch.long)
    ev = H.evaluate({"p": _Periodic()}, x, y, [H.make_spec("fgsm", e) for e in (0.125, 0.25)],
                    bounds=False)
    assert "robust accuracy rises with eps" in _messages(ev)


def test_attack_output_checks_fire(models, data, monkeypatch):
    x, y = data
    monkeypatch.setitem(ATTACKS, "broken", AttackDef("Linf", {}, _Broken))
    ev = H.evaluate({"a": models["a"]}, x[:20], y[:20], [H.make_spec("broken", 0.01)], bounds=False)
    assert torch.equal(ev.results[0].robust, ev.results[0].clean)  # no broken example counts
    text = _messages(ev)
    for message in ("leave the pixel range", "farther than eps", "NaN in the adversarial example"):
        assert message in text


def test_a_cascade_counts_no_broken_example_and_says_so(models, data, monkeypatch):
    x, y = data
    monkeypatch.setitem(ATTACKS, "broken", AttackDef("Linf", {}, _Broken))
    cascade = H.cascade_of([H.make_spec("broken", 0.01, "c:broken")], "c")
    ev = H.evaluate({"a": models["a"]}, x[:20], y[:20], [cascade], bounds=False)
    assert torch.equal(ev.results[-1].robust, ev.results[-1].clean)  # nothing counted
    assert "left the eps ball" in _messages(ev)


def test_revived_mode_and_no_bound_warnings_fire(models, data, monkeypatch):
    x, y = data
    monkeypatch.setitem(ATTACKS, "broken", AttackDef("Linf", {}, _Broken))

    class Pixel(nn.Module):  # class 0 iff pixel (0, 0) > 0.5: the 'attack' revives the rest
        def forward(self, z):
            p = z[:, 0, 0, 0].nan_to_num(0)
            return torch.stack([p, 0.5 * torch.ones_like(p)], 1) * 10

    ev = H.evaluate({"p": Pixel()}, x[:20], torch.zeros(20, dtype=torch.long),
                    [H.make_spec("broken", 0.01)], bounds=False)
    assert "made" in _messages(ev) and "misclassified samples correct" in _messages(ev)
    ev = H.evaluate({"t": _Trains(models["a"])}, x[:20], y[:20], [H.make_spec("fgsm", 0.1)])
    assert "training mode" in _messages(ev)

    class Square(nn.Module):  # x * x: not bounded by the graph walk
        def __init__(self):
            super().__init__()
            self.inner = models["a"]

        def forward(self, z):
            return self.inner(z * z)
    ev = H.evaluate({"s": Square()}, x[:20], y[:20], [H.make_spec("fgsm", 0.1)])
    assert "no Lipschitz bound, so no certificate" in _messages(ev)
    assert ev.results[0].bound_kind == "none" and ev.results[0].certified is None


def test_an_estimated_bound_certifies_nothing(models, data, monkeypatch):
    import robustclip.evaluation.ensemble as ensemble

    x, y = data
    monkeypatch.setattr(ensemble, "lipschitz_report", lambda m, s, **k: _estimate(m, s))
    ev = H.evaluate({"a": models["a"]}, x, y, [H.make_spec("pgd", 0.0)])
    assert ev.results[0].bound_kind == "estimate" and ev.results[0].certified is None


def _estimate(model, shape):
    from robustclip.bounds import lipschitz_report

    bound, rows = lipschitz_report(model, shape)
    rows.attrs["bound_kind"] = "estimate"
    return bound, rows



@pytest.mark.parametrize("call, message", [
    (lambda: H.make_cascade("strong", 0.1), "unknown cascade 'strong'; valid: standard, quick"),
    (lambda: H.cascade_of([], "c"), "cascade 'c' has no attacks"),
    (lambda: H.cascade_of([H.make_spec("pgd", 0.1), H.make_spec("pgd", 0.2)], "c"),
     "cascade 'c' mixes norms or eps"),
    (lambda: H.cascade_of([H.make_spec("cw", 1.0)], "c"), "cw is not bounded by eps"),
    (lambda: H.specs_for(["fgsm"], [0.1], n_queries=5), "no attack among fgsm takes 'n_queries'"),
    (lambda: H.specs_for(["nope"], [0.1]), "unknown attack 'nope'; valid attacks: standard, quick"),
])
def test_cascade_and_attack_list_errors_are_one_line(call, message):
    with pytest.raises(RobustclipError, match=message.replace("(", r"\(")):
        call()


def test_a_cascade_suite_cannot_hold_a_cascade(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('cascade = true\n[eps]\nLinf = [0.1]\n[[attack]]\nname = "standard"\n')
    with pytest.raises(RobustclipError, match="cannot hold the cascade 'standard'"):
        H.load_suite(path)


@pytest.mark.parametrize("args, message", [
    (["--eps", "8/0"], "is not a number or a fraction like 8/255"),
    (["--eps", "0.1", "--suite", str(ROOT / "attacks" / "standard.toml"), "--steps", "5"],
     "--steps does not apply to a --suite"),
    (["--suite", str(ROOT / "attacks" / "mnist.toml"), "--norm", "L2", "--attack", "pgd"],
     "attacks/mnist.toml has no L2 attacks among pgd"),
    (["--suite", str(ROOT / "attacks" / "mnist.toml"), "--attack", "pgdd"],
     "attack 'pgdd' is not in suite"),
])
def test_cli_attack_list_errors(tmp_path, args, message):
    from click.testing import CliRunner

    from robustclip.cli import main

    result = CliRunner().invoke(main, ["attack", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output + result.stderr
