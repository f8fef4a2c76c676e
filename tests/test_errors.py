"""Bad input is one line (``error: ...``, exit 2) or a RobustclipError, never a traceback
(issue: reliability, parts 5 and 6): click's usage errors, configs and attack suites
checked by one schema, seeds, devices, sizes, names, a diverged training, user models."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from robustclip.cli import main


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line(result, *parts: str) -> str:
    """The single stderr line of a refused command (exit 2), checked to contain ``parts``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


# ------------------------------------------------------------------ click's usage errors

@pytest.mark.parametrize("args, message", [
    (["--bogus"], "No such option '--bogus'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["train", "--bogus"], "No such option '--bogus'"),
    (["attack", "run", "--norm", "L3"], "'L3' is not one of 'Linf', 'L2'"),
    (["attack", "run", "--limit", "x"], "'x' is not a valid integer"),
    (["transfer"], "Missing argument 'RUNS...'"),
    (["data", "fetch"], "Missing argument 'NAME'"),
])
def test_usage_errors_are_one_line(args, message):
    line = _one_line(_cli(*args), message)
    assert "--help" in line  # where to look


def test_config_that_is_a_directory_is_one_line(tmp_path):
    _one_line(_cli("train", "--config", str(tmp_path)), str(tmp_path), "is a directory")


def test_help_still_answers():
    for args in (["--help"], ["train", "--help"], ["data", "fetch", "--help"]):
        result = _cli(*args)
        assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output
