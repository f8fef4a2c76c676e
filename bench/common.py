"""What every benchmark here shares: the device/threads/rounds options and their setup."""
from __future__ import annotations

import argparse
import functools
import logging
import statistics
from typing import Callable

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


def interleaved(sides: dict[str, Callable[..., tuple[float, float]]], work: tuple, rounds: int,
                log: logging.Logger) -> dict[str, float]:
    """Run each side ``rounds`` times, alternating; each call returns (seconds, robust
    accuracy).  Returns the median seconds per side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, run in sides.items():
            seconds, accuracy = run(*work)
            times[name].append(seconds)
            log.info("round %d %-10s %.3f s  robust accuracy %.4f", r + 1, name, seconds, accuracy)
    return {name: statistics.median(t) for name, t in times.items()}


def print_ratio(median: dict[str, float], ours: str, bare: str, what: dict[str, str]) -> float:
    """Print both medians and the ratio ours / bare against the 5% goal; return the ratio."""
    width = max(map(len, what.values()))
    for name in (bare, ours):
        print(f"{what[name]:<{width}}  {median[name]:.3f} s (median)")
    ratio = median[ours] / median[bare]
    print(f"{'ratio':<{width}}  {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%, goal <= +5%)")
    return ratio


def bare_accuracy(model, attack, x, y, batch_size: int, device: torch.device) -> float:
    """Robust accuracy of a torchattacks ``attack`` run batch by batch, as a user writes it."""
    correct = torch.zeros((), device=device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        adv = attack(xb, yb)
        with torch.no_grad():
            correct += (model(adv).argmax(1) == yb).sum()
    return float(correct) / len(x)


# ------------------------------------------------------------------ operator counts


#: aten ops that change metadata or allocate, in place or not, and compute nothing
_METADATA_OPS = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                           "aten::new_empty_strided", "aten::resize_",
                           "aten::as_strided_", "aten::_unsafe_view", "aten::set_", "aten::detach_",
                           "aten::squeeze_", "aten::unsqueeze_", "aten::t_", "aten::transpose_"})


@functools.lru_cache(maxsize=None)
def _is_metadata_op(name: str) -> bool:
    """Whether the aten op ``name`` (``aten::view``) computes nothing: every overload is a
    view (returns an alias of an input, writes nothing), or it is in :data:`_METADATA_OPS`.
    Such ops launch no kernel on a GPU."""
    if name in _METADATA_OPS:
        return True
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return False
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        if not any(isinstance(a.type, torch.TensorType) for a in schema.arguments):
            continue  # aten::slice.str and the like
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        aliased = schema.returns and all(r.alias_info is not None for r in schema.returns)
        if writes or not aliased:
            return False
    return True


def operator_counts(step: Callable[[], None], n: int) -> tuple[float, float]:
    """Run ``step`` ``n`` times under ``torch.profiler`` (CPU activity); return the mean
    number per step of (operators, kernels).

    operators: aten ops dispatched from Python or by the autograd engine, i.e. ``aten::``
    events with no ``aten::`` event above them (``F.conv2d`` is one, whatever it calls).
    kernels: aten ops that compute (not views, reshapes, ``detach`` or allocations) with
    no computing aten op below them: on a GPU about one kernel launch each (``matmul``
    counts as its ``bmm``; an op that computes and also calls a computing op, such as the
    CPU ``addmm`` copying its bias, counts once).  Both are exact counts, deterministic on
    the CPU for a deterministic step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    operators = kernels = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        operators += parent is None
        kernels += _computes(e) and not _computes_below(e)
    return operators / n, kernels / n


def _computes(event) -> bool:
    return event.name.startswith("aten::") and not _is_metadata_op(event.name)


def _computes_below(event) -> bool:
    """Whether a profiler event has a computing aten op among its descendants."""
    return any(_computes(c) or _computes_below(c) for c in event.cpu_children)
