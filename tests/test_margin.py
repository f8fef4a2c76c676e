"""Lipschitz-margin training: the margin, the training bound L in its two modes, and the
certified accuracy it buys (certificates from robustclip's sound bound)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustclip.bounds import lipschitz_report
from robustclip.certificates import certified
from robustclip.checkpoint import load
from robustclip.config import Config, override
from robustclip.data import synthetic_splits
from robustclip.distributed import Context
from robustclip.errors import RobustclipError
from robustclip.margin import TrainingBound, margin_logits
from robustclip.models import build_model, wrappers
from robustclip.objectives import Objective
from robustclip.train import train

TINY = [
    "data.synthetic=true", "train.limit_train=256", "train.limit_test=128", "train.batch_size=32",
    "model.name=lipnet", "model.args.width=4", "model.args.hidden=32", "method.init_delay=1",
    "method.init_iters=10", "log.progress=false", "log.tensorboard=false", "train.device=cpu",
]


def test_margin_is_added_to_every_logit_but_the_true_one():
    logits, y = torch.zeros(2, 3), torch.tensor([2, 0])
    out = margin_logits(logits, y, 0.5, 2.0)
    m = math.sqrt(2) * 0.5 * 2.0
    assert torch.allclose(out, torch.tensor([[m, m, 0.0], [0.0, m, m]]))


def test_constant_mode_is_the_product_of_the_clip_targets():
    """lipnet has no BatchNorm and every layer is clipped: L = the product of the 7 clip
    targets (the normalisation only centres: factor 1)."""
    model = build_model("lipnet", "mnist", "gouk", {"clip": 1.5}, width=2, hidden=4)
    bound = TrainingBound(model, (1, 28, 28))
    assert bound.constant and bound() == pytest.approx(1.5**7, rel=1e-9)
    assert "constant" in bound.describe() and "not a guarantee" in bound.describe()


@pytest.mark.parametrize("rescale, warns", [(None, True), (True, False)])
def test_constant_mode_warns_when_layers_are_clipped_only_at_clip_events(rescale, warns):
    """fastclip holds a layer at its target at clip events only, unless it rescales every
    step too: the first warns (naming the layers), the second does not."""
    model = build_model("lipnet", "mnist", "fastclip", {"rescale_every_step": rescale}, width=2, hidden=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bound = TrainingBound(model, (1, 28, 28))
    messages = [str(w.message) for w in caught if "lipschitz-margin" in str(w.message)]
    assert bound.constant
    if warns:
        assert len(messages) == 1 and "7 clipped layer(s)" in messages[0] \
            and "features.0" in messages[0] and "method.rescale_every_step = true" in messages[0]
    else:
        assert messages == []


def test_rescale_every_step_holds_every_layer_at_its_target_after_each_step():
    """method.rescale_every_step = true: after every optimiser step of a margin-loss
    training at a large learning rate, every fastclip layer's tracked sigma is <= clip."""
    torch.manual_seed(0)
    config = override(Config(), [*TINY, "method.name=fastclip", "method.rescale_every_step=true",
                                 "method.clip_steps=1000", "method.init_delay=0"])
    model = build_model("lipnet", "mnist", "fastclip", config.method_args(), width=4, hidden=32)
    assert all(w.rescale_every_step for w in wrappers(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    bound = TrainingBound(model.train(), (1, 28, 28))
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(margin_logits(model(x), y, bound(), 1.0), y)
        loss.backward()
        opt.step()
        assert max(float(w.sigmas[0]) for w in wrappers(model)) <= 1.0 + 1e-5


def test_tracked_mode_is_a_differentiable_product_of_sigma_estimates():
    """none (tracking only) on simpleconv: L = ||A_conv v|| * max|gamma|/sqrt(var + eps)
    * ||A_fc v|| / std, each factor at most the layer's sigma, var the BatchNorm's batch
    variance in the last training forward, and gradients reach the weights; after many
    tracking steps the wrappers' vectors are converged and L is the product of the exact
    norms."""
    torch.manual_seed(0)
    model = build_model("simpleconv", "mnist", "none", {"iters_per_step": 50}, channels=2)
    x = torch.rand(4, 1, 28, 28)
    bound = TrainingBound(model, (1, 28, 28))
    for _ in range(4):
        model.train()(x)
    assert not bound.constant and "2 tracked sigma" in bound.describe() and "1 BatchNorm" in bound.describe()
    L = bound()
    L.backward()
    assert model.conv1.module.weight.grad.abs().sum() > 0 and model.bn1.weight.grad.abs().sum() > 0
    fc = float(torch.linalg.matrix_norm(model.fc1.module.weight.detach(), 2))  # exact
    conv_sigma = float(model.conv1.sigmas[0])  # converged Ritz value
    with torch.no_grad():
        var = model.conv1.module(model.normalize(x)).var(dim=(0, 2, 3), unbiased=False)
    bn = float((model.bn1.weight.detach().abs() / torch.sqrt(var + model.bn1.eps)).max())
    assert float(L.detach()) == pytest.approx(conv_sigma * bn * fc / 0.3081, rel=1e-4)
    with pytest.raises(RobustclipError, match="no batch statistics since the bound was last taken"):
        bound()  # the recorded statistics are gone with the step
    model.eval()
    running = float((model.bn1.weight.detach().abs() / torch.sqrt(model.bn1.running_var + model.bn1.eps)).max())
    assert float(bound().detach()) == pytest.approx(conv_sigma * running * fc / 0.3081, rel=1e-4)


@pytest.mark.parametrize("model_name, method", [("lipnet", "none"), ("lipnet", "fastclip"),
                                                ("lipnet-composite", "fastclip-composite")])
def test_sound_mode_is_the_network_bound_of_lipschitz_report(model_name, method):
    """margin_bound = "sound": L is the sound network bound the certificate uses, for
    tracked, clipped and composite layers alike (the report's own formulas once its
    exact Gram sigmas of small layers are off; with them, at most L), and its gradient
    reaches every layer."""
    torch.manual_seed(0)
    model = build_model(model_name, "mnist", method, width=2, hidden=8)
    model.train()(torch.rand(4, 1, 28, 28))
    bound = TrainingBound(model, (1, 28, 28), sound=True)
    assert not bound.constant and "guaranteed per-layer upper bounds" in bound.describe()
    model.eval()  # BatchNorm by its running statistics, as the report takes it
    L = bound()
    L.backward()
    L = float(L.detach())
    reference, rows = lipschitz_report(model.eval(), (1, 28, 28), exact_max_dim=0)
    assert rows.attrs["bound_kind"] == "upper"
    assert L == pytest.approx(reference, rel=1e-5)
    assert lipschitz_report(model, (1, 28, 28))[0] <= L * (1 + 1e-5)
    assert all(w.module.weight.grad is not None and w.module.weight.grad.abs().sum() > 0
               for w in wrappers(model) if hasattr(w.module, "weight"))


def _batch_statistics(model: nn.Module, x: torch.Tensor
                      ) -> tuple[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A training forward of x: (mean, biased var) per channel of each BatchNorm's input, and
    the output."""
    stats, handles = {}, []
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        handles.append(bn.register_forward_pre_hook(
            lambda bn, args: stats.__setitem__(bn, torch.var_mean(args[0].detach(), (0, 2, 3), correction=0)[::-1])))
    out = model.train()(x)
    for handle in handles:
        handle.remove()
    return stats, out


@pytest.mark.parametrize("method_args, sound", [({}, True), ({"clip": None}, False)],
                         ids=["sound", "tracked"])
def test_the_bound_takes_batchnorm_as_the_training_forward_applies_it(method_args, sound):
    """lipnet-composite (conv + BN wrappers, clipped or tracking only) in training mode:
    each conv + BN factor uses the batch's variance, so L is the bound of the same
    weights with every BatchNorm's running statistics set to its batch's (with which the
    eval forward repeats the training forward's output): the report's in sound mode, the
    eval-mode ||A v|| in tracked mode; and scaling a
    conv's weights, which the forward's normalisation undoes, leaves L unchanged
    (<grad, W> ~ 0); the running variance (a buffer) made L grow linearly in them
    (<grad, W> = L), which the margin answered by shrinking the weights for nothing
    (results/lipnet-composite-margin-stopped)."""
    torch.manual_seed(0)
    model = build_model("lipnet-composite", "mnist", "fastclip-composite", method_args, width=2, hidden=8)
    bound = TrainingBound(model, (1, 28, 28), sound=sound)
    x = torch.rand(8, 1, 28, 28)
    stats, trained = _batch_statistics(model, x)
    L = bound()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and len(stats) == 4
    grads = torch.autograd.grad(L, [c.weight for c in convs])
    assert all(abs(float((g * c.weight.detach()).sum())) < 1e-3 * float(L.detach()) for g, c in zip(grads, convs))
    with torch.no_grad():
        for bn, (mean, var) in stats.items():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    model.eval()
    torch.testing.assert_close(model(x), trained, rtol=1e-4, atol=1e-5)
    L_eval = bound()
    reference = lipschitz_report(model, (1, 28, 28), exact_max_dim=0)[0] if sound else float(L_eval.detach())
    assert float(L.detach()) == pytest.approx(reference, rel=1e-5)
    grads = torch.autograd.grad(L_eval, [c.weight for c in convs])
    assert all(float((g * c.weight.detach()).sum()) == pytest.approx(float(L_eval.detach()), rel=1e-4)
               for g, c in zip(grads, convs))


def test_a_trainable_layer_no_wrapper_tracks_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RobustclipError, match=r"cannot bound 1 during training: it has trainable weights"):
        TrainingBound(model, (1, 2, 2))


def _certified_accuracy(run, radius: float) -> float:
    model = load(run)
    x, y = synthetic_splits("mnist", 256, 128, 1)[1].tensors
    L, rows = lipschitz_report(model, (1, 28, 28))
    assert rows.attrs["bound_kind"] == "upper"
    with torch.no_grad():
        return float(certified(model(x), y, L, radius).float().mean())


@pytest.mark.parametrize("settings, margin", [
    (["method.name=gouk", "train.lr=0.02"], []),
    (["method.name=none", "train.optimizer=adam", "train.lr=0.01"], ["train.margin_bound=sound"]),
], ids=["gouk-constant", "none-sound"])
def test_lipschitz_margin_training_raises_certified_accuracy(tmp_path, settings, margin):
    """lipnet + gouk (every layer rescaled to sigma 1 each step: constant L = 1), and
    lipnet + none with the sound L (the certificate's own bound, differentiable; Adam),
    with and without the margin of eps_cert 1; certified accuracy at L2 radius 0.5 from
    the sound bound of the trained weights (measured: gouk 0.10 without the margin, 0.38
    with it; none-sound 0.00 without (bound 324), 0.38 with it (bound 0.62))."""
    config = override(Config(), [*TINY, *settings, "train.epochs=6"])
    plain = train(config, tmp_path / "plain")
    margin = train(override(config, ["train.loss=lipschitz-margin", "train.eps_cert=1.0", *margin]),
                   tmp_path / "margin")
    assert _certified_accuracy(margin, 0.5) > _certified_accuracy(plain, 0.5) + 0.15


def test_sound_mode_on_diverged_weights_is_one_clear_error():
    model = build_model("lipnet", "mnist", "none", width=2, hidden=8)
    model.train()(torch.rand(2, 1, 28, 28))
    bound = TrainingBound(model, (1, 28, 28), sound=True)
    with torch.no_grad():
        wrappers(model)[1].module.weight.fill_(float("nan"))
    with pytest.raises(RobustclipError, match=r"no sound bound of features.2: .*diverged\? lower train.lr"):
        bound()


def test_margin_temperature_multiplies_the_margin_logits():
    """train.margin_temperature T: the loss is CE(T * (logits + sqrt(2) L eps_cert on the
    wrong classes)); lipnet + gouk has L = 1."""
    config = override(Config(), [*TINY, "method.name=gouk", "train.loss=lipschitz-margin",
                                 "train.eps_cert=1.0", "train.margin_temperature=4"])
    torch.manual_seed(0)
    model = build_model("lipnet", "mnist", "gouk", config.method_args(), width=4, hidden=32)
    objective = Objective(config, model, model, Context(), (1, 28, 28), 1)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 10
    logits, losses = objective(x, y, slice(None), len(x), 0)
    expected = F.cross_entropy(4 * margin_logits(logits, y, 1.0, 1.0), y, reduction="none")
    assert objective.bound() == 1.0 and torch.allclose(losses, expected)
