"""Adversarial training: crafting (against torchattacks), the wrappers' state while
crafting, the config's checks, the gain in PGD accuracy and the catastrophic-overfitting
monitor.  Tiny synthetic tasks on the CPU."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchattacks
from click.testing import CliRunner

from robustclip.adversarial import OverfittingMonitor, craft, passive, uniform_noise
from robustclip.checkpoint import load, read_checkpoint
from robustclip.cli import main
from robustclip.config import Config, override, to_toml
from robustclip.data import synthetic_splits
from robustclip.distributed import Context
from robustclip.errors import RobustclipError
from robustclip.models import build_model, wrappers
from robustclip.train import _monitor, train

TINY = [
    "data.synthetic=true", "train.limit_train=256", "train.limit_test=128", "train.batch_size=32",
    "model.args.channels=4", "method.init_delay=1", "method.clip_steps=4", "method.init_iters=10",
    "method.max_rounds=1", "method.refine_iters=3", "method.descent_steps=2", "log.progress=false",
    "log.tensorboard=false", "train.device=cpu", "train.lr=0.01",
]
FGSM = ["train.adversarial.attack=fgsm-rs", "train.adversarial.eps=0.1"]


def tiny(method: str, *extra: str) -> Config:
    model = "simpleconv-composite" if method == "fastclip-composite" else "simpleconv"
    return override(Config(), [*TINY, f"model.name={model}", f"method.name={method}", *extra])


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _pgd_accuracy(run: Path, eps: float) -> float:
    """torchattacks' PGD-10 (random start) on the run's synthetic test split."""
    model = load(run)
    x, y = synthetic_splits("mnist", 256, 128, 1)[1].tensors
    torch.manual_seed(0)
    x_adv = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)(x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------- crafting

@pytest.mark.parametrize("steps, reference", [
    (1, lambda m, eps: torchattacks.FFGSM(m, eps=eps, alpha=1.25 * eps)),
    (5, lambda m, eps: torchattacks.PGD(m, eps=eps, alpha=0.1, steps=5, random_start=True)),
])
def test_fgsm_rs_and_pgd_are_torchattacks_ffgsm_and_pgd(steps, reference):
    """From the same random start (eps a power of 2: eps * noise is exact), FGSM-RS is
    torchattacks' FFGSM (Wong et al.'s fast FGSM) and PGD is its PGD, to float rounding."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x, y, eps = torch.rand(50, 1, 8, 8), torch.randint(0, 5, (50,)), 0.25
    torch.manual_seed(0)  # the draws torchattacks makes for its start
    start = torch.randn_like(x).uniform_(-eps, eps) if steps == 1 else torch.empty_like(x).uniform_(-eps, eps)
    ours = craft(model, x, y, start / eps, eps=eps, step_size=1.25 * eps if steps == 1 else 0.1,
                 steps=steps)
    torch.manual_seed(0)
    theirs = reference(model, eps)(x, y)
    assert (ours - theirs).abs().max() < 1e-6
    assert (ours - x).abs().max() <= eps + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    assert (ours - x).abs().max() > eps / 2  # it moved


def test_n_fgsm_is_torchattacks_fgsm_from_its_noisy_start():
    """N-FGSM: from the start x + 2 eps noise (clipped to [0, 1]), one signed step of eps
    with no projection onto the eps ball is torchattacks' FGSM of eps at that start; the
    perturbation reaches beyond eps (up to 3 eps) and stays in [0, 1]."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x, y, eps = torch.rand(50, 1, 8, 8), torch.randint(0, 5, (50,)), 0.25
    noise = torch.rand_like(x) * 2 - 1
    ours = craft(model, x, y, noise, eps=eps, step_size=eps, steps=1, noise_scale=2.0, project=False)
    start = (x + 2 * eps * noise).clamp(0, 1)
    theirs = torchattacks.FGSM(model, eps=eps)(start, y)
    assert (ours - theirs).abs().max() < 1e-6
    assert ours.min() >= 0 and ours.max() <= 1
    assert eps * 1.5 < (ours - x).abs().max() <= 3 * eps + 1e-6


def test_fgsm_rs_from_the_raw_start_takes_its_gradient_outside_the_image_range():
    """clip_start=False (Wong et al.'s MNIST code): the gradient is taken at x + eps noise
    unclipped, pixels below 0 included, and only the step's result is projected onto the
    ball and [0, 1]; on an image that is mostly 0 this differs from the clipped start."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(50, 1, 8, 8) * (torch.rand(50, 1, 8, 8) < 0.3)  # 70% of the pixels at 0
    y, eps, noise = torch.randint(0, 5, (50,)), 0.25, torch.rand(50, 1, 8, 8) * 2 - 1
    ours = craft(model, x, y, noise, eps=eps, step_size=1.25 * eps, steps=1, clip_start=False)
    start = (x + eps * noise).requires_grad_(True)
    assert start.min() < -0.2
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(start), y, reduction="sum"), start)
    expected = torch.min(torch.max(start.detach() + 1.25 * eps * grad.sign(), (x - eps).clamp(min=0)),
                         (x + eps).clamp(max=1))
    assert (ours - expected).abs().max() < 1e-6
    clipped = craft(model, x, y, noise, eps=eps, step_size=1.25 * eps, steps=1)
    assert (ours != clipped).float().mean() > 0.2


def test_clip_start_reaches_training(tmp_path):
    """train.adversarial.clip_start changes what training crafts: on the synthetic task
    (images with pixels at 0) the two runs' first-epoch losses differ."""
    losses = [rows(train(tiny("none", "train.epochs=1", "train.limit_train=64", *FGSM,
                              "train.adversarial.monitor_samples=0",
                              f"train.adversarial.clip_start={flag}"), tmp_path / flag))[0]["train_loss"]
              for flag in ("true", "false")]
    assert losses[0] != losses[1]


def test_noise_of_a_share_is_that_of_the_whole_batch():
    draw = lambda share, n: uniform_noise((n, 1, 4, 4), torch.Generator().manual_seed(3), share, 10)  # noqa: E731
    whole = draw(slice(None), 10)
    assert torch.equal(draw(slice(5, 10), 5), whole[5:]) and whole.abs().max() <= 1
    assert whole.min() < -0.9 and whole.max() > 0.9


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("method", ["none", "fastclip", "fastclip-composite", "miyato", "gouk"])
def test_crafting_leaves_every_wrapper_and_batchnorm_unchanged(method, bn_mode):
    """Crafting (PGD, 3 steps) under ``passive`` changes no buffer (wrapper vectors, sigmas,
    step counters, running statistics, Miyato's u and v) and no weight, and restores the
    modes; a training forward, as a control, does change them."""
    torch.manual_seed(0)
    model = build_model("simpleconv-composite" if method == "fastclip-composite" else "simpleconv",
                        "mnist", method, {"init_delay": 0, "clip_steps": 1, "init_iters": 5}, channels=4)
    x, y = synthetic_splits("mnist", 8, 8, 0)[0].tensors
    model.train()(x)  # wrappers initialised, one step taken
    before = copy.deepcopy(model.state_dict())
    counts = [w._count for w in wrappers(model)]
    with passive(model, bn_mode):
        craft(model, x, y, uniform_noise(tuple(x.shape), torch.Generator().manual_seed(0)),
              eps=0.1, step_size=0.05, steps=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [w._count for w in wrappers(model)] == counts
    assert all(m.training for m in model.modules())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(x)  # the control: a training forward steps the wrappers
    assert [w._count for w in wrappers(model)] == [c + 1 for c in counts]
    assert not all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_bn_mode_train_uses_batch_statistics_without_updating_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 36, 4))
    model[1].running_mean.fill_(5.0)
    x = torch.rand(6, 1, 8, 8)
    reference = copy.deepcopy(model).train()(x)  # batch statistics (and an update)
    with torch.no_grad(), passive(model, "train"):
        batch = model(x)
    with torch.no_grad(), passive(model, "eval"):
        running = model(x)
    assert torch.equal(batch, reference) and not torch.allclose(running, reference)
    assert float(model[1].running_mean[0]) == 5.0 and int(model[1].num_batches_tracked) == 0


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("assignment, message", [
    ("train.adversarial.attak=pgd", r"unknown key 'train.adversarial.attak'.*did you mean 'attack'"),
    ("train.adversarial.attack=pgdd", r"unknown value 'pgdd' for train.adversarial.attack.*did you mean 'pgd'"),
    ("train.adversarial.attack=nfgsm", r"unknown value 'nfgsm' for train.adversarial.attack.*'n-fgsm'"),
    ("train.optimizer=adamw", r"unknown value 'adamw' for train.optimizer.*did you mean 'adam'"),
    ("train.schedule=cosine", r"unknown value 'cosine' for train.schedule.*valid: step, cyclic"),
    ("train.margin_bound=exact", r"unknown value 'exact' for train.margin_bound.*valid: auto, sound"),
    ("train.margin_temperature=0", r"train.margin_temperature must be > 0"),
    ("train.adversarial.loss=trade", r"unknown value 'trade' for train.adversarial.loss.*'trades'"),
    ("train.adversarial.bn_mode=training", r"unknown value 'training' for train.adversarial.bn_mode"),
    ("train.adversarial.monitor_attack=apgd", r"unknown value 'apgd' for train.adversarial.monitor_attack.*valid: apgd-ce, pgd"),
    ("train.adversarial.eps=1.5", r"train.adversarial.eps must be in \(0, 1\]"),
    ("train.adversarial.eps=0", r"train.adversarial.eps must be in \(0, 1\]"),
    ("train.adversarial.eps=-0.1", r"train.adversarial.eps must be >= 0"),
    ("train.adversarial.beta=-1", r"train.adversarial.beta must be >= 0"),
    ("train.adversarial.steps=0", r"steps and monitor_steps must be >= 1"),
    ("train.adversarial=3", r"\[train.adversarial\].* must be a table"),
    ("train.loss=margin", r"unknown value 'margin' for train.loss.*valid: cross-entropy, lipschitz-margin"),
    ("train.loss=lipschitz-margin", r"needs train.eps_cert > 0"),
    ("train.advers.eps=1", r"unknown key 'train.advers' in --set"),
])
def test_config_errors_are_one_line(assignment, message):
    base = ["train.adversarial.attack=fgsm-rs", "train.adversarial.eps=0.3"]
    if assignment.startswith("train.loss") or assignment.startswith("train.advers."):
        base = []
    with pytest.raises(RobustclipError, match=message) as err:
        override(Config(), [*base, assignment])
    assert "\n" not in str(err.value)


def test_adversarial_and_margin_losses_do_not_combine(tmp_path):
    text = to_toml(tiny("none", *FGSM)).replace('loss = "cross-entropy"', 'loss = "lipschitz-margin"').replace(
        "eps_cert = 0.0", "eps_cert = 1.0")
    (tmp_path / "c.toml").write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "c.toml"),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "does not combine with train.loss = 'lipschitz-margin'" in result.output


# ---------------------------------------------------------------------------- training

@pytest.mark.parametrize("method, attack, extra", [
    ("none", "fgsm-rs", ()), ("fastclip-composite", "fgsm-rs", ()), ("none", "n-fgsm", ()),
    ("none", "fgsm-rs", ("train.adversarial.clip_start=false",))])
def test_adversarial_training_raises_pgd_accuracy(tmp_path, method, attack, extra):
    """FGSM-RS (N-FGSM; FGSM-RS from the raw start) training at eps 0.1 against the same
    run without it: torchattacks' PGD-10 at eps 0.1 breaks the normally trained model
    (measured: ~0.02-0.09 robust accuracy) and not the adversarially trained one (~0.55)."""
    plain = train(tiny(method, "train.epochs=6"), tmp_path / "plain")
    robust = train(tiny(method, "train.epochs=6", *FGSM, f"train.adversarial.attack={attack}",
                        "train.adversarial.monitor_samples=0", *extra), tmp_path / "robust")
    assert "pgd_acc" not in rows(robust)[0] and float(rows(robust)[-1]["adv_eps"]) == 0.1
    assert _pgd_accuracy(robust, 0.1) > _pgd_accuracy(plain, 0.1) + 0.3


def test_eps_warms_up_linearly_and_pgd_accuracy_is_recorded(tmp_path):
    run = train(tiny("fastclip", "train.epochs=3", "train.limit_train=64", *FGSM,
                     "train.adversarial.warmup_epochs=2", "train.adversarial.monitor_samples=32",
                     "train.adversarial.attack=pgd", "train.adversarial.steps=2",
                     "train.adversarial.loss=trades", "train.adversarial.bn_mode=eval"),
                tmp_path / "run")
    table = rows(run)  # 2 steps per epoch, a ramp over 4 steps
    assert [float(r["adv_eps"]) for r in table] == pytest.approx([0.05, 0.1, 0.1])
    assert all(0 <= float(r["apgd_acc"]) <= 1 and r["catastrophic_overfitting"] == "0" for r in table)
    assert "pgd_acc" not in table[0]


@pytest.mark.parametrize("attack, key, label", [("apgd-ce", "apgd_acc", "APGD-CE-10"),
                                               ("pgd", "pgd_acc", "PGD-10")])
def test_catastrophic_overfitting_is_flagged(tmp_path, caplog, attack, key, label):
    """A purpose-built collapse: two epochs of FGSM-RS training, then an lr 100 times
    larger (StepLR) wrecks the model; the monitor attack's accuracy falls (measured: PGD-10
    0.47 -> 0.06)."""
    config = tiny("none", "train.epochs=3", "train.step_size=2", "train.gamma=100", *FGSM,
                  "train.adversarial.monitor_samples=64", f"train.adversarial.monitor_attack={attack}")
    with caplog.at_level("WARNING", logger="robustclip.adversarial"):
        run = train(config, tmp_path / "run")
    table = rows(run)
    assert [r["catastrophic_overfitting"] for r in table] == ["0", "0", "1"]
    assert float(table[1][key]) > float(table[2][key]) + 0.2
    assert f"epoch 2: {label} accuracy at eps 0.1 on 64 held-out test samples fell" in caplog.text
    assert "catastrophic overfitting" in caplog.text


def test_early_stop_ends_the_run_at_catastrophic_overfitting_keeping_the_epoch_before(tmp_path, caplog):
    """The collapse above with train.adversarial.early_stop: epoch 2 is flagged, not
    saved, and the run ends with epoch 1's model; during the warm-up nothing stops it."""
    config = tiny("none", "train.epochs=3", "train.step_size=2", "train.gamma=100", *FGSM,
                  "train.adversarial.monitor_samples=64", "train.adversarial.early_stop=true")
    with caplog.at_level("WARNING", logger="robustclip.train"):
        run = train(config, tmp_path / "run")
    assert [r["epoch"] for r in rows(run)] == ["0", "1"]
    assert read_checkpoint(run)["epoch"] == 1
    assert "epoch 2: catastrophic overfitting at the full eps" in caplog.text
    assert "the run ends with epoch 1's model in last.pt" in caplog.text
    warm = train(override(config, ["train.adversarial.warmup_epochs=4"]), tmp_path / "warm")
    assert len(rows(warm)) == 3  # eps never reached its full value: no stop


def test_early_stop_waits_for_a_clean_epoch_at_the_full_eps(tmp_path, caplog, monkeypatch):
    """Flags from the first epoch at the full eps on (here the monitor flags every epoch)
    never stop a run that has had no clean epoch at the full eps: it trains to the end
    and says that the stop waits."""
    monkeypatch.setattr(OverfittingMonitor, "check", lambda self, epoch, measured, best: True)
    config = tiny("none", "train.epochs=3", *FGSM, "train.adversarial.monitor_samples=16",
                  "train.adversarial.early_stop=true")
    with caplog.at_level("INFO", logger="robustclip.train"):
        run = train(config, tmp_path / "run")
    assert [r["catastrophic_overfitting"] for r in rows(run)] == ["1", "1", "1"]
    assert read_checkpoint(run)["epoch"] == 2
    assert caplog.text.count("no earlier epoch at the full eps was clean") == 3
    assert "training stops" not in caplog.text


def test_monitor_attacks_the_last_test_samples(tmp_path):
    """The monitor's held-out samples are the test split's last ones, clear of the first N
    an evaluation with --limit N takes."""
    config = tiny("none", *FGSM, "train.adversarial.monitor_samples=16")
    test = synthetic_splits("mnist", 256, 128, 1)[1]
    monitor = _monitor(config, test, Context())
    assert torch.equal(monitor.x, test.tensors[0][-16:]) and torch.equal(monitor.y, test.tensors[1][-16:])


def _acc(pgd: float, fgsm: float | None = None) -> dict[str, float]:
    return {"pgd_acc": pgd, "fgsm_acc": pgd if fgsm is None else fgsm}


def _pgd_monitor(eps: float) -> OverfittingMonitor:
    return OverfittingMonitor(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), eps, 10, 0.2, 0,
                              Context(), attack="pgd")


def test_overfitting_rule_is_a_drop_of_more_than_the_threshold(caplog):
    monitor = _pgd_monitor(0.1)
    with caplog.at_level("WARNING", logger="robustclip.adversarial"):
        assert not monitor.check(0, _acc(0.0), None)  # no previous epoch
        assert not monitor.check(1, _acc(0.3), (0, 0.5))  # a drop of exactly 0.2
        assert not monitor.check(1, _acc(0.9), (0, 0.5))
        assert caplog.text == ""
        assert monitor.check(3, _acc(0.29), (1, 0.5)) and "epoch 3" in caplog.text
    assert "fell from 0.500 (epoch 1) to 0.290" in caplog.text and "the model of epoch 1" in caplog.text


def test_a_slow_slide_is_flagged_against_the_most_robust_epoch():
    """The drop rule compares with the best earlier epoch: the wide smallcnn's 20-epoch run
    (results/smallcnn-wide-fgsm-rawstart-e20) lost 23 points of PGD-10 accuracy over ten
    epochs, never 0.2 from one epoch to the next, and kept 14.5% at Linf 0.3 under the
    standard evaluation.  Its recorded accuracies, replayed through the training loop's
    rules, flag epochs 15 and 19 (0.637, against 0.867 at epoch 9) by the drop rule, and
    epoch 0 by the gap rule, as the run itself did."""
    from robustclip.train import _robustness

    metrics = Path(__file__).resolve().parent.parent / \
        "results/smallcnn-wide-fgsm-rawstart-e20/training/wide-none-fgsm-rawstart-e20-s1.metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    pgd = [float(r["pgd_acc"]) for r in rows]
    assert min(b - a for a, b in zip(pgd, pgd[1:])) >= -0.2  # the previous-epoch rule never fires
    assert [int(r["epoch"]) for r in rows if r["catastrophic_overfitting"] == "1"] == [0]
    monitor = _pgd_monitor(0.3)

    class Replay:  # the objective's part the rule reads
        adversarial = True

        def eps(self, step: int) -> float:
            return 0.3

    history: list[dict] = []
    for epoch, r in enumerate(rows):
        monitor.accuracy = lambda model, r=r: {k: float(r[k]) for k in ("fgsm_acc", "pgd_acc")}
        history.append({"epoch": epoch} | _robustness(monitor, Replay(), None, epoch, 1, history))
    assert [h["epoch"] for h in history if h["catastrophic_overfitting"]] == [0, 15, 19]


def test_overfitting_rule_is_a_gap_between_fgsm_and_pgd(caplog):
    """FGSM-RS accuracy more than ``gap`` (default 0.3) above PGD's on the same points is
    flagged from the first epoch, with no PGD accuracy to lose."""
    monitor = _pgd_monitor(0.3)
    with caplog.at_level("WARNING", logger="robustclip.adversarial"):
        assert not monitor.check(0, _acc(0.5, 0.8), None)  # a gap of exactly 0.3
        assert caplog.text == ""
        assert monitor.check(0, _acc(0.0, 0.91), None)
    assert "epoch 0" in caplog.text and "FGSM-RS leaves 0.910 accurate and PGD-10 0.000" in caplog.text
    assert "fell from" not in caplog.text


@pytest.mark.parametrize("attack, key", [("apgd-ce", "apgd_acc"), ("pgd", "pgd_acc")])
def test_monitor_measures_fgsm_at_least_as_accurate_as_the_monitor_attack(attack, key):
    """On a fixed model, FGSM-RS (one step) leaves at least as many points as the 10-step
    attack here, and a model made constant leaves its accuracy to both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    monitor = OverfittingMonitor(x, y, 0.1, 10, 0.2, 0, Context(), attack=attack)
    measured = monitor.accuracy(model)
    assert set(measured) == {"fgsm_acc", key}
    assert 0 <= measured[key] <= measured["fgsm_acc"] < 1
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    expected = float((y == 0).double().mean())
    assert monitor.accuracy(model) == {"fgsm_acc": expected, key: expected}


def test_apgd_monitor_is_torchattacks_apgd_and_leaves_the_callers_rng_alone():
    """The APGD-CE monitor counts what torchattacks' APGD (the seed's start, 10 steps)
    leaves on the held-out points, the same every epoch, and torch's global random stream
    continues as if the monitor had not run (APGD reseeds it: the monitor forks it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    monitor = OverfittingMonitor(x, y, 0.1, 10, 0.2, 7, Context())
    torch.manual_seed(1)
    measured = monitor.accuracy(model)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)
    with torch.random.fork_rng():
        adv = torchattacks.APGD(model, norm="Linf", eps=0.1, steps=10, n_restarts=1, seed=7, loss="ce")(x, y)
    assert measured["apgd_acc"] == float((model(adv).argmax(1) == y).double().mean())
    assert monitor.accuracy(model) == measured
