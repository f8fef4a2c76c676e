"""CLI start-up: how long `robustclip --help`, `--version` and `attack --help` take, and how
long `robustclip attack` takes to print its first line (where it writes), against a bare
`python -c pass` measured in the same rounds.  Goals (issue #12): --help under 1 s, the
first output of an attack within 2 s.

    python bench/cli_startup.py [--rounds 5]

Each command runs as a fresh process (what a user waits for), interleaved over the
rounds; the median per command is reported.  The attack uses a throwaway model module
(--model) on MNIST and is killed once its first line is out.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.cli_startup")

MODULE = "import torch.nn as nn\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"


def _wall(cmd: list[str], cwd: Path) -> float:
    """Seconds until ``cmd`` exits."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _first_line(cmd: list[str], cwd: Path) -> float:
    """Seconds until ``cmd`` prints its first line on stdout (then it is killed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - start
    proc.kill()
    proc.wait()
    if not line.startswith("writing to"):
        raise SystemExit(f"unexpected first line from {' '.join(cmd)}: {line!r}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rc = [sys.executable, "-m", "robustclip"]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "benchnet.py").write_text(MODULE)
        timings: dict[str, tuple] = {
            "python -c pass (baseline)": (_wall, [sys.executable, "-c", "pass"]),
            "robustclip --help": (_wall, [*rc, "--help"]),
            "robustclip --version": (_wall, [*rc, "--version"]),
            "robustclip attack --help": (_wall, [*rc, "attack", "--help"]),
            "robustclip attack: first line": (_first_line, [*rc, "attack", "--model", "benchnet:net",
                                                            "--dataset", "mnist", "--eps", "0.3"]),
        }
        seconds: dict[str, list[float]] = {name: [] for name in timings}
        for r in range(args.rounds):
            for name, (measure, cmd) in timings.items():
                seconds[name].append(measure(cmd, cwd))
            log.info("round %d/%d done", r + 1, args.rounds)
    base = statistics.median(seconds["python -c pass (baseline)"])
    print(f"{'command':<34} {'median s':>9} {'x python':>9}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:>9.3f} {median / base:>9.1f}")


if __name__ == "__main__":
    main()
