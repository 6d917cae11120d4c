"""stages/sweep.py: sweeps that finish at the same moment keep every row of the shared table."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

MERGE_ROWS = """
import sys
sys.path.insert(0, {stages!r})
from pathlib import Path
from sweep import merge_results
for i in range(100):
    merge_results(Path({folder!r}), [{{"name": f"{{sys.argv[1]}}-{{i}}", "final_val": 4.0 + i / 100}}])
"""


def test_two_sweeps_merging_at_once_keep_every_row(tmp_path):
    code = MERGE_ROWS.format(stages=str(REPO / "stages"), folder=str(tmp_path / "sweep"))
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    names = {row["name"] for row in json.loads((tmp_path / "sweep" / "results.json").read_text())}
    assert names == {f"{name}-{i}" for name in ("a", "b") for i in range(100)}
