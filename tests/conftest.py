"""Shared fixtures: tiny corpora made in the test, stage runners, a tiny trained pipeline.

Everything runs offline (only 127.0.0.1) and with tiny settings, so the suite stays
fast on two cores. Stage scripts run with the interpreter running pytest (the venv's).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import faults_helpers  # noqa: F401 - arms the test-only fault hooks in every process a test starts
import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

EN_SUBJECTS = ["the king", "the people", "the prophet", "a man", "the servant", "his son", "the woman", "the LORD"]
EN_VERBS = ["spake unto", "went into", "looked upon", "gave bread to", "blessed", "called", "sent word to", "followed"]
EN_OBJECTS = ["the city", "the house of David", "the river", "all the elders", "the mountain", "the field",
              "the children of Israel", "the temple"]
ES_SUBJECTS = ["el rey", "el pueblo", "el profeta", "un hombre", "el siervo", "su hijo", "la mujer", "Jehová"]
ES_VERBS = ["habló á", "entró en", "miró á", "dió pan á", "bendijo á", "llamó á", "envió palabra á", "siguió á"]
ES_OBJECTS = ["la ciudad", "la casa de David", "el río", "todos los ancianos", "el monte", "el campo",
              "los hijos de Israel", "el templo"]

# Tiny model and tokenizer for tests: trains in seconds.
TINY_VOCAB = 320
TINY_TOKENIZER = ["--vocab-size", str(TINY_VOCAB)]
TINY_TRAIN = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--max-seq-length", "32", "--batch-size", "16",
              "--epochs", "2", "--warmup-steps", "5", "--learning-rate", "0.003", "--dtype", "float32",
              "--sample-every", "1", "--sample-tokens", "8", "--checkpoint-every", "1", "--threads", "1"]


def make_corpus_text(documents: int = 40, lines: int = 12, seed: int = 0) -> str:
    """Bilingual documents: each holds English sentences then their Spanish counterparts."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        picks = [(rng.randrange(8), rng.randrange(8), rng.randrange(8)) for _ in range(lines)]
        english = [f"And {EN_SUBJECTS[s]} {EN_VERBS[v]} {EN_OBJECTS[o]}." for s, v, o in picks]
        spanish = [f"Y {ES_SUBJECTS[s]} {ES_VERBS[v]} {ES_OBJECTS[o]}; ¿quién oyó? ¡Sí!" for s, v, o in picks]
        docs.append("\n".join(english + spanish))
    return "\n\n".join(docs) + "\n"


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus_in.txt"
    path.write_text(make_corpus_text(), encoding="utf-8")
    return path


def assert_clean_failure(result, *needles, code=1):
    """The stage failed with `code`, said each needle on stderr, and printed no traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr


def losses(ws) -> list[tuple]:
    """Per epoch: the training loss, the eval-mode training loss, the validation loss."""
    return [(e["train_loss"], e["train_loss_eval"], e["val_loss"]) for e in ws.history()["epochs"]]


def steps_per_epoch(ws, seq_len=32, batch=16) -> int:
    tokens = json.loads((ws.data / "encoded" / "train.json").read_text())["tokens"]
    return -(-((tokens - 1) // seq_len) // batch)


def run_stage(script: str, *args, data: Path, artifacts: Path, env: dict | None = None, check: bool = True,
              timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    cmd = [PYTHON, str(REPO / "stages" / script), "--data-dir", str(data), "--artifacts-dir", str(artifacts), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
    return result


class Workspace:
    """A data folder and an artifacts folder under tmp, plus helpers to run stages in them."""

    def __init__(self, root: Path):
        self.root, self.data, self.artifacts = root, root / "data", root / "artifacts"

    def run(self, script, *args, **kwargs):
        return run_stage(script, *args, data=self.data, artifacts=self.artifacts, **kwargs)

    def prepare_data(self, corpus: Path, vocab=TINY_TOKENIZER):
        self.run("download.py", "--corpus-path", corpus)
        self.run("prepare.py")
        self.run("train_tokenizer.py", *vocab)
        self.run("encode.py")
        return self

    def history(self) -> dict:
        return json.loads((self.artifacts / "checkpoints" / "history.json").read_text())


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def encoded(tmp_path, corpus_file) -> Workspace:
    """A workspace whose data stages have run on the fixture corpus."""
    return Workspace(tmp_path).prepare_data(corpus_file)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Workspace:
    """One tiny trained model shared by the evaluation and generation tests (read-only for them)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus_in.txt"
    corpus.write_text(make_corpus_text(), encoding="utf-8")
    ws = Workspace(root).prepare_data(corpus)
    ws.run("train.py", *TINY_TRAIN, "--epochs", "3")
    return ws


def copy_project(dest: Path) -> Path:
    """The repository's tracked files (no venv, data or artifacts) in a scratch folder, mtimes kept."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest
