"""Fault injection: every stage attacked; no finished work lost, every fault explained.

Faults are injected deterministically by the test-only hooks of tests/fault_hooks/sitecustomize.py:
FAULT_AT_STEP (train.py: signal, kill -9, OOM, pause on a marker file), FAULT_ENOSPC (a write
fails with "no space left"), FAULT_KILL_BEFORE_RENAME (kill -9 with a complete temp file not yet renamed).
Nothing here sleeps to wait for a process: tests wait on files or on exit.
Marked `slow` where a case needs several trainings (select with -m slow / -m "not slow").
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import (PYTHON, REPO, TINY_TRAIN, Workspace, assert_clean_failure, losses, make_corpus_text,
                      steps_per_epoch)

NO_TRACEBACK = "Traceback"


# ----------------------------------------------------------------------------- kill -9 and signals


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [7, 30, 47])
def test_kill_9_during_training_then_rerun_equals_uninterrupted(tmp_path, corpus_file, kill_step):
    straight = Workspace(tmp_path / "a").prepare_data(corpus_file)
    straight.run("train.py", *TINY_TRAIN, "--epochs", "3")
    killed = Workspace(tmp_path / "b").prepare_data(corpus_file)
    first = killed.run("train.py", *TINY_TRAIN, "--epochs", "3", env={"FAULT_AT_STEP": f"{kill_step}:sigkill"}, check=False)
    assert first.returncode == -9
    assert not (killed.artifacts / "checkpoints" / "train_done.json").exists()
    killed.run("train.py", *TINY_TRAIN, "--epochs", "3")
    assert losses(killed) == losses(straight)


@pytest.mark.parametrize("target", ["train.txt", "stats.json", "spm.model", "val.npy", "corpus.txt"])
def test_kill_9_before_an_output_is_renamed_leaves_nothing_complete(tmp_path, corpus_file, target):
    ws = Workspace(tmp_path)
    stage = {"train.txt": "prepare.py", "stats.json": "prepare.py", "spm.model": "train_tokenizer.py",
             "val.npy": "encode.py", "corpus.txt": "download.py"}[target]
    order = ["download.py", "prepare.py", "train_tokenizer.py", "encode.py"]
    args = {"download.py": ["--corpus-path", corpus_file], "train_tokenizer.py": ["--vocab-size", "320"]}
    for script in order[:order.index(stage)]:
        ws.run(script, *args.get(script, []))
    killed = ws.run(stage, *args.get(stage, []), env={"FAULT_KILL_BEFORE_RENAME": target}, check=False)
    assert killed.returncode == -9
    sidecars = {"prepare.py": ws.data / "prepared" / "stats.json", "train_tokenizer.py": ws.artifacts / "tokenizer" / "tokenizer.json",
                "encode.py": ws.data / "encoded" / "val.json", "download.py": ws.data / "raw" / "corpus.json"}
    assert not sidecars[stage].exists(), "the stage's completion sidecar must not exist after a kill"
    ws.run(stage, *args.get(stage, []))  # rerun completes and removes the dead process's temp file
    assert sidecars[stage].exists()
    assert not list(ws.root.rglob(f".{target}.tmp*"))


def test_sigterm_during_download_keeps_the_partial_file_for_resume(workspace):
    import http.server
    import threading

    body = make_corpus_text().encode()
    sent_half = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:start + 16384])
            self.wfile.flush()
            if not start:
                sent_half.set()
                threading.Event().wait(5)  # hold the connection open until the client is gone
                return
            self.wfile.write(body[start + 16384:])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/c.txt"
    cmd = [PYTHON, str(REPO / "stages" / "download.py"), "--data-dir", str(workspace.data), "--artifacts-dir",
           str(workspace.artifacts), "--corpus-url", url]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = workspace.data / "raw" / "corpus.txt.part"
    assert sent_half.wait(60)
    deadline = time.time() + 60
    while (not part.exists() or part.stat().st_size < 8192) and time.time() < deadline:
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and NO_TRACEBACK not in err
    assert part.exists() and not (workspace.data / "raw" / "corpus.txt").exists()
    workspace.run("download.py", "--corpus-url", url)
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == body
    server.shutdown()


HELD_CLEANUP = """
import sys, time
sys.path.insert(0, "stages")
import torch
from lib.runtime.stage import run_stage, signals_held

def main(cfg):
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    a @ a  # torch's worker threads now exist, and the kernel may hand a signal to any of them
    with signals_held():
        print("cleaning up", flush=True)
        deadline = time.time() + 1.5
        while time.time() < deadline:
            a @ a
        print("cleanup finished", flush=True)
    print("went on after the Ctrl+C", flush=True)

run_stage(main, {})
"""


def test_ctrl_c_during_a_held_cleanup_lets_it_finish_then_stops():
    """export.py removes its staging folder this way: Ctrl+C, even three times, must not cut it short."""
    proc = subprocess.Popen([PYTHON, "-c", HELD_CLEANUP], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline() == "cleaning up\n"
    for _ in range(3):  # at the process group, as a terminal sends it
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert "cleanup finished" in out and "went on" not in out, (out, err)
    assert proc.returncode == 130 and "interrupted" in err and NO_TRACEBACK not in err, err


# ----------------------------------------------------------------------------- corrupted files


def test_truncated_last_checkpoint_falls_back_to_the_previous_good_one(encoded):
    stop_at = steps_per_epoch(encoded) + 3  # early in epoch 2: epoch_001.pt exists
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "3", env={"FAULT_AT_STEP": f"{stop_at}:sigint"}, check=False)
    assert (encoded.artifacts / "checkpoints" / "epoch_001.pt").exists()
    last = encoded.artifacts / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    out = encoded.run("train.py", *TINY_TRAIN, "--epochs", "3")
    assert "last.pt is not a valid checkpoint" in out.stdout and "resuming" in out.stdout
    assert "resuming" in out.stdout and "epoch_001.pt" in out.stdout
    assert len(encoded.history()["epochs"]) == 3


def test_garbage_checkpoint_is_named_in_the_error(trained, tmp_path):
    import random
    import sys
    sys.path.insert(0, str(REPO / "stages"))
    from lib.training.checkpoints import load_checkpoint
    from lib.runtime.errors import PipelineError

    garbage = tmp_path / "garbage.pt"
    # Random bytes make the unpickler fail in many ways (IndexError, KeyError, ...): every one is a clear error.
    for seed in range(200):
        garbage.write_bytes(random.Random(seed).randbytes(512))
        with pytest.raises(PipelineError, match="not a checkpoint of this pipeline"):
            load_checkpoint(garbage)
    result = trained.run("generate.py", "--checkpoint", garbage, check=False)
    assert_clean_failure(result, str(garbage), "not a checkpoint of this pipeline", "CHECKPOINT=best_model.pt")
    assert "delete" not in result.stderr, "never advise deleting a file the pipeline did not write"


def test_truncated_token_file_is_refused(encoded):
    npy = encoded.data / "encoded" / "train.npy"
    data = np.load(npy)
    np.save(npy, data[: len(data) // 2])
    result = encoded.run("train.py", *TINY_TRAIN, check=False)
    assert_clean_failure(result, "train.npy holds", "make encode")


def test_corrupted_tokenizer_model_is_refused_by_encode(encoded):
    model = encoded.artifacts / "tokenizer" / "spm.model"
    model.write_bytes(b"not a sentencepiece model")
    result = encoded.run("encode.py", check=False)
    assert_clean_failure(result, "spm.model", "make tokenizer")


def test_corpus_smaller_than_one_window_is_refused(workspace, tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(make_corpus_text(documents=20, lines=1), encoding="utf-8")
    workspace.run("download.py", "--corpus-path", corpus)
    workspace.run("prepare.py")
    too_small = workspace.run("train_tokenizer.py", "--vocab-size", "280", check=False)
    assert_clean_failure(too_small, "vocab_size 280 is too small", "VOCAB_SIZE=")
    workspace.run("train_tokenizer.py", "--vocab-size", too_small.stderr.split("VOCAB_SIZE=")[1].split()[0])
    workspace.run("encode.py")
    result = workspace.run("train.py", *TINY_TRAIN, "--max-seq-length", "512", check=False)
    assert_clean_failure(result, "fewer than one window of max_seq_length + 1 = 513", "SEQ_LEN")


@pytest.mark.slow
def test_one_50_mb_line_is_split_trained_and_encoded(workspace, tmp_path):
    words = make_corpus_text(documents=60).split()
    rng = np.random.default_rng(0)
    line = " ".join(words[i] for i in rng.integers(0, len(words), 9_500_000))  # about 50 MB, one line
    corpus = tmp_path / "huge.txt"
    corpus.write_text(make_corpus_text(documents=10) + "\n" + line + "\n", encoding="utf-8")
    assert corpus.stat().st_size > 50_000_000
    workspace.run("download.py", "--corpus-path", corpus)
    out = workspace.run("prepare.py")
    stats = json.loads((workspace.data / "prepared" / "stats.json").read_text())
    assert stats["lines_split"] == 1 and stats["pieces_added_by_split"] > 12_000
    assert "1 lines longer than 4000 bytes split" in out.stdout
    prepared = (workspace.data / "prepared" / "train.txt").read_bytes() + (workspace.data / "prepared" / "val.txt").read_bytes()
    assert prepared.count(b" ") + prepared.count(b"\n") >= 9_500_000 - 1, "words were dropped"
    workspace.run("train_tokenizer.py", "--vocab-size", "320")
    workspace.run("encode.py")
    meta = json.loads((workspace.data / "encoded" / "train.json").read_text())
    val = json.loads((workspace.data / "encoded" / "val.json").read_text())
    assert meta["tokens"] + val["tokens"] > 9_000_000


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(encoded):
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "3", env={"FAULT_AT_STEP": "30:sigint"}, check=False)
    before = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)
    result = encoded.run("train.py", *TINY_TRAIN, "--epochs", "3", env={"FAULT_ENOSPC": "last.pt"}, check=False)
    assert_clean_failure(result, "disk full while writing", "last.pt", "free some disk space", "#disk-full")
    after = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)
    assert after["step"] == before["step"]
    assert not list((encoded.artifacts / "checkpoints").glob(".last.pt.tmp*"))


def test_disk_full_while_writing_a_token_file(encoded):
    (encoded.data / "encoded" / "train.npy").unlink()
    result = encoded.run("encode.py", env={"FAULT_ENOSPC": "train.npy"}, check=False)
    assert_clean_failure(result, "disk full while writing", "train.npy")
    assert not (encoded.data / "encoded" / "train.npy").exists()


# ----------------------------------------------------------------------------- memory, locks, parameters


def test_out_of_memory_under_an_address_space_limit(encoded):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    result = encoded.run("train.py", *TINY_TRAIN, "--d-model", "512", "--n-heads", "4", "--batch-size", "4096",
                         check=False, preexec_fn=limit)
    assert_clean_failure(result, "Out of memory", "address-space limit", "the largest batch that fits is about BATCH_SIZE=")


def test_second_training_in_the_same_folder_is_refused(encoded, tmp_path):
    marker = tmp_path / "paused"
    cmd = [PYTHON, str(REPO / "stages" / "train.py"), "--data-dir", str(encoded.data), "--artifacts-dir",
           str(encoded.artifacts), *TINY_TRAIN, "--epochs", "1"]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FAULT_AT_STEP": f"3:pause={marker}"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the first run never reached step 3"
    second = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", check=False)
    assert_clean_failure(second, "another training run", str(first.pid))
    marker.unlink()
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert (encoded.artifacts / "checkpoints" / "train_done.json").exists()


@pytest.mark.parametrize("flag, value, name", [
    ("--learning-rate", "0", "learning_rate"), ("--learning-rate", "-0.1", "learning_rate"),
    ("--batch-size", "-4", "batch_size"), ("--epochs", "0", "epochs"), ("--max-seq-length", "9000", "max_seq_length"),
    ("--dropout", "1.5", "dropout"),
    ("--dropout", "often", "expected a number in [0, 1) or 'auto'"),
])
def test_bad_training_parameter_is_refused_naming_it(encoded, flag, value, name):
    result = encoded.run("train.py", flag, value, check=False)
    assert_clean_failure(result, name, code=2)
    assert not (encoded.artifacts / "checkpoints").exists()


def test_unknown_key_in_train_yaml_is_refused(encoded, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "config" / "defaults.yaml").read_text().replace("  epochs: 20", "  epochs: 20\n  epoch: 3"))
    result = encoded.run("train.py", "--config", config, check=False)
    assert_clean_failure(result, "unknown key 'train.epoch'", code=2)


def test_a_stage_whose_reader_leaves_stops_without_a_traceback(workspace):
    """`python stages/list_runs.py | true`: the pipe's reader is gone before the first line is written."""
    stage = (f"'{PYTHON}' '{REPO / 'stages' / 'list_runs.py'}' --data-dir '{workspace.data}' "
             f"--artifacts-dir '{workspace.artifacts}'")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", f"{stage} | true"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 141, result.stderr  # 128 + SIGPIPE, as any writer into a closed pipe
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
