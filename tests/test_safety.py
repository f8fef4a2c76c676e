"""What robustclip refuses rather than does silently: removing what it did not write, one
run or eps given twice, file names that collide, a model clipped twice."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustclip.errors import RobustclipError
from test_train import tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-epoch run of a tiny model on synthetic data, at <tmp>/runs/a."""
    from robustclip.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = train(tiny("none"), tmp_path_factory.mktemp("project") / "runs" / "a")
    torch.set_num_threads(threads)
    return Path(path)


def _cli(*args: str):
    from robustclip.cli import main

    return CliRunner().invoke(main, list(args))


def _refused(result, *parts: str) -> str:
    """The one ``error:`` line of a refused command, which names each of ``parts``."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


def _no_work(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading test data (the long work)."""
    import robustclip.commands as commands

    monkeypatch.setattr(commands, "test_set", lambda *a, **k: pytest.fail("the work ran before the check"))


FGSM = ("--attack", "fgsm", "--eps", "0.1", "--limit", "8")


# ------------------------------------------------------------------- one run given twice

@pytest.mark.parametrize("command", ["attack", "transfer", "lipschitz"])
def test_a_run_given_twice_in_any_spelling_is_refused(run, monkeypatch, command):
    monkeypatch.chdir(run.parent.parent)
    _no_work(monkeypatch)
    options = FGSM if command != "lipschitz" else ()
    for twice in (["runs/a", "./runs/a"], ["runs/a", "runs/a/last.pt"], ["runs/a/", str(run)]):
        _refused(_cli(command, *twice, *options), "the same run is given twice",
                 f"{twice[0]} and {twice[1]}")
