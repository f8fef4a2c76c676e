"""robustclip: spectral-norm control of implicitly linear layers and robustness evaluation.

The names below are imported on first use (PEP 562), so that ``robustclip --help`` and
``--version`` answer without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "clip_model": "robustclip.api",
    "evaluate": "robustclip.api",
    "lipschitz": "robustclip.api",
    "Lipschitz": "robustclip.api",
    "load": "robustclip.checkpoint",
    "SpectralClip": "robustclip.clip",
    "SpectralNorm": "robustclip.clip",
    "circular_conv_singular_values": "robustclip.spectral",
    "dense_operator": "robustclip.spectral",
    "dense_singular_values": "robustclip.spectral",
    "singular_values": "robustclip.spectral",
    "spectral_estimate": "robustclip.spectral",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
