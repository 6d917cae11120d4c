"""Hyperparameter sweep: train one run per setting and tabulate the results -> artifacts/sweep/.

    make sweep SWEEP="learning_rate=0.0003,0.001 dropout=0,0.1" SWEEP_EPOCHS=20
    python stages/sweep.py --grid "learning_rate=0.0003,0.001 dropout=0,0.1" --epochs 20

Every combination of the grid is one `stages/train.py` run with those flags, in its
own folder artifacts/sweep/RUN/ (the tokenizer and token files are shared, never
rebuilt). The table (results.md, results.json) gives per setting: final and best
validation loss, the largest eval-mode gap (val - train) over all epochs, final
train loss, training speed and wall time. A finished run is reused, so an interrupted
sweep resumes. Runs one after another: timings stay comparable. Two sweeps of one folder at
once share the work: a run that one of them is training, the other leaves to it.

    python stages/sweep.py --to-docs quality --title "..." --how "..."

writes the rows of results.json to docs/data/experiments/quality.json (with the date,
commit and machine), the file the experiments page's tables are drawn from.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lib.runtime.config import REPO_ROOT, stage_paths
from lib.runtime.errors import PipelineError, Terminated
from lib.runtime.stage import run_stage, set_interrupt_note, set_stage_name
from lib.runtime.files import FolderLock, lock_folder, write_json_atomic, write_text_atomic
from lib.runtime.key_values import parse_key_values


def parse_grid(text: str) -> list[dict]:
    """Every combination of the grid's values, one dict per run."""
    axes = [[(key, v) for v in values] for key, values in parse_key_values(text, "--grid")]
    return [dict(combo) for combo in itertools.product(*axes)]


def mean_tokens_per_s(epochs: list[dict]) -> float:
    return sum(e["tokens_per_s"] for e in epochs) / len(epochs)


@contextlib.contextmanager
def results_locked(sweep_dir: Path):
    """Held while results.json is read, merged and written: two sweeps that finish together keep both rows."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "results.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the other sweep's merge
        yield


class RunTaken(Exception):
    """The run's folder is locked by another sweep, which is training it."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_run(run_artifacts: Path) -> FolderLock:
    """Held while this sweep sets up and trains a run: another sweep of the same grid then leaves that run
    alone instead of starting train.py on it (refused by train.py's own lock, the refusal written into the
    run's log and counted as a failure by a sweep whose run trained fine)."""
    return lock_folder(run_artifacts / ".sweep.lock", RunTaken)


def run_name(setting: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in setting.items()) or "defaults"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help='space-separated key=v1,v2 (train.py flag names with _)')
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--artifacts-dir", default="artifacts")
    parser.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--seed 2'")
    parser.add_argument("--to-docs", metavar="NAME", help="write the finished runs' rows to docs/data/experiments/NAME.json")
    parser.add_argument("--title", default="", help="--to-docs: the table's title")
    parser.add_argument("--how", default="", help="--to-docs: how the runs were made (one sentence)")
    return parser


def run_folder(sweep_dir: Path, args, setting: dict) -> Path:
    """artifacts/sweep/RUN/: the setting, the epochs and the extra flags, in one name."""
    extra = f"_{args.extra.replace(' ', '').replace('-', '')}" if args.extra else ""
    return sweep_dir / (run_name(setting) + f"_epochs-{args.epochs}" + extra)


def train_command(args, setting: dict, run_artifacts: Path) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in setting.items()] + ["--epochs", str(args.epochs)]
    return [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--data-dir", args.data_dir,
            "--artifacts-dir", str(run_artifacts), *flags, *args.extra.split()]


def run_training(cmd: list[str], log_path: Path) -> int:
    """One run, its output written straight to log_path (`tail -f` follows it). Ctrl+C stops the run
    as it stops train.py alone: the run (in the sweep's process group, so it has the Ctrl+C too) saves
    last.pt and exits, then the sweep stops; rerunning the sweep resumes that run. A SIGTERM for the
    sweep alone is passed on."""
    with open(log_path, "a") as log_file:  # a resumed run's log follows what the interrupted part wrote
        # no terminal for its stdin: it would ask there whether to resume, with its question in the log
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except (KeyboardInterrupt, Terminated) as stop:  # run_stage ignores further signals from here on
            if isinstance(stop, Terminated):
                child.send_signal(signal.SIGTERM)
            child.wait()  # a second Ctrl+C still reaches the run, which then aborts at once
            raise


def check_before_training(args, paths: dict, settings: list[dict], sweep_dir: Path) -> None:
    """What would fail every run, or one run hours in, is refused before the first one starts."""
    missing = [str(p) for p in (paths["tokenizer"] / "spm.model", paths["encoded"] / "train.npy",
                                paths["encoded"] / "val.npy") if not p.is_file()]
    if missing:
        raise PipelineError(f"a sweep trains on the existing tokenizer and token files; missing: {', '.join(missing)}",
                            "build them first with `make encode` (`make sweep` does), with the same DATA_DIR and "
                            "ARTIFACTS_DIR")
    in_extra = {word[2:].split("=")[0].replace("-", "_") for word in args.extra.split() if word.startswith("--")}
    both = sorted(in_extra & {key for setting in settings for key in setting})
    if both:  # the later flag would win, and the table would name a setting that was not trained
        raise PipelineError(f"--grid and --extra both set {', '.join(both)}",
                            "give each setting in one place: SWEEP for what varies, --extra for what does not",
                            exit_code=2)
    if any("epochs" in setting for setting in settings):
        raise PipelineError("--grid sets epochs, which --epochs sets for every run of a sweep",
                            "give the epochs as SWEEP_EPOCHS=N (--epochs N) and leave them out of SWEEP", exit_code=2)
    for setting in settings:  # train.py checks each run's flags itself, as it would at the run's start
        command = train_command(args, setting, run_folder(sweep_dir, args, setting))
        checked = subprocess.run([*command, "--print-params"], capture_output=True, text=True)
        if checked.returncode != 0:
            # its complaint without argparse's usage lines before it or its own "fix:" line
            lines = checked.stderr.strip().splitlines()
            first = next((i for i, line in enumerate(lines) if "error:" in line), 0)
            complaint = "\n".join(line for line in lines[first:] if not line.strip().startswith("fix:"))
            raise PipelineError(f"train.py refuses the run {run_name(setting)}; nothing was trained:\n{complaint}",
                                "correct SWEEP / --grid: its keys are train.py's flags, with _ for -", exit_code=2)


def main(args):
    if args.to_docs:
        return write_docs_table(Path(args.artifacts_dir) / "sweep", args)
    if not args.grid:
        raise PipelineError("--grid is required (or --to-docs)", 'e.g. make sweep SWEEP="learning_rate=0.001,0.002"',
                            exit_code=2)

    paths = stage_paths({"data_dir": args.data_dir, "artifacts_dir": args.artifacts_dir})
    sweep_dir = Path(args.artifacts_dir) / "sweep"
    settings = parse_grid(args.grid)
    check_before_training(args, paths, settings, sweep_dir)
    rows, failed, left = [], [], []
    for setting in settings:
        run_artifacts = run_folder(sweep_dir, args, setting)
        start = time.perf_counter()
        returncode = train_run(args, paths, setting, run_artifacts)
        if returncode is None:
            left.append(run_artifacts.name)
        elif returncode != 0:
            print(f"[sweep] {run_artifacts.name} FAILED (exit {returncode}); log: {run_artifacts / 'train.log'}",
                  flush=True)
            failed.append(run_artifacts / "train.log")
        else:
            rows.append(result_row(args, setting, run_artifacts, time.perf_counter() - start))

    table = merge_results(sweep_dir, rows)
    lines = ["| run | final val | best val (epoch) | max gap | final train | wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['final_val']:.3f} | {r['best_val']:.3f} ({r['best_epoch']}) | {r['max_gap']:+.3f} | "
              f"{r['final_train']:.3f} | {r['wall_s']:.0f} |" for r in table]
    write_text_atomic(sweep_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if left:  # not a failure: the other sweep trains them and merges their rows when it finishes them
        print(f"[sweep] {len(left)} run(s) left to another sweep, in this table once it has finished them: "
              f"{', '.join(left)}", flush=True)
    if failed:  # the others are in the table; the exit code still says that the sweep is not whole
        raise PipelineError(f"{len(failed)} of {len(settings)} runs failed; their logs: {', '.join(map(str, failed))}",
                            "read the end of each log; rerun the same command to retry them (finished runs are reused)")


def train_run(args, paths: dict, setting: dict, run_artifacts: Path) -> int | None:
    """train.py's exit code for this run, or None when another sweep is training it (and holds its lock)."""
    try:
        lock = lock_run(run_artifacts)
    except RunTaken as taken:
        print(f"[sweep] {run_artifacts.name}: another sweep (pid {taken.holder}) is training it; left to that sweep",
              flush=True)
        return None
    try:
        (run_artifacts / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in paths["tokenizer"].iterdir():
            shutil.copy2(f, run_artifacts / "tokenizer" / f.name)
        cmd = train_command(args, setting, run_artifacts)
        print(f"[sweep] {run_artifacts.name}: {' '.join(cmd[2:])}", flush=True)
        return run_training(cmd, run_artifacts / "train.log")
    finally:
        lock.close()


def result_row(args, setting: dict, run_artifacts: Path, seconds: float) -> dict:
    epochs = json.loads((run_artifacts / "checkpoints" / "history.json").read_text())["epochs"]
    row = {"setting": setting, "name": run_artifacts.name, "final_val": epochs[-1]["val_loss"],
           "best_val": min(e["val_loss"] for e in epochs),
           "best_epoch": min(epochs, key=lambda e: e["val_loss"])["epoch"],
           "max_gap": max(e["gap"] for e in epochs), "final_train": epochs[-1]["train_loss"],
           "final_train_eval": epochs[-1]["train_loss_eval"], "wall_s": epochs[-1]["elapsed_s"],
           "tokens_per_s": mean_tokens_per_s(epochs), "extra": args.extra, "sweep_seconds": seconds}
    print(f"[sweep] {row['name']}: final val {row['final_val']:.3f}, best {row['best_val']:.3f} "
          f"(epoch {row['best_epoch']}), max gap {row['max_gap']:+.3f}, {row['wall_s']:.0f}s", flush=True)
    return row


def merge_results(sweep_dir: Path, rows: list[dict]) -> list[dict]:
    """results.json with these rows added (a run of the same name replaced), best final loss first."""
    with results_locked(sweep_dir):
        results = sweep_dir / "results.json"
        old = json.loads(results.read_text()) if results.exists() else []
        merged = {r["name"]: r for r in old + rows}
        table = sorted(merged.values(), key=lambda r: r["final_val"])
        write_json_atomic(results, table)
    return table


def write_docs_table(sweep_dir: Path, args) -> None:
    """docs/data/experiments/NAME.json from the sweep's results, each run's speed from its history, with provenance."""
    from lib.training.hardware import machine

    if not (sweep_dir / "results.json").exists():
        raise SystemExit(f"error: no sweep results in {sweep_dir}: run `make sweep SWEEP=...` first")
    rows = []
    for r in json.loads((sweep_dir / "results.json").read_text()):
        if "tokens_per_s" not in r:  # rows of sweeps older than the speed column
            epochs = json.loads((sweep_dir / r["name"] / "checkpoints" / "history.json").read_text())["epochs"]
            r["tokens_per_s"] = mean_tokens_per_s(epochs)
        # the thread count is the same for every row and said in --how; other extra flags are part of the setting
        extra = re.sub(r"--threads[ =]\d+", "", r.get("extra", "")).replace("--", "").strip()
        flags = [f"{k}={v}" for k, v in r["setting"].items()] + [extra]
        rows.append({"setting": " ".join(f for f in flags if f) or "defaults",
                     "final val loss": round(r["final_val"], 4), "best val loss": round(r["best_val"], 4),
                     "max gap": round(r["max_gap"], 4), "tok/s": round(r["tokens_per_s"]),
                     "val ≤ 3.95 at gap ≤ 0.45": "yes" if r["final_val"] <= 3.95 and r["max_gap"] <= 0.45 else "no"})
    cpu = machine()
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h"], capture_output=True,
                            text=True).stdout.strip()
    table = {"title": args.title, "measured": time.strftime("%Y-%m-%d"), "code": commit or "unknown",
             "machine": f"{cpu['cores']} cores of an {cpu['cpu']} ({'bf16 autocast' if cpu['native_bf16'] else 'float32'}"
                        f", PyTorch {cpu['torch']})",
             "how": args.how, "command": "make sweep SWEEP=\"...\" (each row's setting); python stages/sweep.py --to-docs "
                                        + args.to_docs,
             "columns": ["setting", "final val loss", "best val loss", "max gap", "tok/s", "val ≤ 3.95 at gap ≤ 0.45"],
             "rows": sorted(rows, key=lambda r: r["final val loss"])}
    out = REPO_ROOT / "docs" / "data" / "experiments" / f"{args.to_docs}.json"
    write_json_atomic(out, table)
    print(f"[sweep] {len(rows)} runs -> {out}")


if __name__ == "__main__":
    set_stage_name("sweep")
    set_interrupt_note("the run it was training saved its progress (last.pt); run again, the sweep resumes that run "
                       "and reuses the finished ones")
    run_stage(main, build_parser().parse_args(), report_time=False)
