"""Tests for robustclip.environment: the record of versions, machine, git and command line."""
from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

import robustclip
from robustclip.environment import cpu_model, environment, git_state, write_environment

KEYS = {"robustclip", "torch", "torchvision", "torchattacks", "python", "platform", "cpu",
        "cpu_cores", "torch_threads", "world_size", "command", "time_utc"}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


def test_record_keys_versions_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["robustclip", "train", "--out", "my run", "--set", "a=b"])
    record = json.loads(write_environment(tmp_path, torch.device("cpu"), world_size=2).read_text())
    assert KEYS | {"device", "device_name"} <= set(record)
    assert record["command"] == "robustclip train --out 'my run' --set a=b"
    assert (record["robustclip"], record["torch"], record["torchvision"]) == (
        robustclip.__version__, torch.__version__, torchvision.__version__)
    assert record["python"] == platform.python_version() and record["world_size"] == 2
    assert record["device"] == "cpu" and record["device_name"] == record["cpu"] == cpu_model() != ""
    when = datetime.datetime.fromisoformat(record["time_utc"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=5)
    assert "device" not in environment()  # no device given: none guessed


@needs_git
def test_git_commit_and_dirty_flag_in_a_repository(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "__init__.py"
    source.write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "pkg/__init__.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(source) == {"commit": head, "dirty": False}
    (tmp_path / "notes.txt").write_text("untracked files do not make it dirty")
    assert git_state(source) == {"commit": head, "dirty": False}
    source.write_text("x = 2\n")
    assert git_state(source) == {"commit": head, "dirty": True}
    untracked = tmp_path / "pkg" / "new.py"
    untracked.write_text("")
    assert git_state(untracked) is None  # e.g. an installed copy inside someone's repository


@needs_git
def test_no_git_entry_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    outside = tmp_path / "__init__.py"
    outside.write_text("")
    assert git_state(outside) is None
    monkeypatch.setattr(robustclip, "__file__", str(outside))
    assert "git" not in environment("cpu")
    monkeypatch.undo()
    mine = git_state(robustclip.__file__)  # this checkout, when the tests run from one
    assert environment("cpu").get("git") == mine
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert git_state(robustclip.__file__) is None and "git" not in environment("cpu")
