"""Several training processes (torchrun + DistributedDataParallel) on the tiny fixture.

Every run here is a real torchrun launch of stages/train.py with gloo on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON, REPO, TINY_TRAIN, Workspace, make_corpus_text

sys.path.insert(0, str(REPO / "stages"))

# Dropout and input noise draw per process, so only without them do one and two processes
# compute the same numbers; float32 keeps the comparison about the algorithm.
EXACT = [*TINY_TRAIN, "--dropout", "0", "--input-noise", "0", "--dtype", "float32", "--threads", "1"]
LOSSES = ("train_loss", "train_loss_eval", "val_loss")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workspace:
    """Data and tokenizer made once; each run copies them (runs write into artifacts/)."""
    root = tmp_path_factory.mktemp("ddp-data")
    corpus = root / "corpus_in.txt"
    corpus.write_text(make_corpus_text(), encoding="utf-8")
    return Workspace(root).prepare_data(corpus)


def fresh(prepared: Workspace, root) -> Workspace:
    shutil.copytree(prepared.data, root / "data")
    shutil.copytree(prepared.artifacts / "tokenizer", root / "artifacts" / "tokenizer")
    return Workspace(root)


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory) -> dict:
    ws = fresh(prepared, tmp_path_factory.mktemp("nproc1"))
    ws.run("train.py", *EXACT)
    return ws.history()


def assert_same_losses(history: dict, reference: dict, rel: float) -> None:
    assert len(history["epochs"]) == len(reference["epochs"])
    for got, want in zip(history["epochs"], reference["epochs"]):
        for key in LOSSES:
            assert got[key] == pytest.approx(want[key], rel=rel), (got["epoch"], key, got[key], want[key])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(prepared, one_process, tmp_path):
    ws = fresh(prepared, tmp_path)
    out = ws.run("train.py", *EXACT, "--nproc", "2")
    assert "launching: torchrun --standalone --nproc_per_node=2" in out.stdout
    assert "world size 2 (gloo, 8 windows per process and step, 1 threads each)" in out.stdout
    assert out.stdout.count("| val ") == 2  # rank 0 alone logs the epochs
    assert_same_losses(ws.history(), one_process, rel=1e-4)
    checkpoint = torch.load(ws.artifacts / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_by_rank"]) == 2


def test_two_machines_simulated_on_one_host(prepared, one_process, tmp_path):
    ws = fresh(prepared, tmp_path)
    port = str(free_port())
    launches = []
    for node_rank in ("1", "0"):  # each "machine" runs the same command with its own NODE_RANK
        launches.append(subprocess.Popen(
            [PYTHON, "stages/train.py", "--data-dir", str(ws.data), "--artifacts-dir", str(ws.artifacts), *EXACT,
             "--nnodes", "2", "--node-rank", node_rank, "--master-addr", "127.0.0.1", "--master-port", port],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    assert "world size 2 (gloo" in outputs[1]
    assert_same_losses(ws.history(), one_process, rel=1e-4)


@pytest.fixture(scope="module")
def two_processes_uninterrupted(prepared, tmp_path_factory) -> dict:
    """The default dropout and input noise: a resumed run matches only if every rank's random state came back."""
    ws = fresh(prepared, tmp_path_factory.mktemp("nproc2"))
    ws.run("train.py", *TINY_TRAIN, "--nproc", "2")
    return ws.history()


@pytest.mark.parametrize("fault", ["sigkill", "oom", "sigint"])
def test_a_stopped_or_killed_rank_resumes_to_the_same_losses(prepared, two_processes_uninterrupted, tmp_path, fault):
    ws = fresh(prepared, tmp_path)
    steps_per_epoch = two_processes_uninterrupted["epochs"][0]["step"]
    at = steps_per_epoch + 3  # in the middle of epoch 2
    stopped = ws.run("train.py", *TINY_TRAIN, "--nproc", "2", check=False,
                     env={"FAULT_AT_STEP": f"{at}:{fault}", "FAULT_RANK": "1"})
    assert stopped.returncode != 0
    last = torch.load(ws.artifacts / "checkpoints" / "last.pt", weights_only=True)
    if fault in ("sigkill", "oom"):
        # rank 1 died or failed: rank 0 says why it stops too; the last save is the end of epoch 1
        assert "another training process stopped or died" in stopped.stderr
        assert (last["epoch"], last["position"]) == (1, 0)
        if fault == "oom":
            assert "Out of memory at BATCH_SIZE=16" in stopped.stderr and "rank 1 of 2" in stopped.stderr
    else:
        # Ctrl+C reached one rank during step `at`: both finish that step, stop before the next,
        # and rank 0 saves once, there
        assert stopped.stderr.count("saved ") == 1
        assert (last["epoch"], last["position"], last["step"]) == (1, 4, at + 1)
    assert not (ws.artifacts / "checkpoints" / "train_done.json").exists()
    resumed = ws.run("train.py", *TINY_TRAIN, "--nproc", "2")
    assert "resum" in resumed.stdout.lower()
    assert_same_losses(ws.history(), two_processes_uninterrupted, rel=1e-6)


def test_launch_problems_are_reported_before_any_work(prepared, tmp_path):
    ws = fresh(prepared, tmp_path)
    uneven = ws.run("train.py", *EXACT, "--nproc", "3", check=False)
    assert uneven.returncode == 1
    assert "BATCH_SIZE=16 does not divide among 3 processes" in uneven.stderr
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = ws.run("train.py", *EXACT, "--nnodes", "2", "--node-rank", "0", "--master-port", str(port), check=False)
    assert taken.returncode == 1
    assert f"MASTER_PORT={port} is already in use" in taken.stderr
    assert not (ws.artifacts / "checkpoints").exists()


@pytest.mark.parametrize("ending, code, stop_code", [
    ("print('last words', end='')", 0, None),       # a finished run: buffered output still comes out
    ("sys.exit(1)", 1, None),                       # an error keeps its code
    ("sys.exit('a message')", 1, None),
    ("sys.exit(130)", 0, "130"),                    # Ctrl+C: the code goes to the launcher's file, the rank exits 0
    ("sys.exit(143)", 0, "143"),
])
def test_a_rank_ends_with_its_code_or_hands_a_stop_to_the_launcher(tmp_path, ending, code, stop_code):
    """A torchrun rank leaves by os._exit (no interpreter teardown, where gloo's threads can abort it)."""
    from lib.training.launch import STOP_FILE_ENV
    stop_file = tmp_path / "stop_code"
    script = (f"import atexit, sys\nfrom lib.training.launch import end_of_rank\natexit.register(print, 'teardown ran')\n"
              f"with end_of_rank():\n    {ending}\n")
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO / "stages", capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WORLD_SIZE": "2", STOP_FILE_ENV: str(stop_file)})
    assert result.returncode == code, result.stderr
    assert (stop_file.read_text() if stop_file.exists() else None) == stop_code
    assert "teardown ran" not in result.stdout, "the rank went through the interpreter's teardown"
    if "print" in ending:
        assert result.stdout == "last words"
    if "message" in ending:
        assert "a message" in result.stderr


def test_more_processes_than_cores_warns(capsys):
    from lib.training.launch import check_launch
    cores = os.cpu_count() or 1
    check_launch({"nproc": cores * 2, "nnodes": 1, "node_rank": 0, "master_port": 29500, "batch_size": cores * 2,
                  "device": "cpu"})
    assert f"NPROC={cores * 2} is more than this machine's {cores} cores" in capsys.readouterr().out
