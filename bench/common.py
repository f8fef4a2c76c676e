"""What every benchmark here shares: the device/threads/rounds options and their setup."""
from __future__ import annotations

import argparse
import logging

import torch

from robustclip.files import resolve_device


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with --rounds,
    --device and --threads."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, log to stderr, seed torch; return the device of --device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    return resolve_device(args.device)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA work is asynchronous), so that timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
