"""robustclip: spectral-norm control of implicitly linear layers and robustness evaluation."""
__version__ = "0.1.0"
