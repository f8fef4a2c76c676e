"""robustclip.files: the atomic writer, the TOML reader and the device parser."""
from __future__ import annotations

import pytest
import torch

from robustclip.errors import RobustclipError
from robustclip.files import TEMP_PREFIX, atomic_write, read_toml, resolve_device, write_text


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    write_text(path, "old\n")
    write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "table.csv"
    write_text(path, "old\n")

    def half(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half)
    assert path.read_text() == "old\n"
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_read_toml_names_the_file(tmp_path):
    with pytest.raises(RobustclipError, match=r"suite .*nope.toml does not exist"):
        read_toml(tmp_path / "nope.toml", "suite")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(RobustclipError, match=r"cannot read config .*bad.toml"):
        read_toml(bad, "config")
    good = tmp_path / "good.toml"
    good.write_text("a = 1\n")
    assert read_toml(good, "config") == {"a": 1}


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(RobustclipError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
