"""robustclip: spectral-norm control of implicitly linear layers and robustness evaluation."""
__version__ = "0.1.0"

from robustclip.checkpoint import load
from robustclip.clip import SpectralClip, SpectralNorm
from robustclip.spectral import (
    circular_conv_singular_values,
    dense_operator,
    dense_singular_values,
    singular_values,
    spectral_estimate,
)

__all__ = [
    "SpectralClip",
    "SpectralNorm",
    "load",
    "circular_conv_singular_values",
    "dense_operator",
    "dense_singular_values",
    "singular_values",
    "spectral_estimate",
]
