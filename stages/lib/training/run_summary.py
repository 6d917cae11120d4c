"""What a training run folder holds, in one dict: its settings, epochs, losses, time.

Used by list_runs.py (the table of every kept run) and evaluate.py (which run a report
is about). A run folder is artifacts/checkpoints/ (the current run) or a folder of
artifacts/checkpoints-archive/; it holds config.json, history.json and, once the run
finished, train_done.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lib.training.commands import flag_words, make_variables

# Settings that say where files are or how to start, not what was trained.
NOT_SETTINGS = {"data_dir", "artifacts_dir", "resume"}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def changed_settings(config: dict) -> dict:
    """The settings the run was given on top of the YAML defaults (flags or Make variables)."""
    return {key: config[key] for key in config.get("overridden", []) if key in config and key not in NOT_SETTINGS}


def summarize_run(folder: Path) -> dict | None:
    """None when the folder holds no training history yet."""
    history = _read(folder / "history.json")
    if not history or not history.get("epochs"):
        return None
    config = _read(folder / "config.json") or history.get("config", {})
    epochs = history["epochs"]
    done = folder / "train_done.json"
    last_epoch_at = (folder / "history.json").stat().st_mtime  # train_done.json is touched when a run is restored
    return {
        "folder": str(folder), "finished": done.exists(), "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(last_epoch_at)),
        "fingerprint": history.get("fingerprint"), "settings": changed_settings(config),
        "epochs": len(epochs), "epochs_planned": config.get("epochs", len(epochs)),
        "best_val_loss": min(e["val_loss"] for e in epochs), "final_val_loss": epochs[-1]["val_loss"],
        "best_val_bpb": min(e["val_bpb"] for e in epochs), "final_val_bpb": epochs[-1]["val_bpb"],
        "max_gap": max(e["gap"] for e in epochs), "wall_s": epochs[-1]["elapsed_s"],
        "val_curve": [e["val_loss"] for e in epochs],
    }


def settings_text(settings: dict) -> str:
    """The settings as you would type them to train the run again: Make variables (`LR=0.001`), or, when one of
    them has none, train.py's flags for all of them (`--beta1 0.8 --learning-rate 0.001`), as resume_command does:
    make would take `--beta1` for its own option, and train.py refuses `LR=0.001`."""
    def typed(value) -> str:  # as make takes it: 0 for 0.0 (the same run), yes/no for booleans
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    names = make_variables()
    if all(key in names for key in settings):
        return " ".join(sorted(f"{names[key]}={typed(value)}" for key, value in settings.items())) or "defaults"
    return " ".join(word for key, value in sorted(settings.items()) for word in flag_words(key, value, typed))
