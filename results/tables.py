"""Writing a results/ script's output: CSV tables and environment.json in one folder."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from robustclip.environment import write_environment
from robustclip.files import atomic_write


def save_tables(out: str | Path, tables: dict[str, list[dict]]) -> None:
    """Each ``{file name: rows}`` as a CSV in ``out`` (created), written atomically, and
    environment.json (versions, machine, git commit) beside them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        atomic_write(out / name, lambda tmp, rows=rows: pd.DataFrame(rows).to_csv(tmp, index=False))
    write_environment(out)
