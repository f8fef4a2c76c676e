"""Tests for robustclip.train, robustclip.config, robustclip.checkpoint and `robustclip train`."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import robustclip
import robustclip.train as train_mod
from robustclip.checkpoint import read_checkpoint
from robustclip.cli import main
from robustclip.config import Config, differences, from_dict, load_config, override, to_toml
from robustclip.files import tomllib
from robustclip.data import synthetic
from robustclip.errors import RobustclipError
from robustclip.models import METHODS, TRACKING_ONLY, wrappers
from robustclip.train import augment, cyclic_factor, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.synthetic=true", "train.limit_train=96", "train.limit_test=32", "train.batch_size=32",
    "train.epochs=1", "model.args.channels=4", "method.init_delay=1", "method.clip_steps=2",
    "method.init_iters=10", "method.max_rounds=1", "method.refine_iters=3",
    "method.descent_steps=2", "log.progress=false", "log.log_every=1", "train.device=cpu",
]



def tiny(method: str = "fastclip", *extra: str) -> Config:
    model = "simpleconv-composite" if method == "fastclip-composite" else "simpleconv"
    return override(Config(), [*TINY, f"model.name={model}", f"method.name={method}", *extra])


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fastclip_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = train(tiny("fastclip", "train.epochs=2"), tmp_path_factory.mktemp("runs") / "fastclip")
    torch.set_num_threads(threads)
    return run


# ---------------------------------------------------------------------------- training

@pytest.mark.parametrize("method", [m for m in METHODS if m != "fastclip"])  # fastclip: below
def test_every_method_trains(tmp_path, method):
    run = train(tiny(method), tmp_path / method)
    (row,) = rows(run)
    assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_time"} <= set(row)
    assert 0 <= float(row["train_acc"]) <= 1 and 0 <= float(row["test_acc"]) <= 1
    sigmas = sorted(k for k in row if k.startswith("sigma/"))
    # every method logs each layer's sigma (none and miyato: tracking only), so runs overlay
    assert sigmas == (["sigma/conv1", "sigma/conv1.conv", "sigma/fc1"] if method == "fastclip-composite"
                      else ["sigma/conv1", "sigma/fc1"])
    assert all(0 < float(row[k]) for k in sigmas)
    if method not in TRACKING_ONLY:  # gouk/composite: rescaled every step
        assert all(float(row[k]) < 1.01 for k in sigmas)
    assert {"config.toml", "metrics.csv", "last.pt", "best.pt", "environment.json"} <= {p.name for p in run.iterdir()}
    events = EventAccumulator(str(run)).Reload()
    assert set(sigmas) <= set(events.Tags()["scalars"])
    assert events.Scalars(sigmas[0])[-1].value == pytest.approx(float(row[sigmas[0]]))
    hparams = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method.name"].string_value == method
    assert start.hparams["train.limit_train"].number_value == 96
    assert start.hparams["model.args.channels"].number_value == 4
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["test/acc"]
    assert events.Scalars("test/acc")[-1].value == pytest.approx(float(row["test_acc"]))
    assert [p for p in run.iterdir() if p.is_dir()] == []  # hparams in the run itself, no sub-run


def test_fastclip_run_files(fastclip_run):
    table = rows(fastclip_run)
    assert [r["epoch"] for r in table] == ["0", "1"]
    assert float(table[-1]["sigma/conv1"]) < 1.01  # clipped at the clip events
    assert load_config(fastclip_run / "config.toml") == tiny("fastclip", "train.epochs=2")
    events = EventAccumulator(str(fastclip_run)).Reload()
    assert {"train/loss", "test/acc", "lr", "sigma/conv1", "sigma/fc1"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("sigma/conv1")) == 6  # every step (log_every=1), 3 steps per epoch


@pytest.mark.mnist
def test_real_mnist(tmp_path, mnist_root):
    config = tiny("fastclip", "data.synthetic=false", "train.limit_train=512",
                  "train.limit_test=256", "train.lr=0.05", "method.init_delay=100")
    run = train(config, tmp_path / "mnist", data_dir=mnist_root)
    assert float(rows(run)[0]["test_acc"]) > 0.5


def test_augment_is_a_seeded_crop_and_flip():
    x = torch.rand(16, 3, 32, 32)
    a, b = (augment(x, torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.shape == x.shape and torch.equal(a, b)
    assert ((a == 0).float().mean() > 0) and not torch.equal(a, x)


# ---------------------------------------------------------------------------- resume

def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "robustclip", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


ADVERSARIAL = ["train.adversarial.attack=fgsm-rs", "train.adversarial.eps=0.1",
               "train.adversarial.warmup_epochs=4", "train.adversarial.monitor_samples=16"]


ADAM_CYCLIC = ["train.optimizer=adam", "train.schedule=cyclic", "train.lr=0.01"]


@pytest.mark.parametrize("extra", [[], ADVERSARIAL, ADAM_CYCLIC], ids=["plain", "adversarial", "adam-cyclic"])
def test_resume_after_sigkill_is_exact(tmp_path, extra):
    """Kill a run mid-training, resume it: same weights, optimiser and metrics, bit for bit
    (with FGSM-RS training too: random starts, eps warm-up, the APGD-CE monitor; and with Adam
    on the per-step cyclic schedule)."""
    config = tiny("fastclip-composite", "train.epochs=10", "train.limit_train=160", *extra)
    (tmp_path / "c.toml").write_text(to_toml(config))
    # Same string hashes in every process (SpectralClip seeds its random start with hash(name)).
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    whole = _cli("--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "whole"), env=env)
    killed = _cli("--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "killed"), env=env)
    while not (tmp_path / "killed" / "last.pt").exists() and killed.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)  # into the next epoch
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read().decode()
    done = read_checkpoint(tmp_path / "killed")["epoch"]
    assert done < 9, "the run finished before it was killed"
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "killed")])
    assert result.exit_code == 0, result.output
    assert whole.wait() == 0, whole.stderr.read().decode()
    a, b = (read_checkpoint(tmp_path / name) for name in ("whole", "killed"))
    assert a["epoch"] == b["epoch"] == 9 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    states = list(zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    assert states and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                          for x, y in states)  # momentum buffers; Adam's moments and step
    assert a["scheduler"] == b["scheduler"]
    strip = lambda table: [{k: v for k, v in r.items() if k != "wall_time"} for r in table]  # noqa: E731
    assert strip(rows(tmp_path / "whole")) == strip(rows(tmp_path / "killed"))
    assert len(rows(tmp_path / "killed")) == 10
    assert ("apgd_acc" in rows(tmp_path / "killed")[0]) == (extra == ADVERSARIAL)


def test_cyclic_schedule_is_wong_et_al_triangle_set_every_step(tmp_path, monkeypatch):
    """schedule = "cyclic": the lr of every optimiser step is train.lr times the triangle
    (0 -> 1 at 2/5 of the steps -> 0), as np.interp over the fractional epoch gives it
    (Wong et al.'s code); Adam is the optimiser; a resume may not change the epochs."""
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = tiny("none", "train.epochs=5", "train.limit_train=96", "train.batch_size=32",
                  "train.lr=0.02", *ADAM_CYCLIC[:2])
    run = train(config, tmp_path / "run")
    steps = 5 * 3
    expected = [0.02 * float(np.interp((i + 1) / 3, [0, 2, 5], [0, 1, 0])) for i in range(steps)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15) and len(seen) == steps
    assert max(seen) == pytest.approx(0.02) and seen[-1] == 0.0
    assert [float(r["lr"]) for r in rows(run)] == pytest.approx(expected[::3])
    assert cyclic_factor(5, 15) == pytest.approx(1.0)
    with pytest.raises(RobustclipError, match="cyclic schedule spans the run's 5 epochs"):
        train(override(config, ["train.epochs=6"]), run, resume=True)


def test_ctrl_c_keeps_last_completed_epoch(tmp_path, monkeypatch):
    real, calls = train_mod._run_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 1's training pass
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_run_epoch", interrupted)
    config = tiny("gouk", "train.epochs=3")
    (tmp_path / "c.toml").write_text(to_toml(config))
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert read_checkpoint(tmp_path / "run")["epoch"] == 0 and len(rows(tmp_path / "run")) == 1
    monkeypatch.setattr(train_mod, "_run_epoch", real)
    train(config, tmp_path / "run", resume=True)
    assert [r["epoch"] for r in rows(tmp_path / "run")] == ["0", "1", "2"]


def test_run_dir_refused_unless_resume_or_overwrite(tmp_path, fastclip_run):
    config = load_config(fastclip_run / "config.toml")
    with pytest.raises(RobustclipError, match="already exists; use --resume .* or --overwrite"):
        train(config, fastclip_run)
    with pytest.raises(RobustclipError, match=r"different config: method.clip \(1.0 vs 0.5\)"):
        train(override(config, ["method.clip=0.5"]), fastclip_run, resume=True)
    with pytest.raises(RobustclipError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True)
    first = (fastclip_run / "environment.json").read_text()
    train(config, fastclip_run, resume=True)  # already done: no epoch runs, nothing changes
    assert len(rows(fastclip_run)) == 2
    # each start leaves its record: the first one kept, the resume's beside it
    assert (fastclip_run / "environment.json").read_text() == first
    resumed = json.loads((fastclip_run / "environment-resume-1.json").read_text())
    assert resumed["device"] == "cpu" and resumed["world_size"] == 1
    (tmp_path / "c.toml").write_text(to_toml(tiny("none")))
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "environment-resume-4.json").write_text("{}")  # an old run's record
    args = ["train", "--config", str(tmp_path / "c.toml"), "--out", str(out)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and refused.output.count("\n") == 1
    assert refused.output.startswith("error: run directory")
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.pt").exists()
    assert not (out / "environment-resume-4.json").exists()
    record = json.loads((out / "environment.json").read_text())
    assert record["command"] == shlex.join(sys.argv)  # CliRunner leaves sys.argv as pytest's


def test_runs_from_before_tracking_load_and_resume(tmp_path, monkeypatch):
    """A none run saved before none had tracking-only wrappers (plain layers in its state
    dict) loads into the plain model and resumes as one."""
    real = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda *a, **k: real(*a, track=False, **k))
    train(tiny("none"), tmp_path / "old")
    monkeypatch.undo()
    assert "conv1.weight" in read_checkpoint(tmp_path / "old")["state_dict"]
    assert wrappers(robustclip.load(tmp_path / "old")) == []
    train(tiny("none", "train.epochs=2"), tmp_path / "old", resume=True)
    assert [r["epoch"] for r in rows(tmp_path / "old")] == ["0", "1"]
    assert "conv1.weight" in read_checkpoint(tmp_path / "old")["state_dict"]


# ---------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(fastclip_run):
    model = robustclip.load(fastclip_run)
    assert not model.training and model.robustclip_meta["epoch"] == 1
    assert model.robustclip_meta["method"]["name"] == "fastclip"
    assert "state_dict" not in model.robustclip_meta
    raw = torch.load(fastclip_run / "last.pt", weights_only=True)
    assert all(torch.equal(v, raw["state_dict"][k]) for k, v in model.state_dict().items())
    x, y = synthetic(96 + 32, seed=1).tensors  # the run's synthetic data (seed = train.seed)
    with torch.no_grad():
        acc = (model(x[96:]).argmax(1) == y[96:]).float().mean()
    assert float(acc) == pytest.approx(float(rows(fastclip_run)[-1]["test_acc"]))


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload.mark, ())

    @staticmethod
    def mark():
        _Payload.ran = True


def test_unsafe_corrupt_and_foreign_files_are_refused(tmp_path, fastclip_run):
    ckpt = torch.load(fastclip_run / "last.pt", weights_only=True)
    torch.save({**ckpt, "extra": _Payload()}, tmp_path / "code.pt")
    with pytest.raises(RobustclipError, match="carries code"):
        robustclip.load(tmp_path / "code.pt")
    assert not _Payload.ran
    data = (fastclip_run / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save(ckpt["state_dict"], tmp_path / "bare.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, message in [("cut.pt", "corrupt"), ("text.pt", "corrupt"),
                          ("bare.pt", "not a robustclip checkpoint"), ("missing.pt", "no checkpoint")]:
        with pytest.raises(RobustclipError, match=message) as err:
            robustclip.load(tmp_path / name)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("text, message", [
    ("[train]\nepcohs = 3\n", r"unknown key 'train.epcohs' in .*; did you mean 'epochs'\? valid: epochs, batch_size"),
    ("[trian]\nepochs = 3\n", r"unknown section 'trian' .*did you mean 'train'"),
    ("[train]\nepochs = 'three'\n", r"train.epochs must be int, got 'three'"),
    ("[train]\nlr = -1\n", r"train.lr must be >= 0"),
    ("[model]\nname = 'simpleconvv'\n", r"unknown value 'simpleconvv' for model.name .*did you mean 'simpleconv'"),
    ("[method]\nname = 'fastclip\n", r"cannot read config"),
])
def test_config_errors(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(RobustclipError, match=message):
        load_config(tmp_path / "c.toml")


def test_overrides_typed_by_schema():
    config = override(Config(), ["train.lr=0.01", "train.epochs=3", "method.name=gouk",
                                 "data.synthetic=true", "model.args.channels=8", "train.device=cuda:1"])
    assert (config.train.lr, config.train.epochs, config.method.name) == (0.01, 3, "gouk")
    assert config.data.synthetic is True and config.model.args == {"channels": 8}
    assert config.train.device == "cuda:1" and isinstance(override(Config(), ["train.lr=1"]).train.lr, float)
    for bad, message in [("train.epochs=abc", "train.epochs must be int, got 'abc'"),
                         ("train.lr", "--set expects section.key=value"),
                         ("train.momentun=0.5", "did you mean 'momentum'"),
                         ("log.progress=yes", "log.progress must be bool")]:
        with pytest.raises(RobustclipError, match=message):
            override(Config(), [bad])
    assert differences(Config(), override(Config(), ["train.epochs=3", "train.seed=2"])) == ["train.seed (1 vs 2)"]


def test_cli_config_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--config", str(ROOT / "configs/mnist-simpleconv-none.toml"),
                                       "--out", str(tmp_path / "r"), "--set", "train.epoch=2"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "did you mean 'epochs'" in result.output
    assert not (tmp_path / "r").exists()


CONFIG_NAME = re.compile(r"(?P<dataset>[a-z0-9]+)-(?P<model>[a-z0-9]+)(?P<wide>-wide)?-"
                         r"(?P<method>[a-z-]+?)(-(?P<loss>fgsm|trades|margin))?(?P<variants>(-(rawstart|long|e[0-9]+))*)")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path):
    """A config's name says what it holds: dataset-model[-wide]-method[-loss][-variant...],
    the loss being fgsm, trades or margin, a variant rawstart, long or eN (N epochs)."""
    config = load_config(path)
    assert from_dict(tomllib.loads(to_toml(config))) == config
    name = CONFIG_NAME.fullmatch(path.stem)
    assert name, path.stem
    assert (config.data.dataset, config.model.name.split("-")[0], config.method.name) == (
        name["dataset"], name["model"], name["method"])
    assert bool(name["wide"]) == (config.model.args.get("width", 16) > 16)
    if name["loss"] in ("fgsm", "trades"):  # issue 14's settings: FGSM-RS at eps 0.3
        assert (config.train.adversarial.attack, config.train.adversarial.eps) == ("fgsm-rs", 0.3)
    assert (config.train.adversarial.loss == "trades") == (name["loss"] == "trades")
    assert (config.train.loss == "lipschitz-margin") == (name["loss"] == "margin")
    variants = name["variants"].split("-")[1:]
    assert ("rawstart" in variants) == (not config.train.adversarial.clip_start)
    assert all(int(v[1:]) == config.train.epochs for v in variants if v.startswith("e"))


def test_a_run_that_never_clipped_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="robustclip.train"):
        train(tiny("fastclip", "method.init_delay=100"), tmp_path / "idle")
    assert "before the first clip event" in caplog.text and "trained as 'none'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="robustclip.train"):
        train(tiny("fastclip"), tmp_path / "clipped")  # init_delay 1 of 3 steps
        train(tiny("none", "method.init_delay=100"), tmp_path / "none")  # wrappers only track
    assert "before the first clip event" not in caplog.text
