"""The Makefile in a scratch copy of the project: a full tiny run, then what each change rebuilds.

The copy uses the real venv (VENV=...) and a fixture corpus (CORPUS_PATH=...), so
nothing is installed or downloaded here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_project, make_corpus_text

STAGES = ["download.py", "prepare.py", "train_tokenizer.py", "encode.py", "train.py", "evaluate.py"]


@pytest.fixture
def project(tmp_path):
    proj = copy_project(tmp_path / "proj")
    corpus = tmp_path / "corpus_in.txt"
    corpus.write_text(make_corpus_text(), encoding="utf-8")
    tiny = [f"VENV={sys.prefix}", f"CORPUS_PATH={corpus}", "VOCAB_SIZE=320", "N_LAYERS=1", "D_MODEL=32", "N_HEADS=2",
            "SEQ_LEN=32", "BATCH_SIZE=16", "EPOCHS=1", "DTYPE=float32", "THREADS=1", "MIN_FREE_GB=0.01"]
    return proj, tiny, corpus


def make(proj: Path, *args, check=True):
    result = subprocess.run(["make", *args], cwd=proj, capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")})
    if check and result.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    # under make a stage finds its parameter file already written by make: recording it again must change nothing
    assert "now records this run's settings" not in result.stdout, result.stdout
    return result


def ran(output: str) -> list[str]:
    """The stage scripts make ran (recipes echo their command lines)."""
    return [s for s in STAGES if f"stages/{s} " in output and f"python stages/{s}" in output]


def test_make_all_then_only_what_changed_rebuilds(project):
    proj, tiny, corpus = project
    first = make(proj, "all", *tiny)
    assert ran(first.stdout) == STAGES
    assert "check" in first.stdout and "report: artifacts/eval/report.md" in first.stdout
    for path in ("data/raw/corpus.txt", "data/prepared/train.txt", "artifacts/tokenizer/spm.model",
                 "data/encoded/train.npy", "artifacts/checkpoints/best_model.pt", "artifacts/checkpoints/final_model.pt",
                 "artifacts/checkpoints/history.json", "artifacts/eval/report.json"):
        assert (proj / path).exists(), path

    assert ran(make(proj, "all", *tiny).stdout) == [], "a second make all must do nothing"

    retrain = make(proj, "train", *tiny, "LR=0.001", "EPOCHS=2")
    assert ran(retrain.stdout) == ["train.py"]
    assert "learning_rate=0.001*" in retrain.stdout and "epochs=2*" in retrain.stdout

    # A shared module only training imports: make reruns train and train starts a new run
    # (the code is part of the run's identity), never "already finished".
    time.sleep(1.1)
    memory_module = proj / "stages" / "lib" / "training" / "optim.py"
    memory_module.write_text(memory_module.read_text() + "\n# edited\n")
    edited = make(proj, "train", *tiny, "LR=0.001", "EPOCHS=2")
    assert ran(edited.stdout) == ["train.py"]
    assert "already finished" not in edited.stdout and "code changed" in edited.stdout
    assert "epoch  2/2" in edited.stdout

    vocab = make(proj, "all", *tiny, "VOCAB_SIZE=310")
    assert ran(vocab.stdout) == ["train_tokenizer.py", "encode.py", "train.py", "evaluate.py"]

    time.sleep(1.1)  # mtime resolution of some file systems
    (proj / "stages" / "prepare.py").touch()
    changed = make(proj, "all", *tiny, "VOCAB_SIZE=310")
    assert ran(changed.stdout) == STAGES[1:]

    yaml_file = proj / "config" / "defaults.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("  temperature: 0.8", "  temperature: 0.7", 1))
    assert ran(make(proj, "all", *tiny, "VOCAB_SIZE=310").stdout) == ["evaluate.py"], "a YAML edit reruns only its stage"

    corpus.write_text(make_corpus_text(seed=1), encoding="utf-8")
    assert ran(make(proj, "all", *tiny, "VOCAB_SIZE=310").stdout) == STAGES, "an edited corpus reruns everything"

    make(proj, "clean-checkpoints", *tiny)
    assert not (proj / "artifacts" / "checkpoints").exists()
    assert (proj / "artifacts" / "tokenizer" / "spm.model").exists() and (proj / "data" / "encoded" / "train.npy").exists()
    assert ran(make(proj, "all", *tiny, "VOCAB_SIZE=310").stdout) == ["train.py", "evaluate.py"]

    sweep_table = proj / "artifacts" / "sweep" / "results.md"
    sweep_table.parent.mkdir()
    sweep_table.write_text("| run | final val |\n", encoding="utf-8")
    make(proj, "clean", *tiny)
    assert sweep_table.exists(), "make clean keeps sweep results"
    assert not (proj / "artifacts" / "checkpoints").exists() and not (proj / "data" / "encoded").exists()
    assert (proj / "data" / "raw" / "corpus.txt").exists()


def test_failed_stage_leaves_nothing_up_to_date(project, tmp_path):
    proj, tiny, _ = project
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = [v for v in tiny if not v.startswith("CORPUS_PATH=")] + [f"CORPUS_PATH={empty}"]
    result = make(proj, "prepare", *tiny, check=False)
    assert result.returncode != 0 and "is empty" in result.stderr
    assert not (proj / "data" / "prepared" / "stats.json").exists()
    again = make(proj, "prepare", *tiny, check=False)
    assert "stages/prepare.py" in again.stdout, "the failed stage must run again"


# Every target the docs tell users to run: each must have its own row in `make help`.
DOCUMENTED_TARGETS = ["help", "venv", "check", "all", "download", "prepare", "tokenizer", "encode", "train", "evaluate",
                      "export", "docs", "generate", "runs", "bench", "sweep", "test", "test-fast", "clean-checkpoints",
                      "clean", "distclean"]


def phony_targets(makefile: Path) -> set[str]:
    """The targets of the Makefile's .PHONY line (continuation lines included), less FORCE."""
    text = makefile.read_text(encoding="utf-8").replace("\\\n", " ")
    return set(re.search(r"^\.PHONY:(.*)$", text, re.M)[1].split()) - {"FORCE"}


def test_help_has_a_row_for_every_target_and_lists_the_variables(project):
    proj, _, _ = project
    out = make(proj, "help").stdout
    targets, variables = out.split("\nVariables", 1)
    # a row is `  NAME   description`: a name that only appears inside a variable row does not count
    rows = dict(re.findall(r"^  ([a-z][a-z-]*) {2,}(\S.*)$", targets, re.M))
    missing = sorted((set(DOCUMENTED_TARGETS) | phony_targets(proj / "Makefile")) - set(rows))
    assert not missing, f"make help has no row for {missing}:\n{targets}"
    for variable in ("LR", "EPOCHS", "BATCH_SIZE", "SEQ_LEN", "VOCAB_SIZE", "CORPUS_PATH", "CORPUS_URL", "NPROC",
                     "TEST_WORKERS"):
        assert re.search(rf"(^|\s){variable}=", variables, re.M), f"make help does not list {variable}="


def test_help_shows_the_training_defaults_of_the_yaml(project):
    import re

    import yaml
    proj, _, _ = project
    out = make(proj, "help").stdout
    start = out.index("  train      LR=")
    train_lines = out[start:out.index("  evaluate   ", start)]
    shown = dict(re.findall(r"\b([A-Z_]+)=([0-9.]+|auto)\b", train_lines))
    train = yaml.safe_load((proj / "config" / "defaults.yaml").read_text())["train"]
    for variable, key in (("LR", "learning_rate"), ("EPOCHS", "epochs"), ("BATCH_SIZE", "batch_size"),
                          ("SEQ_LEN", "max_seq_length"), ("WARMUP", "warmup_steps"), ("MIN_LR_RATIO", "min_lr_ratio"),
                          ("DROPOUT", "dropout"), ("INPUT_NOISE", "input_noise"), ("WEIGHT_DECAY", "weight_decay"),
                          ("GRAD_CLIP", "grad_clip"), ("SEED", "seed"), ("MUON_LR_SCALE", "muon_lr_scale")):
        yaml_value = train[key] if train[key] == "auto" else float(train[key])
        help_value = shown[variable] if shown[variable] == "auto" else float(shown[variable])
        assert help_value == yaml_value, f"make help shows {variable}={shown[variable]}, YAML {train[key]}"


def test_check_reports_each_problem_with_a_fix(project, tmp_path):
    proj, tiny, _ = project
    tiny = [v for v in tiny if not v.startswith(("CORPUS_PATH=", "MIN_FREE_GB="))]
    result = make(proj, "check", *tiny, f"CORPUS_PATH={tmp_path / 'nope.txt'}", "MIN_FREE_GB=1000000", check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "GB free" in result.stderr


def test_experiments_evaluate_what_was_trained_and_come_back_to_the_defaults(project):
    """train with other settings -> evaluate uses that model (no retraining) -> the defaults come back
    from the archive with identical files -> make runs lists both runs with their figures."""
    import json

    proj, tiny, _ = project
    ckpt = proj / "artifacts" / "checkpoints"
    make(proj, "all", *tiny)
    default_files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.suffix in (".pt", ".json", ".jsonl")}
    default_history = json.loads((ckpt / "history.json").read_text())["epochs"]

    other = make(proj, "train", *tiny, "LR=0.001", "EPOCHS=2")
    assert ran(other.stdout) == ["train.py"]
    assert "params: train reruns: epochs 1 -> 2, learning_rate 0.002 -> 0.001" in other.stdout
    other_history = json.loads((ckpt / "history.json").read_text())["epochs"]

    evaluated = make(proj, "evaluate", *tiny)  # the tiny variables say EPOCHS=1 and no LR: no matter
    assert ran(evaluated.stdout) == ["evaluate.py"], "evaluate must use the trained model, not retrain it"
    report = json.loads((proj / "artifacts" / "eval" / "report.json").read_text())
    assert report["epoch"] == 2 and report["run"]["settings"]["learning_rate"] == 0.001 and report["run"]["current"]
    assert "LR=0.001" in (proj / "artifacts" / "eval" / "report.md").read_text()

    # without CORPUS_PATH (the docs say evaluate needs none) evaluate must leave the corpus list as
    # training wrote it, or the next make with CORPUS_PATH would rebuild every data stage
    no_corpus = [v for v in tiny if not v.startswith("CORPUS_PATH=")]
    assert ran(make(proj, "evaluate", *no_corpus).stdout) == []

    back = make(proj, "all", *tiny)
    assert "restored the finished run" in back.stdout and "epoch  1/1" not in back.stdout, "restored, not retrained"
    assert ran(back.stdout) == ["train.py", "evaluate.py"]
    for name, data in default_files.items():
        assert (ckpt / name).read_bytes() == data, f"{name} differs from the default run's"
    assert ran(make(proj, "all", *tiny).stdout) == [], "after the restore, make all is up to date"

    listing = make(proj, "runs", *tiny).stdout
    rows = [line for line in listing.splitlines() if line.startswith("| 1") or line.startswith("| 2")]
    assert len(rows) == 2 and "(current)" in rows[0] and " LR=0.001 " in rows[1] and " EPOCHS=2 " in rows[1], \
        "the settings as the Make variables that bring the run back"
    assert f"| {default_history[-1]['val_loss']:.3f} |" in rows[0] and f"| {other_history[-1]['val_loss']:.3f} |" in rows[1]
    assert (proj / "artifacts" / "runs" / "runs.md").exists() and (proj / "artifacts" / "runs" / "val_curves.png").exists()

    restart = make(proj, "train", *tiny, "LR=0.001", "EPOCHS=2", "RESUME=no")
    assert "restored" not in restart.stdout and "epoch  2/2" in restart.stdout, "RESUME=no trains afresh"


def test_a_run_started_without_make_is_seen_by_the_next_make_train(project):
    """`python stages/train.py --learning-rate ...` records its settings in artifacts/params/train.json as it
    starts: a later `make train` with the defaults reruns (the default run comes back from the archive) instead
    of calling the other run up to date, and one with the run's own settings has nothing to do."""
    proj, tiny, _ = project
    ckpt = proj / "artifacts" / "checkpoints"
    make(proj, "all", *tiny)
    flags = ["--epochs", "1", "--batch-size", "16", "--max-seq-length", "32", "--n-layers", "1", "--d-model", "32",
             "--n-heads", "2", "--dtype", "float32", "--threads", "1"]
    direct = subprocess.run([sys.executable, "stages/train.py", *flags, "--learning-rate", "0.001"], cwd=proj,
                            capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stderr
    assert "params: artifacts/params/train.json now records this run's settings (learning_rate 0.002 -> 0.001)" \
        in direct.stdout
    assert json.loads((ckpt / "history.json").read_text())["config"]["learning_rate"] == 0.001

    assert ran(make(proj, "train", *tiny, "LR=0.001").stdout) == [], "the direct run is the one LR=0.001 asks for"
    back = make(proj, "train", *tiny)
    assert "params: train reruns: learning_rate 0.001 -> 0.002" in back.stdout
    assert "restored the finished run" in back.stdout
    assert json.loads((ckpt / "history.json").read_text())["config"]["learning_rate"] == 0.002


def test_without_a_trained_model_evaluate_generate_and_runs_say_how_to_train(project):
    proj, tiny, _ = project
    evaluated = make(proj, "evaluate", *tiny, check=False)
    assert evaluated.returncode != 0 and "no trained model" in evaluated.stderr and "make train" in evaluated.stderr
    generated = make(proj, "generate", *tiny, check=False)
    assert generated.returncode != 0 and "no trained model" in generated.stderr and "make train" in generated.stderr
    listed = make(proj, "runs", *tiny)
    assert "no runs yet" in listed.stdout and "make train" in listed.stdout


def test_a_second_artifacts_dir_reruns_no_data_stage_and_no_training(project):
    proj, tiny, _ = project
    make(proj, "all", *tiny)
    shutil.copytree(proj / "artifacts" / "tokenizer", proj / "artifacts-b" / "tokenizer")
    second = make(proj, "train", *tiny, "ARTIFACTS_DIR=artifacts-b")
    assert "download.py" not in ran(second.stdout) and "prepare.py" not in ran(second.stdout), second.stdout
    assert (proj / "artifacts-b" / "tokenizer" / "spm.model").read_bytes() == \
        (proj / "artifacts" / "tokenizer" / "spm.model").read_bytes(), "the same tokenizer, byte for byte, in any folder"
    back = make(proj, "train", *tiny)
    assert "| train " not in back.stdout and "already finished" in back.stdout, back.stdout  # no epoch line


def test_a_restored_older_tokenizer_is_caught_and_its_token_files_rebuilt(project, tmp_path):
    """Make compares times: a tokenizer copied back from a backup is older than the token files it does not
    match. The check before encode catches it, so the same make command re-encodes (and trains after)."""
    proj, tiny, _ = project
    make(proj, "encode", *tiny, "VOCAB_SIZE=310")
    backup = tmp_path / "tokenizer-310"
    shutil.copytree(proj / "artifacts" / "tokenizer", backup)  # copytree keeps the old mtimes
    make(proj, "encode", *tiny)  # vocab 320: another tokenizer and its token files
    time.sleep(1.1)
    for f in backup.iterdir():
        shutil.copy2(f, proj / "artifacts" / "tokenizer" / f.name)  # the 310 tokenizer is back, with its old times
    params = proj / "artifacts" / "params" / "tokenizer.json"
    params.write_text(params.read_text().replace('"vocab_size": 320', '"vocab_size": 310'))
    os.utime(params, (0, 0))  # as if the 310 tokenizer had never been replaced: make sees nothing to rebuild
    again = make(proj, "encode", *tiny, "VOCAB_SIZE=310")
    assert "stale token files, re-encoding" in again.stdout and "another tokenizer" in again.stdout, again.stdout
    assert ran(again.stdout) == ["encode.py"]
    sidecar = json.loads((proj / "data" / "encoded" / "train.json").read_text())
    assert sidecar["vocab_size"] == 310 and sidecar["tokenizer_sha256"] == json.loads(
        (backup / "tokenizer.json").read_text())["model_sha256"]
    assert ran(make(proj, "encode", *tiny, "VOCAB_SIZE=310").stdout) == [], "checked once, nothing is stale now"

    (proj / "data" / "encoded" / "val.json").write_text("{")  # damaged, yet newer than everything it depends on
    damaged = make(proj, "encode", *tiny, "VOCAB_SIZE=310")
    assert "val.json (unreadable)" in damaged.stdout and ran(damaged.stdout) == ["encode.py"]
    assert json.loads((proj / "data" / "encoded" / "val.json").read_text())["vocab_size"] == 310


def test_a_diverged_make_train_names_the_make_command_with_half_its_lr(project):
    """Under make the fix line is the user's own make command (CORPUS_PATH=... included) with half the LR: the
    Makefile's train recipe marks the process, so a train.py that make sweep or a test starts is not taken for it."""
    proj, tiny, corpus = project
    result = make(proj, "train", *tiny, "LR=1000000", "WARMUP=1", check=False)
    assert result.returncode == 2, result.stdout + result.stderr  # make exits 2 when a recipe fails
    assert "loss became nan" in result.stderr or "loss became inf" in result.stderr, result.stderr
    fix = next(line for line in result.stderr.splitlines() if line.strip().startswith("fix:"))
    assert "type: make train LR=500000.0 " in fix and f"CORPUS_PATH={corpus}" in fix and "WARMUP=1" in fix, fix
