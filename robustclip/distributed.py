"""Distributed training and evaluation on torch.distributed, as launched by torchrun.

Launching.  :func:`launch` reads torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it the run is one process and
every helper here is a no-op.  Backend: ``nccl`` on CUDA, ``gloo`` on CPU, unless the
``backend`` argument (CLI ``--backend``) or ``$ROBUSTCLIP_BACKEND`` names one.  On CUDA
rank r uses ``cuda:$LOCAL_RANK``.  The process group and every collective time out after
``$ROBUSTCLIP_TIMEOUT`` seconds (default 600): a rank that dies or stalls makes the others
fail with a one-line :class:`RobustclipError` instead of hanging.

Sharding does not depend on the rank layout.  Training: each epoch's global batches are
cut from a permutation seeded by (seed, epoch) (:func:`epoch_batches`); rank r takes
the r-th contiguous share of each (:func:`part`), and the loss is weighted so that the
all-reduced gradient is the mean over the global batch.  Attack evaluation
(robustclip.evaluation): whole batches, batch i on rank i mod world size
(:func:`my_batches`), so per-batch seeds are those of a single process, and the
per-batch results are all-gathered (:func:`all_gather`); it shards under any process
group, the one :func:`launch` opened or the caller's (:func:`current`).

Spectral state across replicas (:func:`sync_after_step`).  Rank 0 is the authority for
everything a training step changes outside the gradient all-reduce:

- every rank runs the same spectral computation.  Clip events read only state that is
  identical on all ranks at the start of a step (weights, wrapper buffers, BatchNorm
  running statistics) and draw their fresh vectors from a generator seeded by (layer,
  step), so the forward of a clip-event step uses the same clipped weights everywhere
  and the gradients agree;
- BatchNorm running statistics are local: each rank updates them from its own shard,
  and a conv+BN composite's tracking and per-step rescale (the optimiser post-step hook
  of robustclip.clip) read them.  So after each optimiser step, one coalesced broadcast
  from rank 0 overwrites on the other ranks every buffer (running statistics, the
  wrappers' ``vectors``/``sigmas``/``step``, Miyato's u and v), the weight each per-step
  rescale multiplied, and, at a clip-event step, the weights of the wrappers that
  clipped.  A gamma rescaled against rank 0's running statistics thus always travels
  with those statistics, and at every step boundary all ranks hold rank 0's state
  exactly.  This is DDP's own convention (buffers from rank 0), moved from the start of
  the next forward to the point where the state changes, so DDP's ``forward_sync_buffers``
  is off.  Bit-level differences that non-deterministic GPU kernels may leave in the
  replicated computation are erased there instead of accumulating.

Cost per step: one broadcast of the buffers (the wrappers' vectors dominate: tracked
vectors x input size per layer) plus the rescaled weights (a composite's gamma; every
weight for the ``gouk`` baseline).  Rejected alternatives: SyncBatchNorm (CUDA only, and
a change of training semantics); averaging running statistics before each rescale
(leaves GPU non-determinism to drift).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from robustclip.errors import RobustclipError, first_line
from robustclip.files import describe

log = logging.getLogger(__name__)

ENV_BACKEND = "ROBUSTCLIP_BACKEND"
ENV_TIMEOUT = "ROBUSTCLIP_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
BACKENDS = ("gloo", "nccl")
#: Markers of a failed collective in gloo / NCCL / c10d messages (they raise RuntimeError).
_COMM_FAILURES = ("gloo", "nccl", "tcpstore", "processgroup", "connection reset",
                  "connection closed", "timed out")

T = TypeVar("T")
_ACTIVE: list["Context"] = []  # the Context of the multi-rank launch() block being run


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, local rank, device, backend (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and logs progress."""
        return self.rank == 0


def current() -> Context:
    """The rank layout in force: that of the enclosing multi-rank :func:`launch`; else that
    of a process group the caller initialised (device left as CPU); else one process."""
    if _ACTIVE:
        return _ACTIVE[-1]
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), backend=dist.get_backend())
    return Context()


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, or None when they are absent."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not any(name in os.environ for name in names):
        return None
    try:
        rank, world, local = (int(os.environ[name]) for name in names)
    except (KeyError, ValueError):
        raise RobustclipError("torchrun environment incomplete or malformed: "
                              + ", ".join(f"{n}={os.environ.get(n)!r}" for n in names)) from None
    if not (0 <= rank < world and local >= 0):
        raise RobustclipError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def _timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT)
    try:
        value = DEFAULT_TIMEOUT if text is None else float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RobustclipError(f"${ENV_TIMEOUT} must be a positive number of seconds, got {text!r}")
    return value


def _backend(device: torch.device, backend: str | None) -> str:
    name = backend or os.environ.get(ENV_BACKEND) or ("nccl" if device.type == "cuda" else "gloo")
    if name not in BACKENDS:
        raise RobustclipError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "nccl" and device.type != "cuda":
        raise RobustclipError("backend nccl needs CUDA; use gloo on CPU")
    if not dist.is_backend_available(name):
        raise RobustclipError(f"backend {name!r} is not available in this torch build")
    return name


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """On CUDA, ``cuda:LOCAL_RANK`` (made current); CPU stays CPU."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise RobustclipError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                              f"device(s): start at most one rank per GPU")
    if device.index is not None and device.index != local_rank:
        log.warning("ignoring %s: under torchrun each rank uses cuda:LOCAL_RANK", device)
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _is_comm_failure(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_FAILURES))


@contextlib.contextmanager
def launch(device: torch.device, backend: str | None = None) -> Iterator[Context]:
    """The :class:`Context` of this process; under torchrun, a process group for the block.

    device: the resolved device kind (CUDA: replaced by ``cuda:LOCAL_RANK``).  A process
    group that the caller already initialised is used as it is and left open.  Inside the
    block, a failed collective (a rank died, or none answered within the timeout) becomes
    a one-line :class:`RobustclipError`; ranks other than 0 log warnings and errors only.
    """
    env = torchrun_env()
    owned = env is not None and env[1] > 1 and not dist.is_initialized()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env[2] if env else rank % max(torch.cuda.device_count(), 1)
        name = dist.get_backend()
    elif owned:
        rank, world, local = env
        name = _backend(device, backend)
    else:
        yield Context(device=device)
        return
    timeout = _timeout()
    device = _rank_device(device, local)
    if owned:
        log.debug("rank %d/%d: init_process_group(%s, timeout %gs) on %s", rank, world, name, timeout, device)
        try:
            dist.init_process_group(name, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as err:
            raise RobustclipError(f"rank {rank}: cannot join the process group of {world} ranks "
                                  f"within {timeout:g} s: {first_line(err)[:300]}") from None
    package = logging.getLogger("robustclip")
    level = package.level
    if rank:
        package.setLevel(logging.WARNING)
    _ACTIVE.append(Context(rank, world, local, device, name, timeout))
    try:
        yield _ACTIVE[-1]
    except Exception as err:
        if not _is_comm_failure(err):
            raise
        raise RobustclipError(f"rank {rank}: lost the other ranks (one exited, or none answered "
                              f"within {timeout:g} s; ${ENV_TIMEOUT}): {first_line(err)[:300]}") from None
    finally:
        _ACTIVE.pop()
        package.setLevel(level)
        if owned:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- sharding

def check_world(ctx: Context, n: int, what: str) -> None:
    """One-line error when there are fewer ``what`` (n of them) than ranks."""
    if ctx.world_size > n:
        raise RobustclipError(f"world size {ctx.world_size} exceeds the {n} {what}: "
                              f"every rank needs at least one; start fewer ranks")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, min_size: int = 1) -> list[Tensor]:
    """The global batches of an epoch: a permutation of range(n) seeded by (seed, epoch),
    cut into ``batch_size`` chunks; a last chunk smaller than ``min_size`` is dropped."""
    g = torch.Generator().manual_seed(zlib.crc32(f"shuffle/{seed}/{epoch}".encode()))
    batches = list(torch.randperm(n, generator=g).split(batch_size))
    return batches if not batches or len(batches[-1]) >= min_size else batches[:-1]


def part(m: int, ctx: Context) -> slice:
    """This rank's contiguous share of m items (shares differ by at most one, in rank order)."""
    q, r = divmod(m, ctx.world_size)
    start = ctx.rank * q + min(ctx.rank, r)
    return slice(start, start + q + (ctx.rank < r))


def my_batches(count: int, ctx: Context) -> range:
    """The batch indices (of ``count`` whole batches) this rank evaluates: rank, rank + W, ..."""
    return range(ctx.rank, count, ctx.world_size)


# ---------------------------------------------------------------------------- collectives

def all_reduce_sum(tensor: Tensor, ctx: Context) -> Tensor:
    """``tensor`` summed over the ranks, in place."""
    if ctx.distributed:
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def broadcast(tensors: Sequence[Tensor], ctx: Context) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's: one broadcast per (device, dtype)."""
    if not ctx.distributed:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in {id(t): t for t in tensors}.values():
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, 0)
        if not ctx.main:
            for t, chunk in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(chunk.view_as(t))


def on_main(ctx: Context, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0, its result sent to every rank; its RobustclipError (or
    OSError: a full disk, a read-only directory) raised on all, as one line."""
    if not ctx.distributed:
        return fn()
    box: list[Any] = [None]
    if ctx.main:
        try:
            box[0] = (fn(), None)
        except RobustclipError as err:
            box[0] = (None, str(err))
        except OSError as err:
            box[0] = (None, describe(err))
    dist.broadcast_object_list(box, 0)
    result, error = box[0]
    if error is not None:
        raise RobustclipError(error)
    return result


def all_gather(obj: T, ctx: Context) -> list[T]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- training

def data_parallel(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` in DistributedDataParallel, rank 0's parameters and buffers broadcast here
    (not at each forward: see the module doc).  One process: ``model`` itself."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    # torch before forward_sync_buffers: broadcast_buffers=False also skips the buffers'
    # broadcast at construction, so it is done here
    broadcast(list(model.buffers()), ctx)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def spectral_state(model: nn.Module) -> list[Tensor]:
    """What a training step changed outside the gradient all-reduce: every buffer, the
    weight each per-step rescale multiplied, and the weights of the layers that clipped."""
    tensors = list(model.buffers())
    for m in model.modules():
        if getattr(m, "is_spectral_wrapper", False):
            tensors += m.changed_outside_gradient()
    return tensors


def sync_after_step(model: nn.Module, ctx: Context) -> None:
    """After ``optimizer.step()`` (and its rescale hook): rank 0's spectral state to all ranks.

    This is where the scheme of the module doc happens: afterwards every rank holds the
    same weights, wrapper buffers and BatchNorm running statistics as rank 0.
    """
    broadcast(spectral_state(model), ctx)
