"""The top-level API with models robustclip has never seen (issue #12): robustclip.evaluate,
clip_model and lipschitz on a user-defined class and on torchvision's resnet18."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import robustclip
from robustclip.errors import RobustclipError
from robustclip.evaluation import make_spec
from robustclip.evaluation import evaluate as low_level
from robustclip.report import results_table
from robustclip.spectral import dense_singular_values
from helpers import SHAPE


class UsersNet(nn.Module):
    """A model written by a user: its own normalisation, a conv, a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 10 * 10, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv((x - 0.2) / 0.3)).flatten(1))


def test_evaluate_is_the_cli_table_for_any_data_form(models, data):
    x, y = data
    model = models["a"]
    ref = results_table(low_level({"model": model}, x, y, [make_spec("fgsm", 0.1),
                                                          make_spec("pgd", 0.1, steps=5)]).results)
    ref = ref.drop(columns="seconds")
    for form in [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=7)]:
        table = robustclip.evaluate(model, form, eps=0.1, attacks=["fgsm", "pgd"], steps=5)
        assert isinstance(table.attrs["warnings"], list)
        pd.testing.assert_frame_equal(table.drop(columns="seconds").drop(
            columns="params"), ref.drop(columns="params"))
    frac = robustclip.evaluate({"m": model}, (x, y), eps="1/10", attacks="fgsm", limit=30)
    assert frac.eps.tolist() == [0.1] and frac.n.tolist() == [30]


def test_users_class_clipped_trained_bounded_evaluated(data):
    x, y = data

    def trained(method: str) -> nn.Module:
        torch.manual_seed(0)
        model = robustclip.clip_model(UsersNet(), method, clip=0.5, init_delay=5, clip_steps=5)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        model.train()
        for _ in range(21):  # the last clip event at step 20, one optimiser step after it
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model.eval()

    model, plain = trained("fastclip"), trained("none")
    with torch.no_grad():
        sigma, free = (float(dense_singular_values(m.conv.module if m is model else m.conv, SHAPE, k=1)[0])
                       for m in (model, plain))
    assert sigma < 0.55 and free > 2 * sigma, (sigma, free)  # clipped (a step after an event)
    bound = robustclip.lipschitz(model, SHAPE)
    assert bound.kind == "upper" and bound.bound > 0
    assert {"conv", "head"} <= set(bound.layers["name"])
    table = robustclip.evaluate(model, (x, y), eps=[0.005, 0.5], norm="L2", quick=True, steps=10)
    row = table[table.attack == "quick"]
    assert row.lipschitz_bound.tolist() == pytest.approx([bound.bound] * 2)
    assert (row.certified_acc <= row.robust_acc).all() and (row.robust_acc <= row.clean_acc).all()
    assert row.certified_acc.iloc[0] > 0


def test_torchvision_resnet18(tmp_path):
    torch.manual_seed(0)
    model = robustclip.clip_model(torchvision.models.resnet18(num_classes=10), "fastclip")
    assert sum(isinstance(m, robustclip.SpectralClip) for m in model.modules()) == 21  # 20 convs + fc
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6)
    model.train()
    model(x).sum().backward()  # tracking runs in training mode
    table = robustclip.evaluate(model.eval(), (x, y), eps="8/255", attacks="apgd", steps=2,
                                bounds=False, out=tmp_path / "out")
    assert table.n.tolist() == [6] and table.bound_kind.tolist() == ["none"]
    assert (tmp_path / "out" / "samples.csv").is_file()


@pytest.mark.parametrize("call, message", [
    (lambda m, d: robustclip.evaluate(m, 3, eps=0.1), "data must be a dataset name"),
    (lambda m, d: robustclip.evaluate(m, d, eps="8/0"), "not a number or a fraction"),
    (lambda m, d: robustclip.evaluate("model", d, eps=0.1), "model must be an nn.Module"),
    (lambda m, d: robustclip.evaluate(m, d), "give --eps"),
    (lambda m, d: robustclip.clip_model(m, "fastclipp"), "unknown method 'fastclipp'"),
])
def test_api_bad_input(models, data, call, message):
    with pytest.raises(RobustclipError, match=message):
        call(models["a"], data)


OWN = '''
import torch
import torch.nn as nn

def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

def broken():
    raise ValueError("no such layer")

def not_a_module():
    return 3

constant = 3
'''


@pytest.mark.parametrize("spec, weights, message", [
    ("ownnets", None, "give it as pkg.module:factory"),
    ("nowhere_module:net", None, "cannot import nowhere_module"),
    ("ownnets:nope", None, "ownnets has no nope"),
    ("ownnets:constant", None, "constant is not callable"),
    ("ownnets:broken", None, "broken() failed: no such layer"),
    ("ownnets:not_a_module", None, "returned int, not an nn.Module"),
    ("ownnets:net", "missing.pt", "does not exist"),
    ("ownnets:net", "garbage.pt", "is corrupt or not a torch file"),
    ("ownnets:net", "list.pt", "holds a list, not a state dict"),
    ("ownnets:net", "other.pt", "do not fit the model"),
])
def test_own_model_errors_are_one_line(tmp_path, monkeypatch, spec, weights, message):
    from robustclip.checkpoint import load_factory

    (tmp_path / "ownnets.py").write_text(OWN)
    (tmp_path / "garbage.pt").write_bytes(b"not torch")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RobustclipError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_factory(spec, None if weights is None else tmp_path / weights, "mnist")


@pytest.mark.parametrize("args, env, message", [
    (["--eps", "0.1", "--weights", "w.pt"], {}, "--weights goes with --model"),
    (["--eps", "0.1", "--model", "ownnets:net", "--dataset", "mnistt"], {}, "mnistt"),
    (["--eps", "0.1", "--model", "ownnets:net", "--dataset", "mnist"], {"WORLD_SIZE": "2"},
     "under torchrun give --out"),
])
def test_cli_own_model_refusals(tmp_path, monkeypatch, args, env, message):
    from click.testing import CliRunner

    from robustclip.cli import main

    (tmp_path / "ownnets.py").write_text(OWN)
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["attack", *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_resume_with_a_damaged_settings_file_is_one_line(tmp_path):
    from click.testing import CliRunner

    from robustclip.cli import main

    (tmp_path / ".journal").mkdir()
    (tmp_path / ".journal" / "attack.json").write_text("{not json")
    result = CliRunner().invoke(main, ["attack", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "is not JSON, so it is not the settings robustclip wrote" in result.stderr


def test_api_limit_below_one(models, data):
    with pytest.raises(RobustclipError, match="limit must be >= 1"):
        robustclip.evaluate(models["a"], data, eps=0.1, limit=0)
