"""Runs: what identifies a training run, the lock on its folder, resume or start over, the archive.

A run's identity is its settings (those that change what is learned), the token files,
the tokenizer and the code of every local module train.py imports. The current run
lives in artifacts/checkpoints/; a run with another identity is moved to
artifacts/checkpoints-archive/STAMP/ before a new one starts: nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from lib.training.checkpoints import load_checkpoint
from lib.runtime.code_files import code_files
from lib.runtime.config import LAUNCH_KEYS, REPO_ROOT, public
from lib.training.commands import make_variables, resume_command  # noqa: F401 (train.py and tests import them here)
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log
from lib.runtime.files import FolderLock, lock_folder

# Keys that do not change what is learned: a run that differs only in these is the same run.
# The number of processes is one of them: a step over a global batch is the same step however many
# processes share it.
NOT_IN_FINGERPRINT = {"resume", "threads", "max_memory_gb", "device", "checkpoint_every", "sample_every",
                      "sample_tokens", "data_dir", "artifacts_dir", "loss_chunk_tokens", *LAUNCH_KEYS}


def code_sha256() -> str:
    """Hash of train.py and every local module it imports (the files the Makefile lists for it)."""
    digest = hashlib.sha256()
    for path in code_files(REPO_ROOT / "stages" / "train.py"):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_identity(cfg, train_meta, val_meta, tokenizer) -> dict:
    return {
        "config": {k: v for k, v in public(cfg).items() if k not in NOT_IN_FINGERPRINT},
        "train_tokens_sha256": train_meta["file_sha256"],
        "val_tokens_sha256": val_meta["file_sha256"],
        "tokenizer_sha256": tokenizer["model_sha256"],
        "code_sha256": code_sha256(),
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old.get("config", {})) | set(new["config"])):
        a, b = old.get("config", {}).get(key), new["config"].get(key)
        if a != b:
            diffs.append(f"{key} {a} -> {b}")
    for key in ("train_tokens_sha256", "val_tokens_sha256", "tokenizer_sha256", "code_sha256"):
        if old.get(key) != new[key]:
            diffs.append(key.replace("_sha256", "").replace("_", " ") + " changed")
    return ", ".join(diffs) or "unknown"


def acquire_lock(artifacts: Path) -> FolderLock:
    """artifacts/.train.lock, held while a training process uses the folder."""
    def busy(holder):
        return PipelineError(
            f"another training run (pid {holder}) is already using {artifacts}; this one did not touch it",
            "wait for it to finish, or stop it (Ctrl+C resumes later); to train in parallel use another ARTIFACTS_DIR",
            "interrupted-runs-and-resume")
    return lock_folder(artifacts / ".train.lock", busy)


def archive_run(paths, reason: str) -> None:
    run_dir = paths["checkpoints"]
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = paths["archive"] / stamp
    n = 1
    while dest.exists():
        dest, n = paths["archive"] / f"{stamp}-{n}", n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(dest))
    log(f"previous run moved aside to {dest} ({reason}); nothing was deleted")


def newest_good_checkpoint(run_dir: Path):
    """last.pt, or when it is unreadable the newest epoch_NNN.pt that loads."""
    candidates = [run_dir / "last.pt"] + sorted(run_dir.glob("epoch_*.pt"), reverse=True)
    for path in candidates:
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path)
        except PipelineError as exc:
            log(f"WARNING: {exc.message}; trying an older checkpoint")
    return None, None


def ask_resume(epoch: int, position: int) -> bool:
    where = f"epoch {epoch + 1}" + (f", batch {position}" if position else "")
    while True:
        try:
            answer = input(f"An unfinished run with the same settings exists. Resume from {where}? [R]esume / [s]tart over: ")
        except EOFError:
            return True
        answer = answer.strip().lower()
        if answer in ("", "r", "resume", "y", "yes"):
            return True
        if answer in ("s", "start", "restart", "n", "no"):
            return False
        print("please answer r (resume) or s (start over)")


def choose_start(cfg, paths, identity: dict):
    """Decide how this run starts: "fresh", "resume" (with the checkpoint), "finished" (the current
    run already has these settings) or "restored" (a finished run came back from the archive)."""
    run_dir, fp = paths["checkpoints"], fingerprint(identity)
    run_file = run_dir / "run.json"
    old = json.loads(run_file.read_text()) if run_file.exists() else None
    if old and old.get("fingerprint") == fp:
        if (run_dir / "train_done.json").exists() and cfg["resume"] != "no":
            return "finished", None
        if cfg["resume"] == "no":
            archive_run(paths, "RESUME=no / --restart")
            return "fresh", None
        path, ckpt = newest_good_checkpoint(run_dir)
        if ckpt is None:
            if cfg["resume"] == "yes":
                raise PipelineError(f"RESUME=yes but {run_dir} holds no readable checkpoint of this run",
                                    "drop RESUME=yes to start over", "interrupted-runs-and-resume")
            archive_run(paths, "it had no readable checkpoint")
            return "fresh", None
        if cfg["resume"] == "auto" and sys.stdin.isatty() and not ask_resume(ckpt["epoch"], ckpt["position"]):
            archive_run(paths, "you chose to start over")
            return "fresh", None
        log(f"resuming {path} from epoch {ckpt['epoch'] + 1}, batch {ckpt['position']} (step {ckpt['step']})")
        return "resume", ckpt
    found = archived_run(paths["archive"], fp) if cfg["resume"] != "no" else None
    if cfg["resume"] == "yes" and found is None:
        why = f"the existing run differs: {describe_difference(old['identity'], identity)}" if old else f"{run_dir} holds no run"
        raise PipelineError(f"RESUME=yes but there is nothing to resume: {why}, and no archived run has these settings",
                            "drop RESUME=yes to start a new run (the old one is moved aside, not deleted)",
                            "interrupted-runs-and-resume")
    if old:
        archive_run(paths, f"new settings: {describe_difference(old.get('identity', {}), identity)}")
    if found is None:
        return "fresh", None
    bring_back(paths, found)
    if (run_dir / "train_done.json").exists():
        done = json.loads((run_dir / "train_done.json").read_text())
        log(f"restored the finished run {found} to {run_dir}: same settings, data, tokenizer and code, so it is not "
            f"trained again (val {done['final_val_loss']:.3f}, best {done['best_val_loss']:.3f}); "
            f"RESUME=no / --restart trains afresh")
        return "restored", None
    path, ckpt = newest_good_checkpoint(run_dir)
    if ckpt is None:
        archive_run(paths, "the interrupted run brought back from the archive has no readable checkpoint")
        return "fresh", None
    log(f"the interrupted run {found} has these settings: moved back to {run_dir}, resuming {path.name} from epoch "
        f"{ckpt['epoch'] + 1}, batch {ckpt['position']} (step {ckpt['step']})")
    return "resume", ckpt


def archived_run(archive: Path, fp: str) -> Path | None:
    """The archived run with this fingerprint to continue: the newest finished one, else the newest interrupted one."""
    matches = []
    for folder in sorted(archive.glob("*"), reverse=True):
        try:
            run = json.loads((folder / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if run.get("fingerprint") == fp:
            matches.append(folder)
    finished = [folder for folder in matches if (folder / "train_done.json").exists()]
    return (finished or matches or [None])[0]


def bring_back(paths, found: Path) -> None:
    """Move an archived run into artifacts/checkpoints/ (the current run, if any, was archived before)."""
    run_dir = paths["checkpoints"]
    archive_run(paths, "an archived run with the requested settings takes its place")  # leftovers without run.json
    if run_dir.exists():
        run_dir.rmdir()  # left empty by archive_run
    shutil.move(str(found), str(run_dir))


