"""Bad input is one line (``error: ...``, exit 2) or a RobustclipError, never a traceback
(issue: reliability, parts 5 and 6): click's usage errors, configs and attack suites
checked by one schema, seeds, devices, sizes, names, a diverged training, user models."""
from __future__ import annotations

import re

import pytest

from helpers import cli as _cli, refused as _one_line


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


# ------------------------------------------------------------------ config schema, seeds

@pytest.mark.parametrize("assignment, message", [
    ("method.k=5000", "method.k must be in 0..64 (singular values tracked per layer), got 5000"),
    ("method.init_iters=1000000", "method.init_iters must be in 0..10000"),
    ("method.refine_iters=100000", "method.refine_iters must be in 0..10000"),
    ("method.clip_steps=10000000", "method.clip_steps must be in 0..1000000"),
    ("train.adversarial.steps=100000", "train.adversarial.steps must be in 0..1000"),
    ("train.seed=18446744073709551616", "train.seed must be in 0..9223372036854775807"),
])
def test_config_numbers_are_range_checked(assignment, message):
    from robustclip.config import Config, override
    from robustclip.errors import RobustclipError

    with pytest.raises(RobustclipError, match=re.escape(message)):
        override(Config(), [assignment])


def test_config_seed_beyond_64_bits_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nseed = 18446744073709551616\n")
    _one_line(_cli("train", "--config", str(config), "--out", str(tmp_path / "r")),
              "train.seed must be in 0..9223372036854775807", str(config))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", [["train", "--config", "c.toml"], ["attack", "run", "--eps", "0.1"],
                                     ["transfer", "run", "--eps", "0.1"], ["lipschitz", "run"]])
@pytest.mark.parametrize("value", ["18446744073709551616", "-1"])
def test_seed_option_is_range_checked(command, value):
    _one_line(_cli(*command, "--seed", value), "seed must be in 0..9223372036854775807", value)


def test_api_seed_is_range_checked(models, data):
    import robustclip
    from robustclip.errors import RobustclipError

    with pytest.raises(RobustclipError, match="seed must be in 0..9223372036854775807"):
        robustclip.evaluate(models["a"], data, eps=0.1, attacks="fgsm", seed=2**64, bounds=False)


# ------------------------------------------------------------------ attack suite schema

_EPS = '[eps]\nLinf = [0.1]\n'


@pytest.mark.parametrize("suite, message", [
    ('name = ["a"]\n' + _EPS + '[[attack]]\nname = "fgsm"\n', "name must be str, got ['a']"),
    ('[name]\nx = 1\n' + _EPS + '[[attack]]\nname = "fgsm"\n', "name must be str, got {'x': 1}"),
    (_EPS + '[[attack]]\nname = ["fgsm"]\n', "name must be str, got ['fgsm'] in [[attack]] 1"),
    ('cascade = "yes"\n' + _EPS + '[[attack]]\nname = "fgsm"\n',
     "cascade must be bool (true or false), got 'yes'"),
    ('description = 3\n' + _EPS + '[[attack]]\nname = "fgsm"\n', "description must be str, got 3"),
    ('[eps]\nL3 = [0.1]\n[[attack]]\nname = "fgsm"\n', "unknown norm 'L3' under [eps]"),
    (_EPS + '[[attack]]\nname = "standard"\nnorm = "L3"\n', "unknown norm 'L3' in [[attack]] 1"),
    ('[eps]\nLinf = "0.1"\n[[attack]]\nname = "fgsm"\n', "eps.Linf must be a non-empty list of numbers"),
    (_EPS + '[[attack]]\nname = "fgsm"\nlabel = "a\\u0000b"\n', "label must be a printable name"),
    (_EPS + '[[attack]]\nname = "fgsm"\nlabel = [1]\n', "label must be str, got [1]"),
    (_EPS + '[[attack]]\nname = "fgsmm"\n', "unknown attack 'fgsmm' in [[attack]] 1"),
    (_EPS + '[[attack]]\nname = "pgd"\nsteps = 100000000\n',
     "'steps' must be in 1..100000 (iterations per attack run)"),
])
def test_suite_types_and_ranges_are_checked(tmp_path, suite, message):
    from robustclip.errors import RobustclipError
    from robustclip.evaluation import load_suite

    path = tmp_path / "s.toml"
    path.write_text(suite)
    with pytest.raises(RobustclipError, match=re.escape(message)) as err:
        load_suite(path)
    assert "\n" not in str(err.value)


def test_unknown_norm_lists_the_norms(tmp_path):
    """The norm is unknown: the message lists Linf and L2, not 'add L3 under [eps]'."""
    path = tmp_path / "s.toml"
    path.write_text(_EPS + '[[attack]]\nname = "quick"\nnorm = "L3"\n')
    line = _one_line(_cli("attack", "run", "--suite", str(path)), "unknown norm 'L3'", "valid: Linf, L2")
    assert "under [eps]" not in line
