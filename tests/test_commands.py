"""robustclip.report and robustclip.commands through the CLI: result files, bad input,
attack / transfer / lipschitz end to end on real checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from robustclip import checkpoint
from robustclip.errors import RobustclipError
from robustclip.evaluation import evaluate, make_spec
from robustclip.models import build_model
from robustclip.report import prepare_out_dir, results_table, write_results


def test_report_files(models, data, tmp_path):
    x, y = data
    weak = {"steps": 1, "rel_stepsize": 0.01, "random_start": False}  # weaker than FGSM
    specs = [make_spec("fgsm", e) for e in (0.01, 0.1)] + [make_spec("pgd", e, **weak) for e in (0.01, 0.1)]
    ev = evaluate({"a": models["a"]}, x[:40], y[:40], specs)
    table = results_table(ev.results)
    out = prepare_out_dir(tmp_path / "out", overwrite=False)
    write_results(out, table, ev.warnings)
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


def _cli(*args: str):
    from robustclip.cli import main

    return CliRunner().invoke(main, list(args))


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
    assert all(r["n"] == 8 for r in rows)
    again = _cli("attack", runs["m1"], "--eps", "0.1", "--out", str(out), *common)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    result = _cli("transfer", runs["m1"], runs["m2"], "--attack", "fgsm", "--eps", "0.1",
                  "--out", str(tmp_path / "tr"), *common)
    assert result.exit_code == 0, result.output
    assert "diagonal = white-box" in result.output
    assert (tmp_path / "tr" / "transfer_fgsm_0.1.png").is_file()
    result = _cli("lipschitz", runs["m1"], *common)
    assert result.exit_code == 0, result.output
    assert "conv1+bn1" in result.output and "empirical" in result.output
