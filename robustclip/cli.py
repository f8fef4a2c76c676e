"""Command-line interface: a thin click layer over the Python API.

Every :class:`~robustclip.errors.RobustclipError` (bad input, missing data, a corrupt
checkpoint), every OSError (a full disk, a read-only or forbidden directory, a file
size limit) and every usage error of click's (an unknown option, a missing argument, a
bad choice) becomes one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys

import click

from robustclip import __version__
from robustclip.errors import RobustclipError


def _usage_error(err: click.UsageError) -> None:
    """Report click's own usage error (unknown option, missing argument, bad value) as one
    line, with where to find help, and exit with status 2."""
    where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
    click.echo(f"error: {' '.join(err.format_message().split())}{where}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """A click group that reports :class:`RobustclipError`, OSError and click's usage
    errors as one line, exit 2 (--help and --version answer as usual)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:  # an error in the group's own options
            _usage_error(err)

    def invoke(self, ctx: click.Context):
        from robustclip.files import describe

        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a subcommand's options and arguments
            _usage_error(err)
        except RobustclipError as err:
            click.echo(f"error: {' '.join(str(err).split())}", err=True)
            ctx.exit(2)
        except OSError as err:
            click.echo(f"error: {describe(err)}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="robustclip")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """robustclip: clip spectral norms during training, then attack and certify."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _Seed(click.ParamType):
    """A seed: an integer in 0..2**63 - 1 (robustclip.schema.seed)."""

    name = "seed"

    def convert(self, value, param, ctx):
        from robustclip.schema import seed

        try:
            return seed(int(value))
        except ValueError:
            self.fail(f"{value!r} is not an integer", param, ctx)
        except RobustclipError as err:
            self.fail(str(err), param, ctx)


_BACKEND = click.option("--backend", type=click.Choice(["gloo", "nccl"]), default=None,
                        help="torch.distributed backend under torchrun (default: $ROBUSTCLIP_BACKEND, "
                             "else nccl on CUDA, gloo on CPU).")


@main.command(name="train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config, e.g. configs/mnist-simpleconv-fastclip.toml "
                   "(with --resume: default the config stored in the run's last.pt).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: runs/<config file stem>).")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in DIR from its last.pt (same config; --epochs may grow).")
@click.option("--overwrite", is_flag=True,
              help="Remove the old run's files (checkpoints, metrics, events) from an existing run directory.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's).")
@click.option("--seed", type=_Seed(), default=None, help="Override train.seed.")
@click.option("--epochs", type=int, default=None, help="Override train.epochs.")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value, e.g. --set train.lr=0.01 (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data root (default: $ROBUSTCLIP_DATA, else ~/.cache/robustclip/data).")
@_BACKEND
def train_cmd(config_file: str | None, out: str | None, resume: str | None, overwrite: bool,
              device: str | None, seed: int | None, epochs: int | None,
              assignments: tuple[str, ...], data_dir: str | None, backend: str | None) -> None:
    """Train a model from a config: metrics.csv, TensorBoard events, last.pt and best.pt.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m robustclip train ...) the run is
    data parallel; train.batch_size is the global batch.
    """
    from pathlib import Path

    from robustclip.config import load_config, override
    from robustclip.distributed import torchrun_env
    from robustclip.train import resume_config, train

    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise RobustclipError("--resume DIR continues the run in DIR; drop --out")
    if not (config_file or resume):
        raise RobustclipError("give --config FILE (or --resume DIR)")
    flags = [f"train.{k}={v}" for k, v in [("seed", seed), ("epochs", epochs), ("device", device)]
             if v is not None]
    if resume:  # the config stored in last.pt; --config / --set may change only what a resume may
        if overwrite:
            raise RobustclipError("--resume and --overwrite exclude each other")
        config = resume_config(resume, load_config(config_file) if config_file else None,
                               [*assignments, *flags])
    else:
        config = override(load_config(config_file), [*assignments, *flags])
    run = Path(resume or out or Path("runs") / Path(config_file).stem)
    try:
        train(config, run, resume=bool(resume), overwrite=overwrite, data_dir=data_dir, backend=backend)
    except KeyboardInterrupt:
        sys.exit(130)
    if (torchrun_env() or (0,))[0] == 0:
        click.echo(run)


@main.group(name="data")
def data_group() -> None:
    """Fetch and list the datasets (mnist, fashion-mnist, cifar10)."""


@data_group.command(name="fetch")
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data root (default: $ROBUSTCLIP_DATA, else ~/.cache/robustclip/data).")
def data_fetch(name: str, data_dir: str | None) -> None:
    """Make dataset NAME present and checksum-verified; print its data root."""
    from robustclip.data import fetch

    click.echo(fetch(name, data_dir))


@data_group.command(name="list")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data root (default: $ROBUSTCLIP_DATA, else ~/.cache/robustclip/data).")
def data_list(data_dir: str | None) -> None:
    """Show each dataset: present (verified), size on disk, path."""
    from robustclip.data import list_datasets

    click.echo(f"{'name':<14} {'present':<8} {'size':>9}  path")
    for row in list_datasets(data_dir):
        size = f"{row['size'] / 1e6:.1f} MB"
        present = "yes" if row["present"] else "no"
        click.echo(f"{row['name']:<14} {present:<8} {size:>9}  {row['path']}")


# ------------------------------------------------------------ attack, transfer, lipschitz

class _Eps(click.ParamType):
    """A budget as a number or a fraction: 0.3, 8/255."""

    name = "eps"

    def convert(self, value, param, ctx):
        from robustclip.files import parse_fraction

        try:
            return parse_fraction(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


_RUNS = click.argument("runs", nargs=-1, required=True, type=click.Path())
_EVAL_OPTIONS = [
    click.option("--eps", type=_Eps(), multiple=True,
                 help="Budget in pixel units, e.g. 0.3 or 8/255 (repeatable); overrides a "
                      "suite's eps lists."),
    click.option("--norm", type=click.Choice(["Linf", "L2"]), default=None,
                 help="Norm of --eps for attacks whose norm is free (default Linf); with "
                      "--suite, keeps the attacks of this norm."),
    click.option("--attack", "attacks", multiple=True,
                 help="Attack (repeatable): standard, quick (cascades), fgsm, pgd, pgdl2, cw, "
                      "apgd, apgdt, fab, square; with --suite, keeps these attacks of the suite."),
    click.option("--steps", type=click.IntRange(min=1), default=None,
                 help="Steps of every attack that has them (default: each attack's own)."),
    click.option("--n-restarts", "--restarts", "n_restarts", type=click.IntRange(min=1), default=None,
                 help="Restarts of every attack that has them (torchattacks' n_restarts)."),
    click.option("--suite", type=click.Path(dir_okay=False),
                 help="TOML attack suite, e.g. attacks/mnist.toml."),
    click.option("--limit", type=int, default=None, help="First N test samples."),
    click.option("--batch-size", type=int, default=256, show_default=True),
    click.option("--seed", type=_Seed(), default=0, show_default=True),
    click.option("--device", default=None, help="Device for the models (default: as saved)."),
    click.option("--ensemble-output", type=click.Choice(["softmax", "logits"]),
                 default="softmax", show_default=True,
                 help="Ensemble output: log of mean softmax, or mean of logits."),
    click.option("--out", type=click.Path(file_okay=False), default=None,
                 help="Write results.csv/.json/.md and plots here."),
    click.option("--overwrite", is_flag=True,
                 help="Replace a non-empty --out directory whole (at the end, once the new results are written)."),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                 help="Data root (default: $ROBUSTCLIP_DATA, else ~/.cache/robustclip/data)."),
]


def _with(options):
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def _default_out() -> str:
    """A new folder robustclip-out/<UTC time>[-N] for an attack run without --out."""
    import time
    from pathlib import Path

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RobustclipError("under torchrun give --out: each rank would pick its own folder")
    base = Path("robustclip-out") / time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime())
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return str(out)


def _check_counts(options: dict) -> None:
    """--batch-size and --limit (where given) are at least 1, else RobustclipError: checked
    before anything is printed, imported or written."""
    for name in ("batch_size", "limit"):
        if options[name] is not None and options[name] < 1:
            raise RobustclipError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")


@main.command(name="attack")
@click.argument("runs", nargs=-1, type=click.Path())
@_with(_EVAL_OPTIONS)
@click.option("--quick", is_flag=True,
              help="Default cascade APGD-CE + APGD-T only (a first look, not the standard).")
@click.option("--ensemble", is_flag=True, help="Also attack the ensemble of all RUNs.")
@click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
              help="Your own model: a callable returning an nn.Module on images in [0, 1] "
                   "(the current directory is searched first); needs --dataset.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="State dict for --model (torch.load(weights_only=True)).")
@click.option("--dataset", default=None, help="Dataset of --model: mnist, fashion-mnist or cifar10.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted evaluation in DIR, with the settings it was "
                   "started with (only --device may change).")
@click.option("--save-adversarial", is_flag=True,
              help="Also write the adversarial examples of every row (adversarial/<model>.pt).")
@_BACKEND
@click.pass_context
def attack_cmd(ctx: click.Context, backend: str | None, resume: str | None, **options) -> None:
    """Attack each RUN (run dir or checkpoint) on its test set; print and save the table.

    Without --attack or --suite: the standard evaluation, AutoAttack's cascade (APGD-CE,
    APGD-T, FAB-T, Square; each attack only on the points still robust) in --norm.

    Results go to --out (default: a new folder robustclip-out/<time>): results.csv/.json/.md,
    samples.csv (per sample) and plots.  Every finished batch is kept there meanwhile, so
    an interrupted run continues with --resume DIR.

    Under torchrun the batches are shared among the ranks (--device cuda: one GPU per
    rank); rank 0 prints and writes the table, the same as one process would.
    """
    from click.core import ParameterSource

    if resume:
        given = [f"--{k.replace('_', '-')}" if k != "runs" else "RUNs" for k in options
                 if k != "device" and ctx.get_parameter_source(k) is not ParameterSource.DEFAULT]
        if given:
            raise RobustclipError(f"--resume takes the settings of the interrupted evaluation; "
                                  f"drop {', '.join(given)}")
    else:
        _check_counts(options)
        options["out"] = options["out"] or _default_out()
    out = resume or options["out"]
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"writing to {out} (if interrupted: robustclip attack --resume {out})")

    from robustclip.commands import attack_command, saved_settings
    from robustclip.distributed import launch
    from robustclip.files import resolve_device

    if resume:
        options = saved_settings(resume) | {"device": options["device"], "out": resume,
                                            "overwrite": False, "resume": True}
    with launch(resolve_device(options["device"] or "cpu"), backend) as launched:
        if options["device"]:
            options["device"] = str(launched.device)  # under torchrun: cuda -> cuda:LOCAL_RANK
        attack_command(**options)


@main.command(name="transfer")
@_RUNS
@_with(_EVAL_OPTIONS)
@click.option("--surrogates/--no-surrogates", default=True, show_default=True,
              help="Also attack each RUN from the ensemble of all the others (N ensembles "
                   "of N-1 models: about N-1 times the cost of the matrix).")
def transfer_cmd(**options) -> None:
    """Transfer matrix among RUNs (diagonal: white-box) and surrogate-ensemble rows."""
    from robustclip.commands import transfer_command

    transfer_command(**options)


@main.command(name="lipschitz")
@_RUNS
@click.option("--limit", type=int, default=None, help="Test samples for the empirical ratio (default 256).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=_Seed(), default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--tol", type=float, default=1e-6, show_default=True, help="PowerQR convergence.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write lipschitz.csv, layers.csv and environment.json here.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out directory whole.")
def lipschitz_cmd(**options) -> None:
    """Per-layer sigmas and network Lipschitz bound of each RUN, against the empirical ratio."""
    from robustclip.commands import lipschitz_command

    lipschitz_command(**options)


@main.command(name="demo")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Parent directory; each demo writes a new timestamped folder inside.")
@click.option("--epochs", type=int, default=2, show_default=True)
@click.option("--limit", type=int, default=1000, show_default=True, help="Test images attacked.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
def demo_cmd(out: str, epochs: int, limit: int, device: str | None, data_dir: str | None) -> None:
    """Train simpleconv with none and fastclip on MNIST, attack both, tabulate."""
    from robustclip.demo import run_demo

    root, _ = run_demo(out, epochs=epochs, limit=limit, data_dir=data_dir, device=device)
    click.echo(f"\nDemo outputs: {root}\n  results table and plots: {root / 'attack'}\n"
               f"  training runs: {root / 'runs'}\n"
               f"  TensorBoard:   tensorboard --logdir {root / 'runs'}")
