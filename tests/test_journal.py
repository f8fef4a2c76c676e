"""The attack journal and ``robustclip attack --resume`` cannot be fooled: an edited record,
a record of another batch or run under this one's name, a malformed record or settings
file, runs resolved in another working directory, a changed model, and a bad option
that would leave a journal behind."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
import torch

from robustclip.checkpoint import load
from robustclip.errors import RobustclipError
from robustclip.evaluation import evaluate, make_cascade, make_spec
from robustclip.evaluation.craft import runs
from robustclip.evaluation.journal import Journal, model_digest
from helpers import cli as _cli, refused as _one_line

evaluate_module = importlib.import_module("robustclip.evaluation.evaluate")
SPECS = [make_spec("fgsm", 0.1)]


def _journaled(models, data, folder: Path, bounds: bool = False, label: str = "a"):
    x, y = data
    return evaluate({"a": models[label]}, x, y, SPECS, batch_size=50, bounds=bounds, journal=folder)


def _holding(value: Any, key: str) -> dict | None:
    """The dict inside ``value`` (a loaded journal file) that has ``key``, whatever the
    file's layout."""
    if isinstance(value, dict):
        if key in value:
            return value
        value = list(value.values())
    if isinstance(value, list):
        return next((d for d in map(lambda v: _holding(v, key), value) if d is not None), None)
    return None


def _edit(path: Path, key: str, change: Callable[[dict], None]) -> None:
    """Load a journal file, change the record holding ``key`` in place, save it back."""
    saved = torch.load(path, weights_only=True)
    change(_holding(saved, key))
    torch.save(saved, path)


def _refused(err: pytest.ExceptionInfo, path: Path, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "delete it" in message, message
    assert all(p in message for p in parts), message


def _batch_keys(model, data, folder: Path) -> list[str]:
    """The names of a model's batch records under :data:`SPECS` (batch size 50, seed 0)."""
    x, y = data
    journal, group = Journal(folder), runs(SPECS)[0]
    return [journal.key(model_digest(model), group, 0, b, tensors=(xb, yb))
            for b, (xb, yb) in enumerate(zip(x.split(50), y.split(50)))]


# ------------------------------------------------------------------- 1: edited records

def test_an_edited_batch_record_is_refused(models, data, tmp_path):
    _journaled(models, data, tmp_path / "j")
    record = next((tmp_path / "j").glob("*.pt"))

    def flip(r: dict) -> None:
        r["correct"][0] = ~r["correct"][0]  # robust turned around
    _edit(record, "correct", flip)
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j")
    _refused(err, record, "changed")


def test_an_edited_bound_record_is_refused(models, data, tmp_path):
    """The Lipschitz bound (which the certificates rest on) is a record too."""
    _journaled(models, data, tmp_path / "j", bounds=True)
    (bound,) = [p for p in (tmp_path / "j").glob("*.pt")
                if _holding(torch.load(p, weights_only=True), "kind") is not None]

    def halve(r: dict) -> None:
        r["value"] = r["value"] / 2  # twice the certificates
    _edit(bound, "kind", halve)
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j", bounds=True)
    _refused(err, bound, "changed")


# ------------------------------------------------------ 2: records of another batch, run

def test_records_of_another_run_under_this_runs_names_are_refused(models, data, tmp_path):
    _journaled(models, data, tmp_path / "a")
    _journaled(models, data, tmp_path / "b", label="b")
    mine, theirs = (_batch_keys(models[m], data, tmp_path / m) for m in "ab")
    assert sorted(p.stem for p in (tmp_path / "a").glob("*.pt")) == sorted(mine)
    for a, b in zip(mine, theirs):
        shutil.copy(tmp_path / "b" / f"{b}.pt", tmp_path / "a" / f"{a}.pt")
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "a")
    _refused(err, tmp_path / "a" / f"{mine[0]}.pt", "another batch or run")


def test_a_record_of_another_batch_under_this_batchs_name_is_refused(models, data, tmp_path):
    _journaled(models, data, tmp_path / "j")
    first, second = _batch_keys(models["a"], data, tmp_path / "j")
    shutil.copy(tmp_path / "j" / f"{second}.pt", tmp_path / "j" / f"{first}.pt")
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j")
    _refused(err, tmp_path / "j" / f"{first}.pt", "another batch or run")


# --------------------------------------------------------------- 5: malformed records

@pytest.mark.parametrize("content, message", [
    ({}, "not a journal record robustclip wrote"),
    ([1, 2], "not a journal record robustclip wrote"),
])
def test_a_file_that_is_no_record_is_one_line(models, data, tmp_path, content, message):
    _journaled(models, data, tmp_path / "j")
    record = next((tmp_path / "j").glob("*.pt"))
    torch.save(content, record)
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j")
    _refused(err, record, message)


def _shorter(r: dict) -> None:
    r["correct"][0] = r["correct"][0][:-1]


def _no_warnings(r: dict) -> None:
    del r["warnings"]


def _text_ratio(r: dict) -> None:
    r["ratio"] = "big"


def _stray_adversarial(r: dict) -> None:
    r["adversarial"] = [torch.zeros(3)]


@pytest.mark.parametrize("change, message", [
    (_shorter, "correct[0] has shape (49,), not (50,)"),
    (lambda r: r.clear(), "lacks correct, distance"),
    (_no_warnings, "lacks warnings"),
    (_text_ratio, "ratio or seconds is not a number"),
    (_stray_adversarial, "adversarial[0] has shape (3,), not (50, 1, 10, 10)"),
])
def test_a_malformed_record_with_a_good_digest_is_one_line(models, data, tmp_path, change, message):
    """A record that matches its digest (written by ``Journal.put``) but does not hold
    what the evaluation reads: one line naming the file, not a traceback."""
    _journaled(models, data, tmp_path / "j")
    journal = Journal(tmp_path / "j")
    key = _batch_keys(models["a"], data, tmp_path / "j")[1]
    record = journal.get(key)
    change(record)
    journal.put(key, record)
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j")
    _refused(err, tmp_path / "j" / f"{key}.pt", "malformed", message)


def test_a_malformed_bound_record_is_one_line(models, data, tmp_path):
    _journaled(models, data, tmp_path / "j", bounds=True)
    journal = Journal(tmp_path / "j")
    key = journal.key(model_digest(models["a"]), "lipschitz bound", (1, 10, 10))
    journal.put(key, {"value": "3.0", "kind": "upper"})
    with pytest.raises(RobustclipError) as err:
        _journaled(models, data, tmp_path / "j", bounds=True)
    _refused(err, tmp_path / "j" / f"{key}.pt", "malformed", "value is not a number")


def test_a_record_without_adversarial_examples_is_attacked_again_when_they_are_kept(
        models, data, tmp_path, monkeypatch):
    x, y = data
    evaluate({"a": models["a"]}, x, y, SPECS, batch_size=50, bounds=False, journal=tmp_path / "j")
    calls = []
    real = evaluate_module._attack_batch
    monkeypatch.setattr(evaluate_module, "_attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    kept = evaluate({"a": models["a"]}, x, y, SPECS, batch_size=50, bounds=False,
                    journal=tmp_path / "j", keep_adversarial=True)
    assert len(calls) == 2 and kept.results[0].adversarial.shape == x.shape
    again = evaluate({"a": models["a"]}, x, y, SPECS, batch_size=50, bounds=False,
                     journal=tmp_path / "j", keep_adversarial=True)
    assert len(calls) == 2 and torch.equal(again.results[0].adversarial, kept.results[0].adversarial)


def test_replayed_records_give_the_same_results(models, data, tmp_path):
    """The checks let every record the evaluation wrote through (bounds, cascades, kept
    examples)."""
    x, y = data
    specs = [make_spec("fgsm", 0.1), make_spec("pgd", 0.1, steps=3), make_cascade("quick", 0.15, steps=2)]
    first = evaluate(models, x, y, specs, batch_size=30, journal=tmp_path / "j", keep_adversarial=True)
    again = evaluate(models, x, y, specs, batch_size=30, journal=tmp_path / "j", keep_adversarial=True)
    for a, b in zip(first.results, again.results):
        assert torch.equal(a.robust, b.robust) and a.lipschitz_bound == b.lipschitz_bound
        assert (a.adversarial is None and b.adversarial is None) or torch.equal(a.adversarial, b.adversarial)
    assert first.warnings == again.warnings


# ------------------------------------------------------------------- robustclip attack

def _checkpoint(path: Path, seed: int) -> Path:
    """An untrained simpleconv (2 channels) on a 24-sample synthetic MNIST test split (no
    data to fetch), its weights drawn with ``seed``: a run directory."""
    from robustclip.checkpoint import save_checkpoint
    from robustclip.models import build_model

    torch.manual_seed(seed)
    model = build_model("simpleconv", "mnist", "none", channels=2)
    path.mkdir(parents=True)
    save_checkpoint({"model": {"name": "simpleconv", "args": {"channels": 2}},
                     "method": {"name": "none", "args": {}}, "dataset": "mnist",
                     "config": {"data": {"synthetic": True},
                                "train": {"seed": 1, "limit_train": 8, "limit_test": 24}},
                     "state_dict": model.state_dict()}, path / "last.pt")
    return path


@pytest.fixture
def places(tmp_path, monkeypatch) -> dict[str, Path]:
    """Two working directories a/ and b/, each with a run named 'run' (other weights in
    each), the working directory a/; out: where the results go."""
    for name, seed in (("a", 0), ("b", 1)):
        _checkpoint(tmp_path / name / "run", seed)
    monkeypatch.chdir(tmp_path / "a")
    return {"a": tmp_path / "a", "b": tmp_path / "b", "out": tmp_path / "out"}


ATTACK = ["--attack", "fgsm", "--eps", "0.1", "--batch-size", "8"]


def _interrupt(monkeypatch, *args: str) -> None:
    """``robustclip attack *args``, stopped after its first batch is journaled (the 2nd of 3
    batches fails), leaving the journal of an interrupted evaluation."""
    real, calls = evaluate_module._attack_batch, []

    def stopping(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("interrupted (test)")
        return real(*a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "_attack_batch", stopping)
        result = _cli("attack", *args)
    assert isinstance(result.exception, RuntimeError), result.output


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns="seconds")


# ------------------------------------------------ 3: --resume from another directory

def test_resume_from_another_directory_loads_the_runs_it_started_with(places, monkeypatch):
    out = places["out"]
    assert _cli("attack", "run", *ATTACK, "--out", str(places["a"] / "ref")).exit_code == 0
    _interrupt(monkeypatch, "run", *ATTACK, "--out", str(out))
    settings = json.loads((out / ".journal" / "attack.json").read_text())
    monkeypatch.chdir(places["b"])  # holds another 'run'
    result = _cli("attack", "--resume", str(out))
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(_table(out), _table(places["a"] / "ref"))
    assert settings["runs"] == [str(places["a"] / "run")]
    assert settings["model_digest"] == {"run": model_digest(load(places["a"] / "run"))}


def test_resume_keeps_the_labels_the_runs_started_with(places, monkeypatch):
    """Runs whose names collide are labelled by the paths given; resumed from their
    absolute paths, they keep those labels (and the table its rows)."""
    root, out = places["a"].parent, places["out"]
    monkeypatch.chdir(root)
    assert _cli("attack", "a/run", "b/run", *ATTACK, "--out", str(root / "ref")).exit_code == 0
    _interrupt(monkeypatch, "a/run", "b/run", *ATTACK, "--out", str(out))
    monkeypatch.chdir(places["a"])
    result = _cli("attack", "--resume", str(out))
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(_table(out), _table(root / "ref"))
    assert list(dict.fromkeys(_table(out).model)) == ["a/run", "b/run"]


def test_resume_refuses_a_run_whose_model_changed(places, monkeypatch):
    out = places["out"]
    _interrupt(monkeypatch, "run", *ATTACK, "--out", str(out))
    shutil.copy(places["b"] / "run" / "last.pt", places["a"] / "run" / "last.pt")  # retrained
    _one_line(_cli("attack", "--resume", str(out)), f"run {places['a'] / 'run'} (run)",
              "not the model the interrupted evaluation started with")
    assert (out / ".journal" / "attack.json").is_file()  # nothing lost


# --------------------------------------------- 4: a bad option journals nothing

@pytest.mark.parametrize("bad, message", [
    (["--batch-size", "0"], "must be >= 1, got 0"),
    (["--limit", "0"], "--limit"),
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["{a}/missing"], "run {a}/missing does not exist"),
])
def test_a_bad_option_leaves_nothing_behind(places, bad, message):
    out = places["out"]
    args = [a.format(a=places["a"]) for a in ["run", *ATTACK, "--out", str(out), *bad]]
    _one_line(_cli("attack", *args), message.format(a=places["a"]))
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["a", "b"]
    assert _cli("attack", "run", *ATTACK, "--out", str(out)).exit_code == 0  # the corrected command


def test_a_bad_batch_size_is_refused_before_anything_is_printed(places):
    result = _cli("attack", "run", *ATTACK, "--out", str(places["out"]), "--batch-size", "-1")
    _one_line(result, "must be >= 1, got -1")
    assert result.stdout == ""


def test_the_python_api_journals_nothing_before_the_batch_size_is_checked(models, data, tmp_path):
    from robustclip import api

    x, y = data
    with pytest.raises(RobustclipError, match="batch size must be >= 1"):
        api.evaluate(models["a"], (x, y), eps=0.1, attacks="fgsm", batch_size=0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    api.evaluate(models["a"], (x, y), eps=0.1, attacks="fgsm", out=tmp_path / "out")


def test_overwrite_keeps_the_journal_until_the_new_evaluation_starts(places, monkeypatch):
    out = places["out"]
    _interrupt(monkeypatch, "run", *ATTACK, "--out", str(out))
    _one_line(_cli("attack", "run", "--attack", "nope", "--eps", "0.1", "--out", str(out),
                   "--overwrite"), "unknown attack 'nope'")
    result = _cli("attack", "--resume", str(out))  # the interrupted evaluation is still there
    assert result.exit_code == 0, result.output


# ---------------------------------------------------- 5: a malformed attack.json

def _unknown_key(s: dict) -> Any:
    return s | {"stepz": 3}


def _text_batch_size(s: dict) -> Any:
    return s | {"batch_size": "8"}


def _relative_run(s: dict) -> Any:
    return s | {"runs": ["run"]}


def _no_digest(s: dict) -> Any:
    return s | {"model_digest": None}


def _fractional_limit(s: dict) -> Any:
    return s | {"limit": 8.5}


@pytest.mark.parametrize("change, message", [
    (lambda s: [s], "holds a JSON list, not an object"),
    (lambda s: {}, "lacks runs, eps, attacks, suite, ..."),
    (lambda s: {k: v for k, v in s.items() if k != "seed"}, "lacks seed"),
    (_unknown_key, "has unknown keys stepz"),
    (_text_batch_size, 'holds batch_size "8", not int'),
    (_fractional_limit, "holds limit 8.5, not int | None"),
    (_relative_run, "holds the relative path 'run'"),
    (_no_digest, "holds no model_digest"),
])
def test_a_malformed_settings_file_is_one_line(places, monkeypatch, change, message):
    out = places["out"]
    _interrupt(monkeypatch, "run", *ATTACK, "--out", str(out))
    path = out / ".journal" / "attack.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    monkeypatch.chdir(places["b"])  # where a relative 'run' is another run
    _one_line(_cli("attack", "--resume", str(out)), str(path), message, "--overwrite")
