"""The out-of-memory fix names a command whose LR goes with its batch (docs/troubleshooting.md#out-of-memory)."""

from __future__ import annotations

import pytest

from conftest import REPO
from lib.runtime.config import load_yaml
from lib.training.hardware import lr_for_batch, smaller_batch_hint

CONFIG = REPO / "config" / "defaults.yaml"
DEFAULTS = load_yaml(CONFIG)["train"]


def run_config(**overrides) -> dict:
    return {**DEFAULTS, **overrides, "_config": str(CONFIG), "_overridden": sorted(overrides)}


def adamw_config(**overrides) -> dict:
    """Under AdamW the LR follows the batch (measured); OPTIMIZER=adamw is itself typed."""
    return run_config(optimizer="adamw", **overrides)


def test_a_bare_bigger_batch_gets_the_lr_of_the_defaults_pair():
    # BATCH_SIZE=128 alone kept the default LR: the smaller batch's LR comes from the defaults' batch and LR
    cfg = adamw_config(batch_size=128)
    half = DEFAULTS["batch_size"] // 2
    assert lr_for_batch(cfg, half) == pytest.approx(DEFAULTS["learning_rate"] * 0.5 ** 0.585)
    assert lr_for_batch(cfg, DEFAULTS["batch_size"]) == pytest.approx(DEFAULTS["learning_rate"])


@pytest.fixture
def under_make(monkeypatch):
    """make train BATCH_SIZE=128 LR=0.0045 MAX_MEMORY_GB=0.5 CORPUS_PATH=my corpus.txt, as make passes it on."""
    monkeypatch.delenv("TRAIN_LAUNCH_SETTINGS", raising=False)
    monkeypatch.setenv("TRAIN_STARTED_BY_MAKE", "1")
    monkeypatch.setenv("MAKEFLAGS", r"s -- CORPUS_PATH=my\ corpus.txt MAX_MEMORY_GB=0.5 LR=0.0045 BATCH_SIZE=128")
    return monkeypatch


def test_under_adamw_an_lr_the_user_set_is_scaled_from_their_own_batch(under_make):
    cfg = adamw_config(batch_size=128, learning_rate=0.0045, max_memory_gb=0.5)
    assert lr_for_batch(cfg, 64) == pytest.approx(0.0045 * 0.5 ** 0.585)  # two thirds per halving
    # the whole command to type: the new batch and LR replace the typed ones, every other variable stays
    hint = smaller_batch_hint(cfg)
    assert hint.startswith("type: make train BATCH_SIZE=64 LR=0.003 MAX_MEMORY_GB=0.5 CORPUS_PATH='my corpus.txt' "), hint
    assert "OPTIMIZER=adamw" in hint and "from BATCH_SIZE=128 LR=0.0045: two thirds per halving)" in hint
    assert smaller_batch_hint(cfg, 16).startswith("type: make train BATCH_SIZE=16 LR=0.0013 MAX_MEMORY_GB=0.5 ")


def test_under_muon_the_lr_rises_with_a_bigger_batch_and_stays_with_a_smaller_one(under_make):
    # Muon (the default): batch 16 did best at the LR of batch 32, batch 64 at 1.5 times it (docs/experiments.md)
    typed = run_config(batch_size=128, learning_rate=0.0045, max_memory_gb=0.5)
    assert smaller_batch_hint(typed, 16) == ("type: make train BATCH_SIZE=16 LR=0.0045 MAX_MEMORY_GB=0.5 "
                                             "CORPUS_PATH='my corpus.txt' (the LR goes with the batch from "
                                             "BATCH_SIZE=128 LR=0.0045: up 1.5x per doubling, never down)")
    under_make.setenv("MAKEFLAGS", "s -- LR=0.00225 BATCH_SIZE=64")  # an LR kept stays as typed, not rounded
    assert smaller_batch_hint(run_config(batch_size=64, learning_rate=0.00225), 32).startswith(
        "type: make train BATCH_SIZE=32 LR=0.00225 (")
    under_make.setenv("MAKEFLAGS", "s -- MAX_MEMORY_GB=0.5 BATCH_SIZE=128")
    bare = run_config(batch_size=128, max_memory_gb=0.5)  # from the defaults' pair, BATCH_SIZE=32 LR=0.002
    assert smaller_batch_hint(bare).startswith("type: make train BATCH_SIZE=64 LR=0.003 MAX_MEMORY_GB=0.5 (")
    assert smaller_batch_hint(bare, 16).startswith("type: make train BATCH_SIZE=16 MAX_MEMORY_GB=0.5 (")


def test_outside_make_the_hint_is_train_py_with_its_flags(monkeypatch):
    for name in ("TRAIN_STARTED_BY_MAKE", "MAKEFLAGS", "TRAIN_LAUNCH_SETTINGS"):
        monkeypatch.delenv(name, raising=False)
    hint = smaller_batch_hint(adamw_config(batch_size=128))
    assert hint.startswith("type: python stages/train.py --batch-size 64 --learning-rate 0.003 "), hint
    assert smaller_batch_hint(run_config(batch_size=32)).startswith("type: python stages/train.py --batch-size 16 (")


def test_the_smaller_batch_divides_among_the_processes(monkeypatch):
    for name in ("TRAIN_STARTED_BY_MAKE", "MAKEFLAGS", "TRAIN_LAUNCH_SETTINGS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # 12 windows on 4 processes: half would be 6, which 4 processes cannot share; 4 can
    hint = smaller_batch_hint(run_config(batch_size=12, nproc=4))
    assert hint.startswith("type: python stages/train.py --batch-size 4 "), hint
    assert smaller_batch_hint(run_config(batch_size=24, nproc=4)).startswith(
        "type: python stages/train.py --batch-size 12 "), "a half that divides stays"
    # inside a rank the processes are torchrun's WORLD_SIZE (a rank's own settings say NPROC 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert smaller_batch_hint(run_config(batch_size=12)).startswith("type: python stages/train.py --batch-size 4 ")
    assert "fewer processes (NPROC)" in smaller_batch_hint(run_config(batch_size=4)), "no smaller batch 4 can share"


def test_a_nan_loss_names_the_command_with_half_the_runs_lr(monkeypatch):
    for name in ("TRAIN_STARTED_BY_MAKE", "MAKEFLAGS", "TRAIN_LAUNCH_SETTINGS"):
        monkeypatch.delenv(name, raising=False)
    from types import SimpleNamespace
    from lib.runtime.errors import PipelineError
    from lib.training.guards import stop_if_diverged
    state = SimpleNamespace(step=299)
    cfg = run_config(learning_rate=0.004, max_memory_gb=0.5)
    stop_if_diverged(4.2, 0.004, state, 3, 10, 82, cfg)  # a number: nothing happens
    with pytest.raises(PipelineError) as stop:
        stop_if_diverged(float("nan"), 0.0039, state, 3, 10, 82, cfg)
    text = str(stop.value)
    assert "loss became nan at epoch 4, step 11 of 82 (step 300 of the run" in text
    # the command to type: the run's own, with half its LR; outside make, train.py's flags
    assert "fix: type: python stages/train.py --learning-rate 0.002 --max-memory-gb 0.5 (half the run's LR 0.004" in text
    assert "see: docs/troubleshooting.md#diverging-or-nan-loss" in text
