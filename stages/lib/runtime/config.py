"""Configuration: YAML defaults and command-line flags merged into one flat dict; file locations.

Each stage script is run as `python stages/NAME.py [flags]`. It builds an
argparse parser with `stage_parser()`, then calls `resolve_config()`, which
merges, lowest precedence first:

    config/defaults.yaml (section `paths` + the stage's section) < command-line flags

Make passes its variables on as flags, so for Make users the order is
YAML < Make variables < flags. `--print-params` prints the resolved parameters as
JSON and exits; `--write-params FILE` (what the Makefile runs for
artifacts/params/STAGE.json) replaces the file only when they changed and says which,
which is how Make notices a changed parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from lib.runtime.errors import EXIT_OK, EXIT_USAGE, PipelineError
from lib.runtime.stage import log, run_stage, set_stage_name
from lib.runtime.files import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[3]
# train.py's settings for several processes (lib/training/distributed.py): how it runs, not what it learns
LAUNCH_KEYS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")
# Where files live and how hard to try are not what a stage produces: they stay out of the parameter
# files, so another ARTIFACTS_DIR or a longer timeout reruns nothing.
NOT_RESULT_KEYS = ("data_dir", "artifacts_dir", "timeout_s", "retries", "stall_timeout_s", "max_download_mb",
                   *LAUNCH_KEYS)
# PIPELINE_CONFIG points every stage at another defaults file (the docs tests use a tiny one).
DEFAULT_CONFIG = Path(os.environ.get("PIPELINE_CONFIG") or REPO_ROOT / "config" / "defaults.yaml")


# ----------------------------------------------------------------------------- configuration


def stage_parser(stage: str, doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every stage shares; the stage adds its own.

    Stage flags must use `default=None` (or argparse.SUPPRESS): defaults come from
    the YAML file so that there is exactly one place that holds them.
    """
    set_stage_name(stage)
    parser = argparse.ArgumentParser(
        prog=f"stages/{stage}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML file of defaults")
    parser.add_argument("--data-dir", type=str, default=None, help="folder of raw/prepared/encoded data")
    parser.add_argument("--artifacts-dir", type=str, default=None, help="folder of tokenizer, checkpoints, reports")
    parser.add_argument("--print-params", action="store_true", help="print the resolved parameters as JSON and exit")
    parser.add_argument("--write-params", type=Path, default=None, metavar="FILE",
                        help="write them to FILE and exit, only if they changed, naming what changed (used by make)")
    return parser


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"config file {path} not found", "pass an existing file with --config", exit_code=EXIT_USAGE)
    except yaml.YAMLError as exc:
        raise PipelineError(f"config file {path} is not valid YAML: {exc}", exit_code=EXIT_USAGE)
    if not isinstance(data, dict):
        raise PipelineError(f"config file {path} must be a mapping of sections", exit_code=EXIT_USAGE)
    return data


def _coerce(key: str, action: argparse.Action, value, errors: list[str]):
    """Give a YAML value the type its flag would have; report a mismatch."""
    kind = action.type
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_coerce(key, argparse.Action([], key, type=kind), v, errors) for v in value]
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return value if kind is None else kind(value)
    except argparse.ArgumentTypeError as exc:  # a flag type with its own message
        errors.append(f"{key}: {exc}")
        return value
    except (TypeError, ValueError):
        errors.append(f"{key}: expected {getattr(kind, '__name__', 'a value')}, got {value!r}")
        return value


def _yaml_values(defaults: dict, sections: tuple, borrow, actions: dict, config: Path, errors: list[str]) -> dict:
    """The keys of `sections`, typed as their flags; an unknown key is an error unless its section is borrowed."""
    cfg: dict = {}
    for section in sections:
        values = defaults.get(section) or {}
        if not isinstance(values, dict):
            errors.append(f"section '{section}' in {config} must be a mapping")
            continue
        for key, value in values.items():
            if key not in actions and section in borrow:
                continue
            if key not in actions:
                errors.append(f"unknown key '{section}.{key}' in {config}")
                continue
            cfg[key] = _coerce(f"{section}.{key}", actions[key], value, errors)
    return cfg


def resolve_config(parser: argparse.ArgumentParser, stage: str, argv=None, validate=None, borrow=()) -> dict:
    """Merge YAML defaults and flags into one flat dict; print it with --print-params.

    `validate(cfg)` returns a list of problems; all of them are reported at once,
    before any work starts (exit code 2). `borrow` names other sections whose keys
    this stage also reads (only those it has flags for; their owner checks the rest).
    """
    args = parser.parse_args(argv)
    defaults = load_yaml(args.config)
    errors: list[str] = []

    known_sections = {"paths", "check", "download", "prepare", "tokenizer", "encode", "train", "evaluate", "generate",
                      "export", "figures"}
    for section in defaults:
        if section not in known_sections:
            errors.append(f"unknown section '{section}' in {args.config} (known: {', '.join(sorted(known_sections))})")

    actions = {a.dest: a for a in parser._actions}
    cfg = _yaml_values(defaults, ("paths", *borrow, stage), borrow, actions, args.config, errors)
    overridden: list[str] = []
    for dest, action in actions.items():
        if dest in ("help", "config", "print_params", "write_params"):
            continue
        given = getattr(args, dest, None)
        if given is not None:
            if dest in cfg and cfg[dest] != given:
                overridden.append(dest)
            elif dest not in cfg and given != action.default:  # a flag with no YAML key: set, not just present
                overridden.append(dest)
            cfg[dest] = given
        elif dest not in cfg:
            errors.append(f"{dest}: no value in {args.config} section '{stage}' and no --{dest.replace('_', '-')} flag")

    if not errors and validate is not None:
        errors.extend(validate(cfg))
    if errors:
        print(f"error: bad parameters for stage '{stage}':", file=sys.stderr)
        for problem in errors:
            print(f"  - {problem}", file=sys.stderr)
        print("  fix: correct the flag, Make variable or YAML key named above", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    if args.print_params:
        print(json.dumps(cfg, indent=2, sort_keys=True))
        sys.exit(EXIT_OK)
    if args.write_params:  # a write like any stage's: a full disk or read-only folder is one message, no traceback
        run_stage(lambda _: write_params(args.write_params, stage, cfg), cfg, report_time=False)
        sys.exit(EXIT_OK)
    cfg["_overridden"] = sorted(overridden)
    cfg["_config"] = str(args.config)
    if argv is None:  # a command line, not a test or another script building a config
        record_params(stage, cfg)
    return cfg


# Where each stage's parameter file lives (the Makefile's DATA_PARAMS and PARAMS).
PARAMS_FOLDER = {"download": "data_params", "prepare": "data_params", "encode": "data_params",
                 "tokenizer": "params", "train": "params", "evaluate": "params", "export": "params"}
CHECK_ONLY_FLAGS = ("check_tokenizer", "check_files")  # runs that check outputs and make none
# Set by every stage for the processes it starts (export's proofs, evaluate's latency runs, torchrun's ranks,
# the docs' error examples): those run with their parent's purpose, not the user's settings, and record nothing.
STARTED_BY_STAGE = "PIPELINE_STARTED_BY_STAGE"


def record_params(stage: str, cfg: dict) -> None:
    """A stage run directly, with flags make did not give, writes its settings into its parameter file as it
    starts: the file then says what the outputs were made with, so the next make command with other settings
    sees the change and reruns the stage. Under make the file already holds them, and nothing is written."""
    if (stage in PARAMS_FOLDER and not os.environ.get(STARTED_BY_STAGE)
            and not any(cfg.get(flag) for flag in CHECK_ONLY_FLAGS)):
        params_file = stage_paths(cfg)[PARAMS_FOLDER[stage]] / f"{stage}.json"
        run_stage(lambda _: write_params(params_file, stage, cfg, direct_run=True), cfg, report_time=False)
    os.environ[STARTED_BY_STAGE] = stage


def write_params(path: Path, stage: str, cfg: dict, direct_run: bool = False) -> None:
    """Replace the stage's parameter file only when a parameter changed, and say which, old -> new.

    Make reruns a stage when its parameter file is newer than its outputs, so the file
    is rewritten exactly when the stage must rerun, and this line says why beforehand.
    `direct_run`: the stage itself records the settings it runs with (under make, the file already holds them).
    """
    cfg = {k: v for k, v in public(cfg).items() if k not in NOT_RESULT_KEYS}
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    old_text = path.read_text(encoding="utf-8") if path.exists() else None
    if old_text == text:
        return
    if old_text is not None:
        try:
            old = json.loads(old_text)
        except json.JSONDecodeError:
            old = {}
        changes = [f"{key} {old.get(key, '(unset)')} -> {cfg.get(key, '(unset)')}"
                   for key in sorted(set(old) | set(cfg)) if old.get(key) != cfg.get(key)]
        changed = ', '.join(changes) or 'its parameter file was rewritten'
        print(f"params: {path} now records this run's settings ({changed}); a make command with "
              f"others reruns {stage}" if direct_run else f"params: {stage} reruns: {changed}", flush=True)
    write_text_atomic(path, text)


def public(cfg: dict) -> dict:
    """The config without bookkeeping keys, as saved next to artifacts."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def log_config(cfg: dict) -> None:
    overridden = set(cfg.get("_overridden", []))
    parts = [f"{k}={v}{'*' if k in overridden else ''}" for k, v in sorted(public(cfg).items())]
    log("config (* = overridden): " + " ".join(parts))


def check_positive(cfg: dict, keys: list[str], errors: list[str], allow_zero: bool = False) -> None:
    for key in keys:
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
            flag = "--" + key.replace("_", "-")
            errors.append(f"{key} ({flag}) must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# ----------------------------------------------------------------------------- paths


def stage_paths(cfg: dict) -> dict[str, Path]:
    """Every file location in one place (the Makefile mirrors these)."""
    data, art = Path(cfg["data_dir"]), Path(cfg["artifacts_dir"])
    return {
        "raw": data / "raw",
        "prepared": data / "prepared",
        "encoded": data / "encoded",
        "tokenizer": art / "tokenizer",
        "checkpoints": art / "checkpoints",
        "archive": art / "checkpoints-archive",
        "eval": art / "eval",
        "bench": art / "bench",
        "export": art / "export",
        "params": art / "params",
        "data_params": data / "params",
    }


# Each stage's log, beside its outputs: the whole log of its last successful run (training's grows as it
# runs, across resumes, in the run folder, and moves with the run).
STAGE_LOGS = {"download": ("raw", "download.log"), "prepare": ("prepared", "prepare.log"),
              "tokenizer": ("tokenizer", "train_tokenizer.log"), "encode": ("encoded", "encode.log"),
              "train": ("checkpoints", "train.log"), "evaluate": ("eval", "evaluate.log"),
              "export": ("export", "export.log")}


def stage_log(cfg: dict, stage: str) -> Path:
    folder, name = STAGE_LOGS[stage]
    return stage_paths(cfg)[folder] / name


def checkpoint_path(cfg: dict) -> Path:
    """--checkpoint / CHECKPOINT: a file name in artifacts/checkpoints/, or any path."""
    given = Path(cfg["checkpoint"])
    return given if given.is_absolute() or given.parent != Path(".") else stage_paths(cfg)["checkpoints"] / given
