"""The README's own-model example (issue #12) runs as written: its module, its Python code
and its command, in a fresh directory."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README section ``## title``."""
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def test_own_model_section_runs_as_written(tmp_path, mnist_root):
    (lang1, module), (lang2, script), (lang3, command) = _section_blocks("Your own model")
    assert (lang1, lang2, lang3) == ("python", "python", "sh")
    assert module.startswith("# mynets.py\n")
    (tmp_path / "mynets.py").write_text(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    python = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr
    assert "standard" in python.stdout and "bound_kind" in python.stdout
    bound = float(python.stdout.strip().splitlines()[-1])
    assert 0 < bound < 1.5  # two layers clipped to 1, ReLU and max pooling: at most ~1
    shell = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert shell.returncode == 0, shell.stderr
    table = pd.read_csv(tmp_path / "out" / "own" / "results.csv")
    assert set(table.model) == {"clipped_small_net"} and set(table.eps) == {0.1, 0.3}
    assert (table.bound_kind == "upper").all() and (table.lipschitz_bound < 1.5).all()
    assert ((table.certified_acc <= table.robust_acc) & (table.robust_acc <= table.clean_acc)).all()
