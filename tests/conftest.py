"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Data root holding the real, verified MNIST: the user cache, fetched once per machine."""
    from robustclip.data import data_root, fetch

    return fetch("mnist", data_root(None), progress=False)
