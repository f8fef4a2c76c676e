"""Every evaluation is kept and resumable (issue #12): the journal of finished batches,
--resume after SIGKILL, the default output folder, per-sample results, saved examples."""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from robustclip.errors import RobustclipError
from robustclip.evaluation import evaluate, make_cascade, make_spec
from robustclip.evaluation.craft import eps_limit
from robustclip.evaluation.journal import Journal
from robustclip.report import results_table, samples_table

ROOT = Path(__file__).resolve().parents[1]
evaluate_module = importlib.import_module("robustclip.evaluation.evaluate")


def _table(evaluation) -> pd.DataFrame:
    return results_table(evaluation.results).drop(columns="seconds")


def _specs():
    return [make_spec("fgsm", 0.1), make_spec("pgd", 0.1, steps=5),
            make_cascade("quick", 0.15, steps=5)]


def test_journal_replays_every_batch_and_gives_the_same_table(models, data, tmp_path, monkeypatch):
    x, y = data
    first = evaluate(models, x, y, _specs(), batch_size=16, journal=tmp_path / "j")
    assert len(Journal(tmp_path / "j")) == 2 * 3 * 7 + 2  # (models, runs, batches) + 2 bounds

    def attack_nothing(*args, **kwargs):
        raise AssertionError("a journaled batch was attacked again")
    monkeypatch.setattr(evaluate_module, "_attack_batch", attack_nothing)
    again = evaluate(models, x, y, _specs(), batch_size=16, journal=tmp_path / "j")
    pd.testing.assert_frame_equal(_table(first), _table(again))
    for a, b in zip(first.results, again.results):
        assert torch.equal(a.robust, b.robust)
        assert torch.equal(a.distance.nan_to_num(-1), b.distance.nan_to_num(-1))
    assert first.warnings == again.warnings


def test_journal_never_reuses_a_record_of_another_model_seed_or_attack(models, data, tmp_path, monkeypatch):
    x, y = data
    spec = [make_spec("pgd", 0.1, steps=3)]
    evaluate({"a": models["a"]}, x, y, spec, batch_size=50, journal=tmp_path / "j")
    calls = []
    real = evaluate_module._attack_batch
    monkeypatch.setattr(evaluate_module, "_attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    evaluate({"a": models["a"]}, x, y, spec, batch_size=50, journal=tmp_path / "j")
    assert calls == []
    evaluate({"a": models["b"]}, x, y, spec, batch_size=50, journal=tmp_path / "j")  # same label
    evaluate({"a": models["a"]}, x, y, spec, batch_size=50, seed=1, journal=tmp_path / "j")
    evaluate({"a": models["a"]}, x, y, [make_spec("pgd", 0.1, steps=4)], batch_size=50,
             journal=tmp_path / "j")
    evaluate({"a": models["a"]}, x.flip(0), y.flip(0), spec, batch_size=50, journal=tmp_path / "j")
    assert len(calls) == 4 * 2


def test_unreadable_journal_record_is_one_line(models, data, tmp_path):
    x, y = data
    evaluate({"a": models["a"]}, x, y, [make_spec("fgsm", 0.1)], batch_size=50, bounds=False,
             journal=tmp_path / "j")
    record = next((tmp_path / "j").glob("*.pt"))
    record.write_bytes(b"garbage")
    with pytest.raises(RobustclipError, match="unreadable.*delete it"):
        evaluate({"a": models["a"]}, x, y, [make_spec("fgsm", 0.1)], batch_size=50,
                 bounds=False, journal=tmp_path / "j")


def test_samples_agree_with_the_table(models, data):
    x, y = data
    ev = evaluate(models, x, y, [*_specs(), make_spec("pgd", 0.3, steps=5), make_spec("fgsm", 0.3)],
                  batch_size=32)
    table, samples = results_table(ev.results), samples_table(ev.results, y)
    assert len(samples) == len(table) * len(y)
    for row in table.itertuples():
        part = samples[(samples.model == row.model) & (samples.attack == row.attack)
                       & (samples.eps == row.eps)]
        assert part.clean.mean() == pytest.approx(row.clean_acc)
        assert part.robust.mean() == pytest.approx(row.robust_acc)
        if not math.isnan(row.certified_acc):
            assert part.certified.astype(bool).mean() == pytest.approx(row.certified_acc)
        broken = part.clean & ~part.robust
        assert ((part.broken_by != "") == broken).all()
        assert part.distance[broken].le(eps_limit(row.eps)).all() and part.distance[~broken].isna().all()
        assert (part.label.to_numpy() == y.numpy()).all()
    cascade = samples[(samples.attack == "quick") & (samples.model == "a")]
    stages = set(cascade.broken_by) - {""}
    assert stages and stages <= {"quick:apgd-ce", "quick:apgd-t"}
    suite = samples[(samples.attack == "all-attacks") & (samples.eps == 0.3)]
    assert set(suite.broken_by) - {""} <= {"pgd", "fgsm"}


# ------------------------------------------------------------------------------- CLI

FACTORY = '''
import torch
import torch.nn as nn


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 12 * 12, 10))
'''


@pytest.fixture(scope="module")
def own_model(tmp_path_factory, mnist_root):
    """A module tinynet.py with a factory and its weights, trained for a moment on MNIST."""
    from robustclip.data import load

    root = tmp_path_factory.mktemp("own")
    (root / "tinynet.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    try:
        import tinynet
        model = tinynet.net()
    finally:
        sys.path.remove(str(root))
    images, labels = load("mnist", "train", mnist_root).tensors
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for xb, yb in zip(images[:6000].split(100), labels[:6000].split(100)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    torch.save(model.state_dict(), root / "tinynet.pt")
    return root


def _attack_cmd(root: Path, mnist_root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "robustclip", "attack", "--model", "tinynet:net",
            "--weights", str(root / "tinynet.pt"), "--dataset", "mnist",
            "--data-dir", str(mnist_root), *args]


EVAL = ["--eps", "0.03", "--quick", "--steps", "10", "--limit", "240", "--batch-size", "16"]


def test_sigkill_and_resume_gives_the_same_tables(own_model, mnist_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_attack_cmd(own_model, mnist_root, *EVAL, "--out", str(tmp_path / "ref")),
                         cwd=own_model, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen(_attack_cmd(own_model, mnist_root, *EVAL, "--out", str(out)),
                            cwd=own_model, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    first = proc.stdout.readline()
    assert first.startswith(f"writing to {out}") and "--resume" in first
    cut = random.Random(os.getpid()).randint(3, 12)  # of 15 batches; + 1 bound record
    deadline = time.time() + 300
    while len(list((out / ".journal").glob("*.pt"))) < cut and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.csv").exists()
    refused = subprocess.run(_attack_cmd(own_model, mnist_root, *EVAL, "--out", str(out)),
                             cwd=own_model, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"--resume {out}" in refused.stderr
    resumed = subprocess.run([sys.executable, "-m", "robustclip", "attack", "--resume", str(out)],
                             cwd=own_model, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("results.csv", "samples.csv"):
        a, b = (pd.read_csv(d / name) for d in (tmp_path / "ref", out))
        if name == "results.csv":
            a, b = a.drop(columns="seconds"), b.drop(columns="seconds")
        pd.testing.assert_frame_equal(a, b)
    assert not (out / ".journal").exists()  # the finished results replace the journal
    table = pd.read_csv(out / "results.csv")
    assert (table.model == "net").all() and 0 < table.robust_acc.min() < table.clean_acc.max()


def test_resume_refusals(own_model, mnist_root, tmp_path):
    from robustclip.cli import main

    (tmp_path / "done").mkdir()
    result = CliRunner().invoke(main, ["attack", "--resume", str(tmp_path / "done")])
    assert result.exit_code == 2 and "no interrupted evaluation" in result.stderr
    result = CliRunner().invoke(main, ["attack", "runs/x", "--eps", "0.1", "--resume", str(tmp_path / "done")])
    assert result.exit_code == 2 and "drop --eps, RUNs" in result.stderr
    result = CliRunner().invoke(main, ["attack", "--eps", "0.1", "--model", "tinynet:net"])
    assert result.exit_code == 2 and "needs --dataset" in result.stderr
    result = CliRunner().invoke(main, ["attack", "--eps", "0.1"])
    assert result.exit_code == 2 and "give RUNs" in result.stderr


def test_default_out_and_saved_adversarial_examples(own_model, mnist_root, tmp_path, monkeypatch):
    from robustclip.cli import main

    monkeypatch.chdir(own_model)
    monkeypatch.syspath_prepend(str(own_model))
    result = CliRunner().invoke(main, ["attack", "--model", "tinynet:net", "--weights", "tinynet.pt",
                                       "--dataset", "mnist", "--data-dir", str(mnist_root),
                                       "--attack", "pgd", "--eps", "0.05", "--steps", "5",
                                       "--limit", "40", "--save-adversarial"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("writing to robustclip-out/")
    assert "net | pgd Linf eps=0.05: 100%" in result.stderr and "40/40" in result.stderr  # the bar
    out = own_model / first.split()[2]
    saved = torch.load(out / "adversarial" / "net.pt", weights_only=True)
    (row,) = saved["rows"]
    import tinynet
    model = tinynet.net()
    model.load_state_dict(torch.load("tinynet.pt", weights_only=True))
    from robustclip.data import test_set
    x, y = test_set("mnist", 40, mnist_root)
    assert torch.equal(saved["labels"], y)
    assert (row["x_adv"] - x).abs().amax() <= eps_limit(0.05)
    with torch.no_grad():
        clean_ok, adv_ok = model(x).argmax(1) == y, model(row["x_adv"]).argmax(1) == y
    assert torch.equal(row["robust"], clean_ok & adv_ok)
    samples = pd.read_csv(out / "samples.csv")
    assert (samples.robust.to_numpy() == row["robust"].numpy()).all()
    assert json.loads((out / "results.json").read_text())[0]["model"] == "net"
