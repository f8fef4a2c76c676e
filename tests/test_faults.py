"""Faults of `robustclip train` (issue #13): a full disk, a file-size limit, a read-only
directory, a killed save, a second writer, a stale lock, a cut config, a missing last.pt,
bad model arguments.  Each test injects the fault and asserts one `error:` line (exit 2)
and that nothing of the run is lost."""
from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robustclip.train as train_mod
from robustclip import locks
from robustclip.checkpoint import read_checkpoint
from robustclip.cli import main
from robustclip.config import to_toml
from robustclip.files import TEMP_PREFIX
from robustclip.train import train
from test_train import rows, tiny
from helpers import refused as _one_error_line


def _train_cli(*args: str):
    return CliRunner().invoke(main, ["train", *args])


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny("none", "train.epochs=2")))
    return path


@pytest.fixture
def run(tmp_path, config_file) -> Path:
    """A finished 2-epoch run of a tiny model."""
    out = tmp_path / "run"
    result = _train_cli("--config", str(config_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def _no_temporaries(folder: Path) -> None:
    assert not list(folder.glob(f"{TEMP_PREFIX}*")), list(folder.iterdir())


# ------------------------------------------------------------------ 1: model arguments

def test_bad_model_argument_is_one_line(tmp_path, config_file):
    result = _train_cli("--config", str(config_file), "--out", str(tmp_path / "r"),
                        "--set", "model.args.channels=-4")
    _one_error_line(result, "model 'simpleconv': bad argument(s) {'channels': -4}", "negative dimension")


# ------------------------------------------------------- 2, 4, 5: the disk refuses writes

def test_read_only_run_dir_fails_before_training(tmp_path, config_file, monkeypatch):
    """EROFS on the rename into the run dir (chmod does not stop root): one line, and no
    epoch is trained first."""
    out, real_replace = tmp_path / "ro", os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent == out:
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(train_mod, "_run_epoch", lambda *a, **k: pytest.fail("trained before the check"))
    result = _train_cli("--config", str(config_file), "--out", str(out))
    _one_error_line(result, f"cannot write run directory {out}", "config.toml", "Read-only file system (EROFS)")
    _no_temporaries(out)
    assert not locks.lock_path(out).exists()


def test_disk_full_while_saving_a_checkpoint(run, config_file, monkeypatch):
    """ENOSPC in the middle of epoch 2's last.pt: last.pt keeps epoch 1, metrics.csv has no
    row that last.pt lacks, no temporary file; a resume then finishes the run."""
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if "last.pt" in str(getattr(f, "name", f)):
            saves.append(1)
            if len(saves) == 2:  # the second epoch of this session
                f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    result = _train_cli("--resume", str(run), "--epochs", "4")
    _one_error_line(result, str(run / "last.pt"), "No space left on device (ENOSPC)")
    assert read_checkpoint(run)["epoch"] == 2
    assert [r["epoch"] for r in rows(run)] == ["0", "1", "2"]
    _no_temporaries(run)
    assert not locks.lock_path(run).exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert _train_cli("--resume", str(run), "--epochs", "4").exit_code == 0
    assert [r["epoch"] for r in rows(run)] == ["0", "1", "2", "3"] and read_checkpoint(run)["epoch"] == 3


def _limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no RLIMIT_FSIZE")
def test_file_size_limit_at_resume_start(run):
    """A real limit (RLIMIT_FSIZE, EFBIG) in a subprocess: the lock fits, config.toml does
    not.  One line, exit 2, the run's files as they were, no temporary file."""
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "robustclip", "train", "--resume", str(run), "--epochs", "3"],
                          capture_output=True, text=True, preexec_fn=_limited(200), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write run directory {run}"), proc.stderr
    assert "config.toml: File too large (EFBIG)" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    _no_temporaries(run)
    assert not locks.lock_path(run).exists()


# ---------------------------------------------------------- 3: leftovers of an old run

def test_overwrite_removes_the_old_run_and_resume_the_temporaries(run, config_file):
    events = [p.name for p in run.iterdir() if p.name.startswith("events.out.tfevents.")]
    assert len(events) == 1
    (run / f"{TEMP_PREFIX}last.pt.killed").write_bytes(b"")  # a save killed mid-way
    assert _train_cli("--resume", str(run)).exit_code == 0
    _no_temporaries(run)
    (run / f"{TEMP_PREFIX}best.pt.killed").write_bytes(b"")
    (run / "notes.txt").write_text("mine")
    result = _train_cli("--config", str(config_file), "--out", str(run), "--overwrite",
                        "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    _no_temporaries(run)
    new_events = [p.name for p in run.iterdir() if p.name.startswith("events.out.tfevents.")]
    assert len(new_events) == 1 and new_events != events
    assert [r["epoch"] for r in rows(run)] == ["0"] and (run / "notes.txt").read_text() == "mine"


# -------------------------------------------------------- 6, 7: what a resume trusts

def test_resume_takes_the_checkpoint_config_and_refuses_a_cut_config_toml(run):
    toml = run / "config.toml"
    text = toml.read_text()
    toml.write_text(text[: text.index("[train]")])  # cut short: [train] and [log] lost
    result = _train_cli("--resume", str(run), "--epochs", "3")
    _one_error_line(result, f"{toml} does not match the config in {run / 'last.pt'}", "train.batch_size (32 vs 128)")
    assert len(rows(run)) == 2 and read_checkpoint(run)["epoch"] == 1
    toml.unlink()  # restored from last.pt
    assert _train_cli("--resume", str(run), "--epochs", "3").exit_code == 0
    assert toml.read_text() == text.replace("epochs = 2", "epochs = 3")
    assert read_checkpoint(run)["config"]["train"]["lr"] == tiny("none").train.lr


def test_resume_refuses_a_different_given_config(run, tmp_path):
    result = _train_cli("--resume", str(run), "--set", "train.lr=0.5")
    _one_error_line(result, "cannot resume", "train.lr (0.001 vs 0.5)")
    other = tmp_path / "other.toml"
    other.write_text(to_toml(tiny("none", "train.epochs=3", "train.seed=7")))
    _one_error_line(_train_cli("--resume", str(run), "--config", str(other)), "train.seed (1 vs 7)")
    assert len(rows(run)) == 2


def test_resume_without_last_pt_refuses(run):
    (run / "last.pt").unlink()
    best, metrics = (run / "best.pt").read_bytes(), (run / "metrics.csv").read_bytes()
    result = _train_cli("--resume", str(run))
    _one_error_line(result, f"no last.pt in {run}: nothing to resume; --overwrite to start again")
    assert (run / "best.pt").read_bytes() == best and (run / "metrics.csv").read_bytes() == metrics
    with pytest.raises(Exception, match="no last.pt"):
        train(None, run, resume=True)


# ---------------------------------------------------------- 8: one writer per run dir

@pytest.fixture
def live_pid():
    """The pid of a live process other than this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused(run, config_file, live_pid):
    lock = locks.lock_path(run)
    lock.write_text(f"{live_pid} {socket.gethostname()}\n")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for args in (["--config", str(config_file), "--out", str(run), "--overwrite"], ["--resume", str(run)]):
        _one_error_line(_train_cli(*args), f"run directory {run} is in use by robustclip pid {live_pid}",
                        str(lock))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert lock.read_text().split()[0] == str(live_pid)  # the holder's lock is left alone


def test_two_concurrent_trains_one_is_refused(tmp_path, config_file):
    """Two real processes on one run dir: one trains, the other is refused while it runs."""
    slow = tmp_path / "slow.toml"
    slow.write_text(to_toml(tiny("none", "train.epochs=100000")))
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "robustclip", "train", "--config", str(slow), "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "config.toml").exists() and first.poll() is None:
            subprocess.run(["sleep", "0.05"])
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([*cmd, "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2 and f"is in use by robustclip pid {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


def test_stale_lock_is_taken_over(run, dead_pid, caplog):
    lock = locks.lock_path(run)
    lock.write_text(f"{dead_pid} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="robustclip.locks"):
        result = _train_cli("--resume", str(run), "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert f"stale lock {lock} of pid {dead_pid}" in caplog.text
    assert not lock.exists() and len(rows(run)) == 3


def test_lock_of_another_host_is_refused(tmp_path):
    folder = tmp_path / "d"
    locks.lock_path(folder).write_text("1 elsewhere.example\n")
    with pytest.raises(locks.LockedError, match="in use by robustclip pid 1 on elsewhere.example"):
        with locks.locked(folder):
            pass
    with locks.locked(tmp_path / "e") as held:
        assert held.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(locks.LockedError, match="already locked by this process"):
            locks.acquire(tmp_path / "e")
    assert not held.exists()
