"""Real faults around the finished model: a read-only artifacts folder (a read-only bind mount),
a CHECKPOINT that is a system file or does not exist, a run history cut short."""

from __future__ import annotations

import shutil

from conftest import Workspace
from faults_helpers import read_only


def test_evaluate_into_a_read_only_artifacts_folder_says_so(trained, tmp_path):
    ws = Workspace(tmp_path)
    shutil.copytree(trained.data, ws.data)
    shutil.copytree(trained.artifacts, ws.artifacts)
    shutil.rmtree(ws.artifacts / "eval", ignore_errors=True)
    ws.run("evaluate.py", "--write-params", ws.artifacts / "params" / "evaluate.json")  # as make would, beforehand
    with read_only(ws.artifacts):
        result = ws.run("evaluate.py", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot write" in result.stderr and "read-only" in result.stderr and "ARTIFACTS_DIR" in result.stderr
    assert not (ws.artifacts / "eval" / "report.json").exists()


def test_a_checkpoint_that_is_a_system_file_or_missing_is_named(trained):
    foreign = trained.run("generate.py", "--checkpoint", "/etc/passwd", check=False)
    assert foreign.returncode == 1 and "Traceback" not in foreign.stderr
    assert "/etc/passwd is not a checkpoint of this pipeline" in foreign.stderr
    assert "delete" not in foreign.stderr, "never tell a user to delete a file the pipeline did not write"
    missing = trained.run("evaluate.py", "--checkpoint", "epoch_009.pt", check=False)
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr
    assert "best_model.pt" in missing.stderr and "epoch_001.pt" in missing.stderr, "names the checkpoints that exist"


def test_make_runs_names_a_run_whose_history_is_cut_short_and_lists_the_rest(trained, tmp_path):
    ws = Workspace(tmp_path)
    shutil.copytree(trained.artifacts / "checkpoints", ws.artifacts / "checkpoints")
    shutil.copytree(trained.artifacts / "checkpoints", ws.artifacts / "checkpoints-archive" / "20260101-000000")
    history = ws.artifacts / "checkpoints" / "history.json"
    history.write_bytes(history.read_bytes()[: history.stat().st_size // 2])  # a copy cut short

    listed = ws.run("list_runs.py")
    assert f"skipped {ws.artifacts / 'checkpoints'}: its history.json cannot be read" in listed.stdout
    rows = [line for line in listed.stdout.splitlines() if line.startswith("| 1")]
    assert len(rows) == 1 and "(current)" not in rows[0] and "checkpoints-archive" in rows[0]

    shutil.rmtree(ws.artifacts / "checkpoints-archive")
    alone = ws.run("list_runs.py")
    assert "skipped" in alone.stdout and "no runs yet" not in alone.stdout and "Traceback" not in alone.stderr
