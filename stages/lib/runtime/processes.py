"""Running another stage script in a fresh process and reading its JSON result.

evaluate.py and export.py time generation this way (generate.py --latency-steps), so
that the measured memory is that of a process that only loads a model and generates;
export.py also runs its own proofs this way. The started script gets this stage's
--config, --data-dir and --artifacts-dir, and its result is its last stdout line that
is a JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lib.runtime.errors import PipelineError

STAGES_DIR = Path(__file__).resolve().parents[2]


def run_script_json(cfg: dict, script: str, args: list[str], what: str) -> dict:
    cmd = [sys.executable, str(STAGES_DIR / script), "--config", cfg["_config"], "--data-dir", cfg["data_dir"],
           "--artifacts-dir", cfg["artifacts_dir"], *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"{what} failed ({script} {' '.join(args)} in its own process):\n"
                            f"{result.stderr.strip()[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
