"""What robustclip refuses rather than does silently: removing what it did not write, one
run or eps given twice, file names that collide, a model clipped twice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustclip.errors import RobustclipError
from test_train import tiny
from helpers import cli as _cli, refused as _refused


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-epoch run of a tiny model on synthetic data, at <tmp>/runs/a."""
    from robustclip.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = train(tiny("none"), tmp_path_factory.mktemp("project") / "runs" / "a")
    torch.set_num_threads(threads)
    return Path(path)


def _no_work(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading test data (the long work)."""
    import robustclip.commands as commands

    monkeypatch.setattr(commands, "test_set", lambda *a, **k: pytest.fail("the work ran before the check"))


FGSM = ("--attack", "fgsm", "--eps", "0.1", "--limit", "8")


# ------------------------------------------------------------------- one run given twice

@pytest.mark.parametrize("command", ["attack", "transfer", "lipschitz"])
def test_a_run_given_twice_in_any_spelling_is_refused(run, monkeypatch, command):
    monkeypatch.chdir(run.parent.parent)
    _no_work(monkeypatch)
    options = FGSM if command != "lipschitz" else ()
    for twice in (["runs/a", "./runs/a"], ["runs/a", "runs/a/last.pt"], ["runs/a/", str(run)]):
        _refused(_cli(command, *twice, *options), "the same run is given twice",
                 f"{twice[0]} and {twice[1]}")


# ------------------------------------------- --out: never a run or the data, --overwrite ours only

def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["attack", "transfer", "lipschitz"])
def test_out_may_not_be_contain_or_lie_inside_a_run(run, monkeypatch, command):
    _no_work(monkeypatch)
    options = FGSM if command != "lipschitz" else ()
    before = _tree(run.parent)
    assert {"a/last.pt", "a/config.toml", "a/metrics.csv"} <= set(before)
    assert any(name.startswith("a/events.out.tfevents.") for name in before)
    for out, relation in [(run, "is"), (run.parent, "contains"), (run / "results", "lies inside")]:
        for extra in ([], ["--overwrite"]):
            _refused(_cli(command, str(run), *options, "--out", str(out), *extra),
                     f"--out {out} {relation} the training run directory {run}")
    assert _tree(run.parent) == before and not (run / "results").exists()


def test_out_may_not_be_contain_or_lie_inside_the_data_root(run, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    root = tmp_path / "data"
    (root / "MNIST").mkdir(parents=True)
    (root / "MNIST" / "images").write_bytes(b"pixels")
    for out, relation in [(root, "is"), (tmp_path, "contains"), (root / "MNIST" / "out", "lies inside")]:
        for extra in ([], ["--overwrite"]):
            _refused(_cli("attack", str(run), *FGSM, "--data-dir", str(root), "--out", str(out), *extra),
                     f"--out {out} {relation} the data root {root}")
    monkeypatch.setenv("ROBUSTCLIP_DATA", str(root))  # the data root in use, without --data-dir
    _refused(_cli("lipschitz", str(run), "--out", str(root), "--overwrite"), "the data root")
    assert _tree(root) == {"MNIST/images": b"pixels"}


def test_overwrite_replaces_only_a_results_directory_of_robustclip(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["attack", str(run), *FGSM, "--save-adversarial", "--data-dir", str(tmp_path / "no-data"),
            "--out", str(out)]
    assert _cli(*args).exit_code == 0
    assert _cli(*args, "--overwrite").exit_code == 0  # its own results, adversarial/ included
    results = _tree(out)
    assert {"results.json", "environment.json", "adversarial/a.pt"} <= set(results)
    _no_work(monkeypatch)
    for foreign, named in [("notes.txt", "(notes.txt)"), ("adversarial/notes.txt", "(adversarial/notes.txt)"),
                           ("thesis/chapter.tex", "(thesis)")]:
        (out / foreign).parent.mkdir(exist_ok=True)
        (out / foreign).write_text("mine")
        _refused(_cli(*args, "--overwrite"), f"--out {out} holds files robustclip did not write", named)
        assert _tree(out) == results | {foreign: b"mine"}
        (out / foreign).unlink()
    (out / "thesis").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "results.md").unlink()
    (out / "results.md").symlink_to(tmp_path / "elsewhere")  # a link is not robustclip's either
    _refused(_cli(*args, "--overwrite"), "holds files robustclip did not write (results.md)")


def test_out_that_came_to_hold_foreign_files_is_not_replaced(tmp_path):
    from robustclip.report import results_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("old\n")
    with pytest.raises(RobustclipError, match=r"holds files robustclip did not write \(notes.txt\)"):
        with results_dir(out, overwrite=True) as work:
            (work / "results.csv").write_text("new\n")
            (out / "notes.txt").write_text("written meanwhile")
    assert _tree(out) == {"results.csv": b"old\n", "notes.txt": b"written meanwhile"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no work dir, no lock left


def test_train_overwrite_removes_only_the_files_robustclip_wrote(run, tmp_path):
    from robustclip.config import to_toml

    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny("none")))
    out = tmp_path / "project"
    out.mkdir()
    torch.save({"weight": torch.zeros(2)}, out / "last.pt")  # another program's checkpoint
    (out / "config.toml").write_text('[tool.black]\nline-length = 100\n')
    (out / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (out / "environment.json").write_text('{"name": "base"}\n')
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    _refused(_cli("train", "--config", str(config), "--out", str(out), "--overwrite"),
             f"run directory {out} holds config.toml, environment.json, last.pt, metrics.csv "
             "that robustclip did not write")
    assert _tree(out) == before
    for name in ("config.toml", "environment.json", "last.pt", "metrics.csv"):
        (out / name).unlink()
        (out / name).write_bytes((run / name).read_bytes())  # a run's own: these go
    events = next(run.glob("events.out.tfevents.*"))
    (out / events.name).write_bytes(events.read_bytes())
    assert _cli("train", "--config", str(config), "--out", str(out), "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.pt").is_file()
    assert not (out / events.name).exists()  # the old run's events went, the new run's are there
    assert len(list(out.glob("events.out.tfevents.*"))) == 1


# ------------------------------------------------------- adversarial/: one file per model

def test_adversarial_names_are_distinct_and_deterministic():
    from robustclip.report import adversarial_names

    names = adversarial_names(["run 1", "run_1", "Run_1", "b/c", "plain"])
    assert names["plain"] == "plain" and names["b/c"] == "b_c"  # no collision: the label made safe
    colliding = [names[label] for label in ("run 1", "run_1", "Run_1")]
    assert len({n.casefold() for n in colliding}) == 3  # distinct on a case-insensitive disk too
    assert all(n.casefold().startswith("run_1-") for n in colliding)
    assert adversarial_names(["Run_1", "run_1", "run 1"]) == {k: names[k] for k in ("Run_1", "run_1", "run 1")}


def test_save_adversarial_writes_one_file_per_model(run, tmp_path):
    from robustclip.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    other = train(tiny("none", "train.seed=2"), tmp_path / "runs" / "run_1")  # its own test split
    torch.set_num_threads(threads)
    (tmp_path / "runs" / "run 1").mkdir()
    (tmp_path / "runs" / "run 1" / "last.pt").write_bytes((run / "last.pt").read_bytes())
    out = tmp_path / "out"
    result = _cli("attack", str(tmp_path / "runs" / "run 1"), str(other), *FGSM, "--save-adversarial",
                  "--data-dir", str(tmp_path / "no-data"), "--out", str(out))
    assert result.exit_code == 0, result.output
    files = sorted((out / "adversarial").iterdir())
    saved = {torch.load(f, weights_only=True)["model"]: f.name for f in files}
    assert set(saved) == {"run 1", "run_1"} and len(files) == 2, saved


# ------------------------------------------------------------------- one eps given twice

@pytest.mark.parametrize("command, twice", [("attack", ["0.1", "0.1"]), ("attack", ["0.1", "1/10"]),
                                            ("transfer", ["1/10", "0.2", "0.1"])])
def test_an_eps_given_twice_is_refused(run, tmp_path, monkeypatch, command, twice):
    monkeypatch.chdir(tmp_path)  # attack's default --out is made there
    _no_work(monkeypatch)
    eps = [arg for e in twice for arg in ("--eps", e)]
    _refused(_cli(command, str(run), *eps, "--attack", "fgsm", "--limit", "8"),
             "--eps 0.1 is given twice; give each budget once")


def test_api_evaluate_refuses_an_eps_given_twice(models, data):
    import robustclip

    with pytest.raises(RobustclipError, match="--eps 0.1 is given twice"):
        robustclip.evaluate(models["a"], (data[0][:8], data[1][:8]), eps=[0.1, "1/10"],
                            attacks="fgsm", bounds=False)


# ------------------------------------------------------------------- a model clipped twice

def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(128, 10))


@pytest.mark.parametrize("method", ["none", "fastclip", "miyato", "gouk"])
def test_clip_model_refuses_a_model_clipped_already(method):
    import robustclip

    model = robustclip.clip_model(_net(), method)
    before = repr(model)
    with pytest.raises(RobustclipError, match=r"the model is already clipped \(layers wrapped: 0, 2\); "
                                              r"clip_model wraps a plain model once"):
        robustclip.clip_model(model, "fastclip")
    assert repr(model) == before  # nothing nested


def test_clip_model_refuses_a_loaded_run_and_torchs_spectral_norm(run):
    import robustclip
    from torch.nn.utils.parametrizations import spectral_norm

    with pytest.raises(RobustclipError, match="already clipped"):
        robustclip.clip_model(robustclip.load(run), "fastclip")
    with pytest.raises(RobustclipError, match=r"already clipped \(layers wrapped: 2\)"):
        robustclip.clip_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(),
                                                  spectral_norm(torch.nn.Linear(4, 2))))
