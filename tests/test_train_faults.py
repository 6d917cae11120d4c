"""Real faults around training: a disk that fills up (a tmpfs) at an epoch's end or is too small from
the start, Ctrl+C of several processes sent to the process group as a terminal does, and a terminal
that closes under a run."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import termios
import time

import torch

import pytest
from conftest import PYTHON, REPO, TINY_TRAIN, Workspace, losses, steps_per_epoch
from faults_helpers import fill, signalled_marker, small_disk, wait_for


def start_train(ws, *args, env=None):
    cmd = [PYTHON, str(REPO / "stages" / "train.py"), "--data-dir", str(ws.data), "--artifacts-dir", str(ws.artifacts),
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_disk_full_at_an_epoch_end_loses_no_finished_epoch(encoded, corpus_file, tmp_path):
    straight = Workspace(tmp_path / "straight").prepare_data(corpus_file)
    straight.run("train.py", *TINY_TRAIN, "--epochs", "3")
    ckpt, marker = encoded.artifacts / "checkpoints", tmp_path / "paused"
    with small_disk(ckpt, "20m"):
        # Paused inside epoch 2 (after its free-space check), the disk fills up; the epoch's saves then fail for real.
        proc = start_train(encoded, *TINY_TRAIN, "--epochs", "3",
                           env={"FAULT_AT_STEP": f"{steps_per_epoch(encoded) + 3}:pause={marker}"})
        wait_for(marker, proc=proc)
        filler = fill(ckpt, leave_bytes=40_000)
        marker.unlink()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert "disk full while writing" in err and "free some disk space" in err and "Traceback" not in err
        assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 1, "epoch 1's save is intact"
        assert not (encoded.artifacts / ".train.lock").exists(), "the lock goes with the run"
        assert len((ckpt / "metrics.jsonl").read_text().splitlines()) == 1
        assert not list(ckpt.glob(".*.tmp*"))

        filler.unlink()
        encoded.run("train.py", *TINY_TRAIN, "--epochs", "3")
        metrics = [json.loads(line)["epoch"] for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
        assert metrics == [1, 2, 3], "each epoch once in metrics.jsonl"
        assert losses(encoded) == losses(straight)


def test_a_folder_that_cannot_hold_one_save_is_refused_before_training(encoded):
    ckpt = encoded.artifacts / "checkpoints"
    with small_disk(ckpt, "1m"):
        fill(ckpt, leave_bytes=150_000)
        result = encoded.run("train.py", *TINY_TRAIN, check=False)
        assert result.returncode == 1, result.stderr
        assert "cannot hold this run's checkpoints" in result.stderr and "nothing was trained" in result.stderr
        assert "epoch  1/2" not in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_or_sighup_of_two_processes_ends_like_one_and_names_the_settings(encoded, tmp_path, signum, code):
    marker = tmp_path / "paused"
    args = [*TINY_TRAIN, "--epochs", "3", "--learning-rate", "0.0025", "--nproc", "2", "--dropout", "0"]
    proc = start_train(encoded, *args, env={"FAULT_AT_STEP": f"5:pause={marker}", "FAULT_RANK": "0"})
    wait_for(marker, proc=proc)
    os.killpg(proc.pid, signum)  # what Ctrl+C at the terminal (or the shell of a closed one) does: the whole group
    # The launcher forwards the signal to the ranks in their own session; rank 0 must have it before its step
    # goes on, or a loaded machine lets both ranks run one step more before they agree to stop.
    wait_for(signalled_marker(marker), seconds=60, proc=proc)
    marker.unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "SignalException" not in err and "ChildFailedError" not in err, err
    assert "resume with: python stages/train.py" in err and "--learning-rate 0.0025" in err and "--nproc 2" in err
    last = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and last["step"] == 6  # the paused step finishes, then both stop
    assert not (encoded.artifacts / ".train.lock").exists()


def test_an_interrupted_run_moved_to_the_archive_resumes_when_its_settings_return(encoded, corpus_file, tmp_path):
    mine = [*TINY_TRAIN, "--epochs", "3", "--learning-rate", "0.002"]
    straight = Workspace(tmp_path / "straight").prepare_data(corpus_file)
    straight.run("train.py", *mine)
    marker = tmp_path / "paused"
    proc = start_train(encoded, *mine, env={"FAULT_AT_STEP": f"{steps_per_epoch(encoded) + 3}:pause={marker}"})
    wait_for(marker, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    marker.unlink()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    other = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1")  # other settings: the interrupted run is archived
    assert "previous run moved aside" in other.stdout
    listed = encoded.run("list_runs.py")
    assert "1/3 (interrupted" in listed.stdout
    back = encoded.run("train.py", *mine)
    assert "the interrupted run" in back.stdout and "resuming last.pt from epoch 2" in back.stdout
    assert losses(encoded) == losses(straight), "resumed exactly, not trained from epoch 1"


def test_clean_targets_refuse_while_a_training_run_holds_the_folder(encoded, tmp_path):
    """`make clean-checkpoints` (or `make clean`) in another terminal would delete a run still training: refused."""
    marker = tmp_path / "paused"
    proc = start_train(encoded, *TINY_TRAIN, "--epochs", "3",
                       env={"FAULT_AT_STEP": f"{steps_per_epoch(encoded) + 2}:pause={marker}"})
    wait_for(marker, proc=proc)  # epoch 1 is saved; the run is inside epoch 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    make = ["make", "--no-print-directory", "-C", str(REPO), f"ARTIFACTS_DIR={encoded.artifacts}", f"DATA_DIR={encoded.data}"]
    for target in ("clean-checkpoints", "clean"):
        refused = subprocess.run([*make, target], capture_output=True, text=True, env=env)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert f"held by a running process (pid {proc.pid})" in refused.stderr and "nothing was removed" in refused.stderr
    assert (encoded.artifacts / "checkpoints" / "last.pt").exists() and (encoded.data / "encoded" / "train.npy").exists()

    os.killpg(proc.pid, signal.SIGINT)
    marker.unlink()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    subprocess.run([*make, "clean-checkpoints"], capture_output=True, text=True, env=env, check=True)
    assert not (encoded.artifacts / "checkpoints").exists()


def test_a_closed_terminal_saves_exits_129_and_the_rerun_resumes(encoded, corpus_file, tmp_path):
    """Training runs with a pseudo-terminal as its controlling terminal; mid-epoch 1 the test closes the
    terminal's other end, as a closed window or a dropped SSH session does. The kernel sends SIGHUP, and
    every later write to the terminal fails with EIO: the save must still happen and end with 129, not a
    traceback (exit 1) or a failed flush at exit (120); the rerun resumes instead of archiving an empty run."""
    straight = Workspace(tmp_path / "straight").prepare_data(corpus_file)
    straight.run("train.py", *TINY_TRAIN)
    marker = tmp_path / "paused"
    terminal, tty = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns: the bar is drawn
    cmd = [PYTHON, str(REPO / "stages" / "train.py"), "--data-dir", str(encoded.data), "--artifacts-dir",
           str(encoded.artifacts), *TINY_TRAIN]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=tty, stdout=tty, stderr=tty, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # the pty: its terminal
                            env={**os.environ, "FAULT_AT_STEP": f"5:pause={marker}"})
    os.close(tty)
    shown, deadline = b"", time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        if select.select([terminal], [], [], 0.05)[0]:  # read what it shows, so that it never blocks writing
            shown += os.read(terminal, 65536)
    assert marker.exists(), shown.decode(errors="replace")
    while select.select([terminal], [], [], 0.5)[0]:
        shown += os.read(terminal, 65536)
    assert b"epoch 1/2" in shown, "the progress bar was being drawn on the terminal"
    os.close(terminal)  # the terminal goes away
    wait_for(signalled_marker(marker), seconds=60, proc=proc)
    marker.unlink()
    assert proc.wait(timeout=120) == 129
    last = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)
    assert (last["epoch"], last["position"], last["step"]) == (0, 6, 6)  # the paused step finished, then the save
    assert not (encoded.artifacts / ".train.lock").exists()
    log = (encoded.artifacts / "checkpoints" / "train.log").read_text()
    assert "resume with: python stages/train.py" in log, "the terminal is gone: the log keeps the command"

    rerun = encoded.run("train.py", *TINY_TRAIN)
    assert "resuming" in rerun.stdout and "from epoch 1, batch 6" in rerun.stdout
    assert not (encoded.artifacts / "checkpoints-archive").exists(), "no run was moved aside"
    assert losses(encoded) == losses(straight)

