"""Command-line interface: a thin click layer over the Python API.

Every :class:`~robustclip.errors.RobustclipError` (bad input, missing data, a corrupt
checkpoint) becomes one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import logging
import sys

import click

from robustclip.errors import RobustclipError


class _Group(click.Group):
    """A click group that reports :class:`RobustclipError` as one line, exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RobustclipError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """robustclip: clip spectral norms during training, then attack and certify."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
