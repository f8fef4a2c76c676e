"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustclip.data import synthetic
from helpers import SHAPE, tiny_classifier


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, immune to oversubscribed cores, and matches the
    subprocesses the distributed and resume tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Data root holding the real, verified MNIST: the user cache, fetched once per machine."""
    from robustclip.data import data_root, fetch

    return fetch("mnist", data_root(None), progress=False)


def pytest_collection_modifyitems(items):
    """A test that takes the real MNIST (``mnist_root``) is marked ``mnist``, so that
    ``-m "not mnist"`` leaves out everything that needs the data."""
    for item in items:
        if "mnist_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mnist)


@pytest.fixture(scope="module")
def models():
    """Two tiny trained classifiers of 1x10x10 synthetic images (tests/helpers.py)."""
    return {"a": tiny_classifier(0), "b": tiny_classifier(1)}


@pytest.fixture(scope="module")
def data():
    """100 held-out synthetic samples (same class prototypes as training, fresh noise)."""
    return tuple(t[600:] for t in synthetic(700, SHAPE, 10, seed=0).tensors)
