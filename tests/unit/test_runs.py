"""Which run training continues, in the pytest process: start, resume, finished, archive and bring back, with
real checkpoint files in a tmp folder; the run's identity; the command that resumes it (lib/training/runs.py)."""

from __future__ import annotations

import functools
import io
import json
import shlex
import sys

import pytest

from lib.runtime.config import DEFAULT_CONFIG, resolve_config, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.files import write_json_atomic
from lib.training import runs
from lib.training.checkpoints import save_checkpoint
from lib.training.runs import archived_run, choose_start, fingerprint, resume_command, run_identity
from model import ModelConfig, TinyTransformer

SETTINGS = {"learning_rate": 0.002, "epochs": 3, "batch_size": 16, "resume": "auto", "threads": 1, "nproc": 1}
TRAIN_META, VAL_META = {"file_sha256": "a" * 64}, {"file_sha256": "b" * 64}
TOKENIZER = {"model_sha256": "c" * 64}
CODE_SHA256 = functools.cache(runs.code_sha256)


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch):
    """Input that is not a terminal, as under make or CI: an unfinished run resumes without asking."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture(autouse=True)
def code_hashed_once(monkeypatch):
    """The training code does not change during a test: hash it once (it reads and parses every module)."""
    monkeypatch.setattr(runs, "code_sha256", CODE_SHA256)


@pytest.fixture
def paths(tmp_path) -> dict:
    return stage_paths({"data_dir": tmp_path / "data", "artifacts_dir": tmp_path / "artifacts"})


def identity(**settings) -> dict:
    return run_identity({**SETTINGS, **settings}, TRAIN_META, VAL_META, TOKENIZER)


def checkpoint(epoch: int, position: int = 0) -> dict:
    shape = ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2, max_seq_length=8)
    return {"kind": "last", "model": TinyTransformer(shape).state_dict(), "model_config": shape.to_dict(),
            "epoch": epoch, "position": position, "step": epoch * 10 + position, "best_val_loss": 4.0}


def make_run(folder, ident: dict, epochs_saved: int = 2, position: int = 3, finished: bool = False) -> None:
    """A run folder as train.py leaves it: run.json, epoch_NNN.pt, last.pt, and train_done.json when it finished."""
    write_json_atomic(folder / "run.json", {"fingerprint": fingerprint(ident), "identity": ident})
    for epoch in range(1, epochs_saved + 1):
        save_checkpoint(folder / f"epoch_{epoch:03d}.pt", checkpoint(epoch))
    save_checkpoint(folder / "last.pt", checkpoint(epochs_saved, position))
    if finished:
        write_json_atomic(folder / "train_done.json", {"final_val_loss": 3.9, "best_val_loss": 3.8})


def archived(paths) -> list[dict]:
    """The run.json of each archived run, oldest first."""
    folders = sorted(paths["archive"].iterdir()) if paths["archive"].exists() else []
    return [json.loads((f / "run.json").read_text()) for f in folders]


def start(paths, ident: dict, resume: str = "auto"):
    return choose_start({**SETTINGS, "resume": resume}, paths, ident)


def test_the_identity_is_what_changes_what_is_learned():
    assert fingerprint(identity()) == fingerprint(identity())
    for how_it_runs in ({"threads": 4}, {"nproc": 2}, {"resume": "no"}):
        assert fingerprint(identity(**how_it_runs)) == fingerprint(identity()), how_it_runs
    assert fingerprint(identity(learning_rate=0.001)) != fingerprint(identity())
    other_tokens = run_identity(SETTINGS, {"file_sha256": "d" * 64}, VAL_META, TOKENIZER)
    assert fingerprint(other_tokens) != fingerprint(identity())
    assert len(identity()["code_sha256"]) == 64, "the training code is part of the identity"


def test_an_empty_folder_starts_fresh(paths):
    assert start(paths, identity()) == ("fresh", None)
    assert not paths["archive"].exists()


def test_an_unfinished_run_with_the_same_settings_resumes_from_last_pt(paths, capsys):
    make_run(paths["checkpoints"], identity(), epochs_saved=2, position=3)
    mode, ckpt = start(paths, identity(threads=4))  # another thread count is the same run
    assert mode == "resume" and (ckpt["epoch"], ckpt["position"], ckpt["step"]) == (2, 3, 23)
    assert "last.pt from epoch 3, batch 3 (step 23)" in capsys.readouterr().out
    assert not paths["archive"].exists()


def test_an_unreadable_last_pt_falls_back_to_the_newest_epoch_checkpoint(paths, capsys):
    make_run(paths["checkpoints"], identity(), epochs_saved=2)
    last = paths["checkpoints"] / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a crash of an older version
    mode, ckpt = start(paths, identity())
    assert mode == "resume" and (ckpt["epoch"], ckpt["position"]) == (2, 0)
    out = capsys.readouterr().out
    assert "WARNING" in out and "last.pt is not a valid checkpoint" in out and "epoch_002.pt" in out


def test_a_finished_run_is_not_trained_again(paths):
    make_run(paths["checkpoints"], identity(), finished=True)
    assert start(paths, identity()) == ("finished", None)
    assert (paths["checkpoints"] / "last.pt").exists() and not paths["archive"].exists()


def test_resume_no_moves_the_run_aside_and_deletes_nothing(paths, capsys):
    make_run(paths["checkpoints"], identity(), finished=True)
    files = sorted(p.name for p in paths["checkpoints"].iterdir())
    assert start(paths, identity(), resume="no") == ("fresh", None)
    assert not paths["checkpoints"].exists()
    (moved,) = paths["archive"].iterdir()
    assert sorted(p.name for p in moved.iterdir()) == files
    assert "moved aside" in capsys.readouterr().out


def test_new_settings_archive_the_old_run_and_the_old_settings_bring_it_back(paths, capsys):
    make_run(paths["checkpoints"], identity(), finished=True)
    assert start(paths, identity(learning_rate=0.001)) == ("fresh", None)
    assert "new settings: learning_rate 0.002 -> 0.001" in capsys.readouterr().out
    assert [run["fingerprint"] for run in archived(paths)] == [fingerprint(identity())]

    make_run(paths["checkpoints"], identity(learning_rate=0.001), epochs_saved=1)  # the new run, interrupted
    assert start(paths, identity()) == ("restored", None)
    assert "restored the finished run" in capsys.readouterr().out
    assert json.loads((paths["checkpoints"] / "run.json").read_text())["fingerprint"] == fingerprint(identity())
    assert [run["fingerprint"] for run in archived(paths)] == [fingerprint(identity(learning_rate=0.001))]

    mode, ckpt = start(paths, identity(learning_rate=0.001))  # and the interrupted one resumes from the archive
    assert mode == "resume" and ckpt["epoch"] == 1
    assert [run["fingerprint"] for run in archived(paths)] == [fingerprint(identity())]


def test_resume_yes_refuses_when_there_is_nothing_to_resume(paths):
    with pytest.raises(PipelineError, match="holds no run") as error:
        start(paths, identity(), resume="yes")
    assert "drop RESUME=yes" in error.value.fix

    make_run(paths["checkpoints"], identity())
    with pytest.raises(PipelineError, match="the existing run differs: epochs 3 -> 5"):
        start(paths, identity(epochs=5), resume="yes")
    assert (paths["checkpoints"] / "last.pt").exists(), "a refused start moves nothing"


def test_a_run_without_a_readable_checkpoint_starts_over_unless_resume_yes(paths):
    make_run(paths["checkpoints"], identity(), epochs_saved=1)
    for name in ("last.pt", "epoch_001.pt"):
        (paths["checkpoints"] / name).write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="holds no readable checkpoint"):
        start(paths, identity(), resume="yes")
    assert start(paths, identity()) == ("fresh", None)
    assert len(archived(paths)) == 1, "the unreadable run is moved aside, not deleted"


@pytest.mark.parametrize("answer, mode", [("\n", "resume"), ("s\n", "fresh")])
def test_on_a_terminal_the_user_chooses_resume_or_start_over(paths, monkeypatch, answer, mode):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    make_run(paths["checkpoints"], identity())
    assert start(paths, identity())[0] == mode
    assert len(archived(paths)) == (mode == "fresh")


def test_the_archive_gives_back_the_newest_finished_run_before_a_newer_interrupted_one(paths):
    ident = identity()
    for stamp, finished in (("20250101-000000", False), ("20250102-000000", True), ("20250103-000000", False)):
        make_run(paths["archive"] / stamp, ident, finished=finished)
    assert archived_run(paths["archive"], fingerprint(ident)).name == "20250102-000000"
    assert archived_run(paths["archive"], fingerprint(identity(epochs=9))) is None


# ----------------------------------------------------------------------------- the resume command


@pytest.fixture
def outside_make(monkeypatch):
    for name in ("TRAIN_STARTED_BY_MAKE", "MAKEFLAGS", "TRAIN_LAUNCH_SETTINGS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def train_config(*flags) -> dict:
    from train import build_parser, validate

    return resolve_config(build_parser(), "train", list(flags), validate=validate)


def test_the_resume_command_repeats_every_changed_setting_and_continues_the_same_run(outside_make):
    cfg = train_config("--learning-rate", "0.001", "--epochs", "3", "--no-compile", "--compile", "--beta1", "0.8",
                       "--restart")
    command = resume_command(cfg)
    assert command == "python stages/train.py --beta1 0.8 --compile --epochs 3 --learning-rate 0.001"
    again = train_config(*shlex.split(command)[2:])
    assert fingerprint(run_identity(again, TRAIN_META, VAL_META, TOKENIZER)) == \
        fingerprint(run_identity(cfg, TRAIN_META, VAL_META, TOKENIZER)), "the command must not start a new run"
    assert again["resume"] == "auto", "RESUME / --restart is left out: the command resumes"


def test_the_resume_command_names_another_config_file(outside_make, tmp_path):
    config = tmp_path / "my config.yaml"
    config.write_text(DEFAULT_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = train_config("--config", str(config), "--epochs", "4")
    assert resume_command(cfg) == f"python stages/train.py --config '{config}' --epochs 4"


def test_under_make_the_resume_command_is_a_make_command_with_its_variables(outside_make):
    cfg = train_config("--epochs", "3", "--learning-rate", "0.001", "--compile")
    outside_make.setenv("TRAIN_STARTED_BY_MAKE", "1")
    outside_make.setenv("MAKEFLAGS", r"s -- RESUME=no LR=0.001 CORPUS_PATH=my\ corpus.txt")
    assert resume_command(cfg) == "make train CORPUS_PATH='my corpus.txt' LR=0.001 COMPILE=yes EPOCHS=3"

    outside_make.setenv("TRAIN_LAUNCH_SETTINGS", json.dumps({"nproc": 2}))  # a rank started by the launcher
    assert resume_command(cfg).endswith(" NPROC=2")


def test_a_setting_make_has_no_variable_for_gives_the_python_command(outside_make):
    cfg = train_config("--beta1", "0.8")
    outside_make.setenv("TRAIN_STARTED_BY_MAKE", "1")
    outside_make.setenv("TRAIN_LAUNCH_SETTINGS", json.dumps({"nproc": 2}))
    assert resume_command(cfg) == "python stages/train.py --beta1 0.8 --nproc 2"


def test_a_runs_settings_are_written_as_the_command_line_that_brings_it_back():
    from lib.training.run_summary import settings_text
    assert settings_text({"dropout": 0.0, "learning_rate": 0.001, "compile": True}) == "COMPILE=yes DROPOUT=0 LR=0.001"
    # beta1 and qk_norm have no Make variable: then every setting is train.py's flag, one command that runs
    assert settings_text({"dropout": 0.0, "learning_rate": 0.001, "beta1": 0.8, "qk_norm": False}) == \
        "--beta1 0.8 --dropout 0 --learning-rate 0.001 --no-qk-norm"
    assert settings_text({}) == "defaults"
