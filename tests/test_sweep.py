"""stages/sweep.py: sweeps that finish at the same moment keep every row of the shared table; a grid that
would fail is refused before anything trains; a run that fails leaves the others, and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY_TRAIN, Workspace, assert_clean_failure, steps_per_epoch
from faults_helpers import signalled_marker, wait_for

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


def sweep(ws, grid, *extra, epochs=1):
    given = {"--epochs", "--learning-rate", "--warmup-steps"}  # the sweep's own, the grid's and the test's
    tiny = [word for i, word in enumerate(TINY_TRAIN)
            if word not in given and not (i and TINY_TRAIN[i - 1] in given)]
    return subprocess.run([sys.executable, str(REPO / "stages" / "sweep.py"), "--grid", grid, "--epochs", str(epochs),
                           "--data-dir", str(ws.data), "--artifacts-dir", str(ws.artifacts),
                           "--extra", " ".join([*tiny, *extra])], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_sweep_refuses_what_would_fail_before_training_anything(encoded, tmp_path):
    nothing = sweep(Workspace(tmp_path / "empty"), "learning_rate=0.001")
    assert_clean_failure(nothing, "missing:", "spm.model", "make encode")
    for grid, needle in (("nonsense=1,2", "unrecognized arguments: --nonsense=1"),
                         ("learning_rate=0.001,fast", "invalid float value: 'fast'"),
                         ("dropout=0,1.5", "dropout (--dropout) must be 'auto' or within [0, 1), got 1.5"),
                         ("epochs=3", "SWEEP_EPOCHS"),
                         ("n_layers=1,2", "--grid and --extra both set n_layers")):
        refused = sweep(encoded, grid)
        assert_clean_failure(refused, needle, code=2)
        assert "usage:" not in refused.stderr
    assert not (encoded.artifacts / "sweep").exists() or not any((encoded.artifacts / "sweep").iterdir())


def test_a_run_that_fails_leaves_the_others_in_the_table_and_the_exit_code_says_so(encoded):
    result = sweep(encoded, "learning_rate=0.003,1000000", "--warmup-steps", "1")  # the second one diverges
    assert_clean_failure(result, "1 of 2 runs failed", "learning_rate-1000000", "train.log")
    table = json.loads((encoded.artifacts / "sweep" / "results.json").read_text())
    assert [row["setting"] for row in table] == [{"learning_rate": "0.003"}]


def test_ctrl_c_lets_the_run_save_and_the_next_sweep_resumes_it(encoded, tmp_path):
    """Ctrl+C reaches the sweep and its run (one process group): the run saves last.pt before the sweep stops."""
    at = TINY_TRAIN.index("--learning-rate")
    tiny = TINY_TRAIN[:at] + TINY_TRAIN[at + 2:]
    marker, epochs = tmp_path / "paused", 2
    tiny = [word for i, word in enumerate(tiny) if word != "--epochs" and not (i and tiny[i - 1] == "--epochs")]
    cmd = [sys.executable, str(REPO / "stages" / "sweep.py"), "--grid", "learning_rate=0.001,0.002", "--epochs",
           str(epochs), "--data-dir", str(encoded.data), "--artifacts-dir", str(encoded.artifacts), "--extra", " ".join(tiny)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FAULT_AT_STEP": f"{steps_per_epoch(encoded) + 2}:pause={marker}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(marker, seconds=120, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C at the terminal does
    wait_for(signalled_marker(marker), seconds=60, proc=proc)  # the run has the Ctrl+C
    marker.unlink()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "the sweep resumes that run" in err, err
    first = next((encoded.artifacts / "sweep").glob("learning_rate-0.001_*"))
    assert (first / "checkpoints" / "last.pt").exists() and "saved" in (first / "train.log").read_text()
    assert not list((encoded.artifacts / "sweep").glob("learning_rate-0.002_*")), "the sweep stopped after that run"

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"resuming \S*last.pt from epoch 2", (first / "train.log").read_text())
    rows = json.loads((encoded.artifacts / "sweep" / "results.json").read_text())
    assert sorted(row["setting"]["learning_rate"] for row in rows) == ["0.001", "0.002"]


def test_two_sweeps_of_one_grid_in_one_folder_share_the_runs_and_both_exit_0(encoded, tmp_path):
    """A run one sweep is training, the other leaves to it. Before, each started train.py on the other's
    run, was refused by its training lock, wrote that refusal over the run's log and exited 1."""
    marker, grid = tmp_path / "paused", "learning_rate=0.003,0.002"
    tiny = [word for i, word in enumerate(TINY_TRAIN)
            if word not in ("--epochs", "--learning-rate") and TINY_TRAIN[i - 1] not in ("--epochs", "--learning-rate")]
    cmd = [sys.executable, str(REPO / "stages" / "sweep.py"), "--grid", grid, "--epochs", "1", "--data-dir",
           str(encoded.data), "--artifacts-dir", str(encoded.artifacts), "--extra", " ".join(tiny)]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FAULT_AT_STEP": f"2:pause={marker}"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the first sweep's first run reached step 2"
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        while first.poll() is None:  # the first sweep's runs pause at step 2 until the marker is gone
            marker.unlink(missing_ok=True)
            time.sleep(0.05)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "Traceback" not in err, out + err
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stdout + second.stderr
    assert re.search(rf"learning_rate-0.003_\S+: another sweep \(pid {first.pid}\) is training it", second.stdout)
    assert "1 run(s) left to another sweep" in second.stdout
    logs = {log.parent.name: log.read_text() for log in (encoded.artifacts / "sweep").glob("*/train.log")}
    assert len(logs) == 2 and all("another training run" not in text and "done in" in text for text in logs.values())
    rows = json.loads((encoded.artifacts / "sweep" / "results.json").read_text())
    assert sorted(row["setting"]["learning_rate"] for row in rows) == ["0.002", "0.003"]
    assert not list((encoded.artifacts / "sweep").glob("*/.sweep.lock")), "each run's lock goes with it"
