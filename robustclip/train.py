"""Training runs on a config (SGD or Adam; a step or cyclic schedule), with metrics,
TensorBoard, checkpoints and resume.

A run directory holds:

- ``config.toml``: the resolved config;
- ``metrics.csv``: one row per epoch (0-based): epoch, train_loss, train_acc, test_loss,
  test_acc (accuracies as fractions in [0, 1]; train_loss is the loss the optimiser
  minimised, train_acc the accuracy of the logits robustclip.objectives scores: on the
  adversarial examples for adversarial training's "adversarial" loss, on the clean
  images otherwise), with adversarial training fgsm_acc and apgd_acc (or pgd_acc: FGSM-RS
  and APGD-CE or PGD accuracy on held-out test samples), catastrophic_overfitting (1 when
  the latter fell or trails FGSM-RS's far behind, see
  robustclip.adversarial.OverfittingMonitor) and
  adv_eps (the eps of the epoch's last step), ``sigma/<layer>`` (each tracked layer's
  top-k singular values, ``sigma/<layer>/i`` for i > 1), lr (at the epoch's first step),
  wall_time (seconds the epoch took, training and testing);
- TensorBoard events: the same scalars at the global training step, plus each layer's
  singular-value trace every ``log.log_every`` steps, and the flattened config as hparams
  (metric ``test/acc``: TensorBoard's HPARAMS tab shows its last value);
- ``last.pt`` (every epoch) and ``best.pt`` (best test accuracy): see robustclip.checkpoint;
- ``environment.json`` (robustclip.environment: versions, machine, device, git commit,
  command line, time) written when the run starts, and ``environment-resume-<n>.json``
  for its n-th resume (the earlier records are kept).

Each epoch saves ``best.pt`` (if improved), ``last.pt``, then ``metrics.csv``, so that
metrics.csv never holds a row that last.pt does not.  The run directory is locked for the
whole run (robustclip.locks; rank 0 holds it under torchrun).

A resumed run continues from ``last.pt`` (which must exist), with the config stored in it
(config.toml and a given config must match it but for train.epochs, train.device and
log.progress), and is exact: weights, optimiser and scheduler,
wrapper buffers and every RNG (global, augmentation) are restored, and the shuffling is a
function of (seed, epoch), so on CPU it ends bit-for-bit where an uninterrupted run ends.

Under torchrun the run is data parallel (see robustclip.distributed): ``train.batch_size``
is the global batch, split across the ranks (DDP averages the gradients, and the loss is
weighted so that the average is the global batch mean); augmentation draws for the whole
batch; metrics are all-reduced; rank 0 alone writes the run directory.  A checkpoint
holds no trace of the world size, so a run resumes under any number of ranks.  Per-rank
BatchNorm batch statistics are those of the rank's share (as with any DDP run).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset
from tqdm import tqdm

from robustclip.adversarial import OverfittingMonitor, step_ratio
from robustclip.checkpoint import (load_state, model_from_checkpoint, predates_tracking,
                                   read_checkpoint, save_checkpoint)
from robustclip.config import (Config, TrainConfig, differences, from_dict, load_config, override, to_dict,
                              to_toml)
from robustclip.data import SYNTHETIC_SIZES, load, synthetic_splits
from robustclip.distributed import (Context, all_reduce_sum, check_world, data_parallel, epoch_batches,
                                    launch, on_main, part, sync_after_step)
from robustclip.environment import write_environment
from robustclip.errors import RobustclipError
from robustclip.files import atomic_write, describe, remove_temporaries, resolve_device, write_text
from robustclip.locks import locked
from robustclip.models import build_model, wrappers
from robustclip.objectives import Objective

log = logging.getLogger(__name__)

RUN_FILES = ("config.toml", "metrics.csv", "last.pt", "best.pt")
ENVIRONMENT_FILE = re.compile(r"environment(-resume-(\d+))?\.json")


def _datasets(config: Config, data_dir: str | Path | None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) image tensors in [0, 1] of shape (N, C, H, W), int64 labels."""
    tc, name = config.train, config.data.dataset
    if config.data.synthetic:
        return synthetic_splits(name, tc.limit_train or SYNTHETIC_SIZES[0],
                                tc.limit_test or SYNTHETIC_SIZES[1], tc.seed)
    return (load(name, "train", data_dir, limit=tc.limit_train or None),
            load(name, "test", data_dir, limit=tc.limit_test or None))


def augment(x: Tensor, generator: torch.Generator, share: slice = slice(None),
            total: int | None = None) -> Tensor:
    """Random crop (zero padding 4) and horizontal flip per image; x: (N, C, H, W).

    The draws are made for a batch of ``total`` images (default N) of which x holds the
    rows ``share``: a rank's share of a global batch is augmented as in a single process,
    and the generator advances alike on every rank.
    """
    n, c, h, w = x.shape
    total = n if total is None else total
    flip = (torch.rand(total, generator=generator) < 0.5)[share].to(x.device)
    dy, dx = torch.randint(0, 9, (2, total, 1), generator=generator)[:, share].to(x.device)
    x = F.pad(torch.where(flip.view(n, 1, 1, 1), x.flip(3), x), (4, 4, 4, 4))
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    return x[torch.arange(n, device=x.device)[:, None, None, None],
             torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


Share = tuple[Tensor, Tensor, slice, int]


def _shares(data: TensorDataset, batches: Sequence[Tensor], ctx: Context | None,
            pin: bool) -> Iterator[Share]:
    """(images, labels, rows, size) of this rank's rows of each batch (ctx None: all rows)."""
    images, labels = data.tensors
    for batch in batches:
        rows = slice(None) if ctx is None else part(len(batch), ctx)
        x, y = images[batch[rows]], labels[batch[rows]]
        yield (x.pin_memory(), y.pin_memory(), rows, len(batch)) if pin else (x, y, rows, len(batch))


def _run_epoch(model: nn.Module, shares: Iterator[Share], steps: int, ctx: Context,
               optimizer: torch.optim.Optimizer | None = None,
               transform: Callable[[Tensor, slice, int], Tensor] | None = None,
               desc: str = "", progress: bool = True, objective: Objective | None = None,
               first_step: int = 0, after_step: Callable[[], None] | None = None
               ) -> tuple[float, float, int]:
    """One pass over ``steps`` shares: training when ``optimizer`` is given, else evaluation.

    Training minimises ``objective`` (robustclip.objectives; its step numbers start at
    ``first_step``; ``after_step`` is called after each optimiser step: a per-step
    learning-rate schedule), evaluation measures the cross-entropy of ``model``.  Training
    weights each rank's summed loss by world size / global batch size, so the
    gradient that DDP averages over the ranks is the mean over the global batch; after
    each step the ranks take rank 0's spectral state (robustclip.distributed).  Returns
    the (mean loss, accuracy in [0, 1], batches) of all ranks together; one all-reduce
    and host sync at the end.
    """
    training = optimizer is not None
    model.train(training)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    count = batches = 0
    with torch.set_grad_enabled(training):
        for x, y, rows, total in tqdm(shares, total=steps, desc=desc, leave=False,
                                      disable=not (progress and ctx.main), dynamic_ncols=True):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if transform is not None:
                x = transform(x, rows, total)
            if training:
                logits, losses = objective(x, y, rows, total, first_step + batches)
                optimizer.zero_grad(set_to_none=True)
                (losses.sum() * ctx.world_size / total).backward()
                optimizer.step()
                sync_after_step(model, ctx)
                if after_step is not None:
                    after_step()
            else:
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
            loss_sum += losses.detach().sum().double()
            correct += (logits.detach().argmax(1) == y).sum()
            count += y.numel()
            batches += 1
    sums = torch.stack([loss_sum, correct.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                 device=ctx.device)])
    loss_total, correct_total, count_total = all_reduce_sum(sums, ctx).tolist()
    if count_total == 0:
        raise RobustclipError("no samples to train or test on (limit_train / limit_test = 0?)")
    return loss_total / count_total, correct_total / count_total, batches


def _sigmas(model: nn.Module) -> dict[str, float]:
    """Each wrapper's top-k singular values as ``sigma/<name>[/i]``."""
    return {f"sigma/{w.name}" + (f"/{i + 1}" if i else ""): v
            for w in wrappers(model) for i, v in enumerate(w.sigmas[: w.k].tolist())}


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` atomically (the rows are few; a resume truncates it exactly)."""
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["epoch"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def _rng_state(device: torch.device, *generators: torch.Generator) -> dict[str, Any]:
    """The RNG states (the same on every rank); CUDA: this device's, whatever the world size."""
    state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _saved_config(ckpt: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint was trained with."""
    if not isinstance(ckpt.get("config"), dict):
        raise RobustclipError(f"{path} holds no config: cannot resume from it; --overwrite to start again")
    return from_dict(ckpt["config"], f" in {path}")


def _last(run: Path) -> Path:
    last = run / "last.pt"
    if not last.is_file():
        raise RobustclipError(f"no last.pt in {run}: nothing to resume; --overwrite to start again")
    return last


def resume_config(run: str | Path, given: Config | None = None,
                  assignments: Sequence[str] = ()) -> Config:
    """The config to resume ``run`` with: the one stored in its ``last.pt`` (or ``given``),
    with ``assignments`` (``section.key=value``) applied.  Only train.epochs, train.device
    and log.progress may differ from the stored one; anything else raises a one-line diff."""
    last = _last(Path(run))
    saved = _saved_config(read_checkpoint(last), last)
    config = override(given or saved, assignments)
    diff = differences(saved, config)
    if diff:
        raise RobustclipError(f"cannot resume {run} with a different config: "
                              f"{'; '.join(diff)} (run's vs given)")
    return config


def _resume_checkpoint(out: Path, config: Config) -> dict[str, Any]:
    """``last.pt`` of ``out``, checked: its config against ``config`` and ``config.toml``."""
    last = _last(out)
    ckpt = read_checkpoint(last)
    saved = _saved_config(ckpt, last)
    diff = differences(saved, config)
    if diff:
        raise RobustclipError(f"cannot resume {out} with a different config: "
                              f"{'; '.join(diff)} (run's vs given)")
    if config.train.schedule == "cyclic" and saved.train.epochs != config.train.epochs:
        raise RobustclipError(f"cannot resume {out} with train.epochs = {config.train.epochs}: its "
                              f"cyclic schedule spans the run's {saved.train.epochs} epochs")
    toml = out / "config.toml"
    if toml.exists():
        try:
            diff = differences(saved, load_config(toml))
        except RobustclipError as err:
            diff = [str(err)]
        if diff:
            raise RobustclipError(f"{toml} does not match the config in {last}: {'; '.join(diff)} "
                                  f"(last.pt's vs config.toml's); remove config.toml to restore it "
                                  f"from last.pt, or --overwrite to start again")
    return ckpt


def _environment_name(out: Path, resume: bool) -> str:
    """``environment.json`` for a new run, ``environment-resume-<n>.json`` for its n-th resume."""
    if not resume:
        return "environment.json"
    done = [int(m[2]) for p in out.iterdir() if (m := ENVIRONMENT_FILE.fullmatch(p.name)) and m[2]]
    return f"environment-resume-{max(done, default=0) + 1}.json"


def _written_by_robustclip(path: Path) -> bool:
    """Whether ``path``, named as a file of a run, is one that robustclip wrote: told by
    its content for the names other programs use too (a robustclip checkpoint, config,
    metrics.csv or environment record), by its name for the others
    (environment-resume-<n>.json, TensorBoard events).  A folder or an unreadable file
    is not."""
    if not path.is_file():
        return False
    try:
        if path.name in ("last.pt", "best.pt"):
            read_checkpoint(path)
        elif path.name == "config.toml":
            load_config(path)
        elif path.name == "metrics.csv":
            with open(path, newline="") as f:
                return next(csv.reader(f), [None])[0] == "epoch"
        elif path.name == "environment.json":
            return "robustclip" in json.loads(path.read_text())
    except (RobustclipError, OSError, ValueError, TypeError):  # TypeError: JSON but no object
        return False
    return True


def _remove_old_run(out: Path) -> None:
    """``--overwrite``: remove the old run's files from ``out`` (:data:`RUN_FILES`,
    TensorBoard events, environment records); any other file stays.  A file of such a
    name that robustclip did not write (:func:`_written_by_robustclip`) raises
    RobustclipError naming it, before anything is removed."""
    old = [path for path in sorted(out.iterdir()) if path.name in RUN_FILES
           or path.name.startswith("events.out.tfevents.") or ENVIRONMENT_FILE.fullmatch(path.name)]
    foreign = [path.name for path in old if not _written_by_robustclip(path)]
    if foreign:
        raise RobustclipError(f"run directory {out} holds {', '.join(foreign)} that robustclip did "
                              f"not write; --overwrite removes only a run's own files: move them "
                              f"or give another --out")
    for path in old:
        path.unlink()


def _prepare_run_dir(out: Path, config: Config, resume: bool, overwrite: bool,
                     stack: ExitStack, ctx: Context) -> dict[str, Any] | None:
    """Lock the run directory for the command (on ``stack``) and check it: refuse to clobber
    an existing run unless resuming (same config) or overwriting (the old run's files go).
    Writes config.toml, metrics.csv (so an unwritable directory fails before training) and
    the environment record.  Returns the checkpoint to resume from, or None."""
    if resume and overwrite:
        raise RobustclipError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RobustclipError(f"run directory {out} is a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked(out, "run directory"))
        ckpt = _resume_checkpoint(out, config) if resume else None
        if not resume and out.exists() and any(out.iterdir()):
            if not overwrite:
                raise RobustclipError(f"run directory {out} already exists; use --resume to continue "
                                      f"it or --overwrite to replace it")
            _remove_old_run(out)
        out.mkdir(parents=True, exist_ok=True)
        for path in remove_temporaries(out):
            log.info("removed %s, left by an interrupted write", path)
        write_text(out / "config.toml", to_toml(config))
        _write_metrics(out / "metrics.csv", ckpt["metrics"] if ckpt else [])
        write_environment(out, ctx.device, ctx.world_size, _environment_name(out, resume))
    except OSError as err:
        raise RobustclipError(f"cannot write run directory {out}: {describe(err)}") from None
    return ckpt


def train(config: Config | str | Path | None, out_dir: str | Path, resume: bool = False,
          overwrite: bool = False, device: str | None = None,
          data_dir: str | Path | None = None, backend: str | None = None) -> Path:
    """Train the model of ``config`` (a Config or a TOML path); write the run to ``out_dir``.

    resume: continue the run in ``out_dir`` from its ``last.pt``, which must exist; its
    stored config and config.toml must match ``config`` except train.epochs,
    train.device, log.progress (``config`` None: the stored one).  overwrite: remove the
    old run's files (checkpoints, metrics, TensorBoard events, environment records,
    temporary files) from an existing ``out_dir``, and nothing else: a file of such a
    name that robustclip did not write is refused.  The run directory is locked for the
    whole call (see robustclip.locks).  device: overrides train.device.  data_dir: the
    data root (see robustclip.data.data_root).  backend: the torch.distributed backend
    under torchrun (default: see robustclip.distributed).  Returns the run directory.  Ctrl-C leaves
    ``last.pt`` at the last completed epoch and re-raises KeyboardInterrupt.
    """
    if config is None:
        if not resume:
            raise RobustclipError("give a config (only a resume takes the run's own)")
        config = resume_config(out_dir)
    elif not isinstance(config, Config):
        config = load_config(config)
    with launch(resolve_device(device or config.train.device), backend) as ctx:
        return _train(config, Path(out_dir), resume, overwrite, data_dir, ctx)


def _train(config: Config, out: Path, resume: bool, overwrite: bool,
           data_dir: str | Path | None, ctx: Context) -> Path:
    """:func:`train` in the process ``ctx`` describes (one of the ranks, or the only process):
    build the model, load the data, lock and check the run directory, fit."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, config.data.dataset, config.method.name,
                        config.method_args(), **config.model.args).to(ctx.device)
    train_set, test_set = _datasets(config, data_dir)
    check_world(ctx, len(train_set), "training samples")
    if config.train.batch_size < ctx.world_size:
        raise RobustclipError(f"train.batch_size {config.train.batch_size} is smaller than the "
                              f"world size {ctx.world_size}: every rank needs a share of each batch")
    with ExitStack() as stack:  # rank 0 holds the run directory's lock until the end
        ckpt = on_main(ctx, lambda: _prepare_run_dir(out, config, resume, overwrite, stack, ctx))
        if ckpt is not None and predates_tracking(ckpt):  # resumed without sigma tracking
            model = model_from_checkpoint(ckpt).to(ctx.device)
        return _fit(config, out, model, ckpt, train_set, test_set, ctx)


def _optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, as ``train.optimizer`` says."""
    if tc.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                           weight_decay=tc.weight_decay)


def cyclic_factor(step: int, total_steps: int, peak: float = 0.4) -> float:
    """The cyclic schedule's lr / train.lr at the 0-based ``step`` of ``total_steps``: a
    triangle from 0 up to 1 at ``peak`` of the run and back to 0 at its end (Wong et al.
    2020 evaluate it after the step's fraction of an epoch, hence ``step + 1``)."""
    t = (step + 1) / total_steps
    return max(0.0, t / peak if t <= peak else (1 - t) / (1 - peak))


def _scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig,
               steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR, stepped each epoch, or the cyclic schedule, stepped each optimiser step."""
    if tc.schedule == "cyclic":
        total = tc.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cyclic_factor(step, total))
    return torch.optim.lr_scheduler.StepLR(optimizer, tc.step_size, tc.gamma)


def _fit(config: Config, out: Path, model: nn.Module, ckpt: dict[str, Any] | None,
         train_set: TensorDataset, test_set: TensorDataset, ctx: Context) -> Path:
    """The epochs of the run (from ``ckpt`` when resuming) in the prepared, locked ``out``.

    Each epoch saves ``best.pt`` (if improved), then ``last.pt``, then ``metrics.csv``: a
    failed save leaves metrics.csv without the row, never a row that no checkpoint holds."""
    tc, dev = config.train, ctx.device
    steps_per_epoch = math.ceil(len(train_set) / tc.batch_size)
    optimizer = _optimizer(model, tc)
    scheduler = _scheduler(optimizer, tc, steps_per_epoch)
    per_step = scheduler.step if tc.schedule == "cyclic" else None
    crop = torch.Generator().manual_seed(tc.seed + 1)
    history: list[dict[str, Any]] = []
    global_step = 0
    if ckpt is not None:
        load_state(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], dev, crop)
        history, global_step = ckpt["metrics"], ckpt["global_step"]
        log.info("resuming %s after epoch %d (step %d)", out, ckpt["epoch"], global_step)
    net = data_parallel(model, ctx)
    pin = dev.type == "cuda"
    # The test set in contiguous shares, one per rank; batches of eval_batch_size within.
    test_batches = torch.arange(len(test_set))[part(len(test_set), ctx)].split(tc.eval_batch_size)
    transform = (lambda x, share, total: augment(x, crop, share, total)) if config.data.augment else None
    objective = Objective(config, net, model, ctx, tuple(train_set.tensors[0].shape[1:]),
                          steps_per_epoch)
    monitor = _monitor(config, test_set, ctx)
    writer = None
    if config.log.tensorboard and ctx.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out), purge_step=global_step + 1 if ckpt is not None else None)
        _log_hparams(writer, config)
    for w in wrappers(model):
        w.writer = writer
    meta = {"model": {"name": config.model.name, "args": dict(config.model.args)},
            "method": {"name": config.method.name, "args": config.method_args()},
            "dataset": config.data.dataset, "config": to_dict(config)}
    best = max((row["test_acc"] for row in history), default=-1.0)
    log.info("%s + %s on %s (%d train, %d test samples), %s%s -> %s", config.model.name,
             config.method.name, config.data.dataset, len(train_set), len(test_set), dev,
             f" x {ctx.world_size} ranks ({ctx.backend})" if ctx.distributed else "", out)
    pending, saved = None, len(history) - 1  # checkpoint of a completed epoch until on disk
    try:
        for epoch in range(len(history), tc.epochs):
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            batches = epoch_batches(len(train_set), tc.batch_size, tc.seed, epoch, ctx.world_size)
            train_loss, train_acc, steps = _run_epoch(
                net, _shares(train_set, batches, ctx, pin), len(batches), ctx, optimizer, transform,
                f"epoch {epoch}", config.log.progress, objective, global_step, per_step)
            global_step += steps
            if per_step is None:
                scheduler.step()
            test_loss, test_acc, _ = _run_epoch(
                model, _shares(test_set, test_batches, None, pin), len(test_batches), ctx,
                desc="test", progress=config.log.progress)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc,
                   **_robustness(monitor, objective, model, epoch, global_step, history),
                   **_sigmas(model), "lr": lr, "wall_time": time.perf_counter() - start}
            if _stops_early(config, row, history):
                log.warning("epoch %d: catastrophic overfitting at the full eps, and "
                            "train.adversarial.early_stop is on: training stops, this epoch is not "
                            "saved, %s (Wong et al. 2020's early stopping)", epoch,
                            f"the run ends with epoch {epoch - 1}'s model in last.pt" if history
                            else "and no epoch is kept")
                break
            history.append(row)
            improved, best = test_acc > best, max(best, test_acc)
            if not ctx.main:
                continue
            pending = {**meta, "epoch": epoch, "global_step": global_step, "metrics": list(history),
                       "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": _rng_state(dev, crop)}
            if improved:
                save_checkpoint(pending, out / "best.pt")
            save_checkpoint(pending, out / "last.pt")
            pending, saved = None, epoch
            _write_metrics(out / "metrics.csv", history)
            if writer is not None:
                _log_tensorboard(writer, row, model, global_step)
            log.info("epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | lr %.3g | %.1fs",
                     epoch, train_loss, train_acc, test_loss, test_acc, lr, row["wall_time"])
    except KeyboardInterrupt:
        if pending is not None:
            save_checkpoint(pending, out / "last.pt")
            saved = pending["epoch"]
        if ctx.main and saved >= 0:
            _write_metrics(out / "metrics.csv", history[: saved + 1])
        if ctx.main:
            log.warning("interrupted: %s; continue with `robustclip train --resume %s`",
                        f"{out / 'last.pt'} holds epoch {saved}" if saved >= 0 else "no epoch completed", out)
        raise
    finally:
        if writer is not None:
            writer.close()
    if ctx.main:
        _warn_if_never_clipped(model, global_step)
    return out


def _monitor(config: Config, test_set: TensorDataset, ctx: Context) -> OverfittingMonitor | None:
    """The catastrophic-overfitting monitor of an adversarial run (None: off)."""
    adv = config.train.adversarial
    if adv.attack == "none" or adv.monitor_samples == 0:
        return None
    x, y = (t[-adv.monitor_samples:] for t in test_set.tensors)  # clear of `attack --limit N`
    seed = zlib.crc32(f"monitor/{config.train.seed}".encode())
    # FGSM-RS at the training attack's step (its default step when training with PGD or N-FGSM)
    fgsm_step = step_ratio("fgsm-rs", 1, adv.step_size if adv.attack == "fgsm-rs" else 0.0, adv.eps)
    return OverfittingMonitor(x, y, adv.eps, adv.monitor_steps, adv.overfit_drop, seed, ctx,
                              adv.overfit_gap, fgsm_step, adv.monitor_attack)


def _stops_early(config: Config, row: dict[str, Any], history: list[dict[str, Any]]) -> bool:
    """Whether ``row``'s epoch ends an early-stopping run: flagged as catastrophic
    overfitting at the full eps (its ``adv_eps``, after warm-up), once an earlier epoch at
    the full eps (in ``history``) was not flagged.  Until then the model has no
    robustness to lose: a model still learning, in its first epochs at the full eps,
    resists FGSM-RS well before PGD (measured: smallcnn at 0.3 from step 0, FGSM-RS 50%
    and PGD-10 16% after its first epoch, 68% PGD two epochs later), which the gap rule
    flags; the wait is logged."""
    adv = config.train.adversarial
    full = lambda r: r.get("adv_eps", 0.0) >= adv.eps  # noqa: E731
    if not (adv.early_stop and row.get("catastrophic_overfitting") and full(row)):
        return False
    armed = any(full(r) and not r.get("catastrophic_overfitting") for r in history)
    if not armed:
        log.info("epoch %d: flagged, but no earlier epoch at the full eps was clean: "
                 "train.adversarial.early_stop waits for one", row["epoch"])
    return armed


def _robustness(monitor: OverfittingMonitor | None, objective: Objective, model: nn.Module,
                epoch: int, steps: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    """An adversarial run's metrics of the epoch ending after ``steps`` training steps:
    fgsm_acc, apgd_acc or pgd_acc and catastrophic_overfitting (with a monitor), adv_eps."""
    if not objective.adversarial:
        return {}
    row: dict[str, Any] = {}
    if monitor is not None:
        row |= monitor.accuracy(model)
        earlier = [(r["epoch"], r[monitor.key]) for r in history if r.get(monitor.key) is not None]
        best = max(earlier, key=lambda e: e[1], default=None)  # the most robust (the first on ties)
        row["catastrophic_overfitting"] = int(monitor.check(epoch, row, best))
    return row | {"adv_eps": objective.eps(steps - 1)}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested dict as ``{"a.b.c": value}``; values that are not numbers, bools or strings
    (lists of model arguments, say) as their JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def _log_hparams(writer: Any, config: Config) -> None:
    """The flattened config as TensorBoard hparams of this run's own event file (not the
    sub-run ``SummaryWriter.add_hparams`` makes), with the scalar ``test/acc`` as metric."""
    from torch.utils.tensorboard.summary import hparams

    experiment, start, _ = hparams(_flat(to_dict(config)), {"test/acc": None})
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(start)


def _warn_if_never_clipped(model: nn.Module, steps: int) -> None:
    """A clipping method whose run ended before its first clip event trained as ``none``:
    say so (a short run with the tutorial's init_delay of 500 steps, say)."""
    idle = [w.name for w in wrappers(model)
            if w.clip is not None and w.clip_events and steps <= w.init_delay]
    if idle:
        log.warning("the run ended after %d training steps, before the first clip event of %s "
                    "(method.init_delay=%d): nothing was clipped, the model trained as 'none'",
                    steps, ", ".join(idle), wrappers(model)[0].init_delay)


def _log_tensorboard(writer: Any, row: dict[str, Any], model: nn.Module, step: int) -> None:
    """Epoch scalars at the global step; each wrapper's sigmas unless it logged this step."""
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "fgsm_acc", "apgd_acc", "pgd_acc"):
        if key in row:
            writer.add_scalar(key.replace("_", "/", 1), row[key], step)
    writer.add_scalar("lr", row["lr"], step)
    for w in wrappers(model):
        if step % w.log_every:
            w.log_sigmas(writer, step)
    writer.flush()
