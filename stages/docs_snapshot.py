"""Copy the default run's figures into the docs' snapshot -> docs/data/*.json (part of `make docs`).

    make docs                                  # snapshot, figures, then cog over docs/*.md and README.md
    python stages/docs_snapshot.py             # the snapshot alone
    python stages/docs_snapshot.py --fingerprint   # the defaults' fingerprint (what tests/test_docs.py compares)

Every measured figure in docs/ and README.md (losses, timings, sizes, log lines, tables)
is written by a cog block from these files, never typed. The snapshot is taken only
from a run of the default configuration: each stage's parameter file, and the run's
own config.json, must equal what config/defaults.yaml resolves to. snapshot.json
records the fingerprint of those parameters, so a change of defaults without a new
`make docs` fails the docs test.

Reads (each written by a stage of the default run): data/raw/corpus.json, the stages'
.log files, data/prepared/stats.json, data/encoded/*.json, artifacts/tokenizer/tokenizer.json,
artifacts/checkpoints/{history,config,train_done}.json, every kept run (make runs),
artifacts/eval/report.json, artifacts/export/export.json, and artifacts/bench/bench.json
(profile.json, nanogpt.json) when `make bench` (`stages/bench.py --profile`, `--nanogpt`)
was run. A `bench.py --compare` that an experiment quotes is kept in docs/data/experiments/.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lib.runtime.config import (NOT_RESULT_KEYS, REPO_ROOT, STAGE_LOGS, resolve_config, stage_log, stage_parser,
                        stage_paths)
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage
from lib.runtime.files import read_json, write_json_atomic
from lib.training.hardware import machine

# stage name -> its script; `make all` + `make export` run these with the defaults
STAGE_SCRIPTS = {"download": "download.py", "prepare": "prepare.py", "tokenizer": "train_tokenizer.py",
                 "encode": "encode.py", "train": "train.py", "evaluate": "evaluate.py", "export": "export.py"}
OTHER_SCRIPTS = {"check": "check.py", "generate": "generate.py"}  # no outputs, but the docs quote their defaults
FOLDERS = ("data_dir", "artifacts_dir")
DATA_STAGES = ("download", "prepare", "encode")  # their parameter files live in data/params/
REMAKE = "make all && make export && make runs && make docs"


def build_parser():
    p = stage_parser("docs", __doc__)
    p.add_argument("--out", type=str, default="docs/data", help="the snapshot folder (relative: to the repository)")
    p.add_argument("--fingerprint", action="store_true", help="print the defaults' parameters and fingerprint, and exit")
    return p


def default_params(config: str) -> dict:
    """Each stage's parameters as config/defaults.yaml resolves them, without folder locations."""
    params = {}
    for stage, script in {**STAGE_SCRIPTS, **OTHER_SCRIPTS}.items():
        out = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / script), "--config", config, "--print-params"],
                             capture_output=True, text=True, check=True, env={**os.environ, "PIPELINE_CONFIG": ""})
        params[stage] = {k: v for k, v in json.loads(out.stdout).items() if k not in FOLDERS}
    return params


def params_fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def read(path: Path) -> dict:
    return read_json(path, "the default run's file", f"the snapshot needs every output of the default run: `{REMAKE}`")


def check_default_run(paths: dict, data_dir: Path, art: Path, params: dict) -> None:
    """The trained run, and every stage's outputs, must come from the default parameters."""
    run_cfg = read(paths["checkpoints"] / "config.json")
    differences = []
    for key, default in params["train"].items():
        if key == "dropout" and default == "auto":
            continue  # the run records the number 'auto' chose
        if key not in NOT_RESULT_KEYS and run_cfg.get(key) != default:
            differences.append(f"train.{key}: {run_cfg.get(key)!r} (default {default!r})")
    for stage in STAGE_SCRIPTS:
        if stage == "train" or differences:
            continue
        file = (data_dir if stage in DATA_STAGES else art) / "params" / f"{stage}.json"
        used = read(file)
        differences += [f"{stage}.{k}: {used.get(k)!r} (default {v!r})" for k, v in params[stage].items()
                        if k not in NOT_RESULT_KEYS and used.get(k) != v]
    if differences:
        raise PipelineError("the current outputs are not the default configuration's: " + "; ".join(differences),
                            f"the docs show the default run: `{REMAKE}` (a default run in the archive comes back in "
                            f"seconds)")


def run_history(folder: Path) -> dict:
    """A kept run's per-epoch figures, without its samples (the current run's are in history.json)."""
    history = read(folder / "history.json")
    keys = ("epoch", "train_loss", "train_loss_eval", "val_loss", "val_bpb", "gap", "lr", "grad_norm_mean",
            "grad_norm_max", "tokens_per_s", "seconds")
    return {"config": history["config"], "epochs": [{k: e.get(k) for k in keys} for e in history["epochs"]]}


def logs(cfg: dict) -> dict:
    found = {}
    for stage in STAGE_LOGS:
        file = stage_log(cfg, stage)
        if not file.exists():
            raise PipelineError(f"{file} is missing: the docs quote every stage's log",
                                f"rerun that stage with the defaults (a log is kept from this version on): `{REMAKE}`")
        found[stage] = file.read_text(encoding="utf-8").splitlines()
    check = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "check.py")], capture_output=True, text=True,
                           cwd=REPO_ROOT)
    found["check"] = check.stdout.splitlines()
    return found


def tokenizer_examples(paths: dict) -> dict:
    """What the docs show of the trained tokenizer: two sentences, a few vocabulary lines, character counts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    sentences = ["In the beginning God created the heaven and the earth.",
                 "En el principio crió Dios los cielos y la tierra."]
    vocab = (paths["tokenizer"] / "spm.vocab").read_text(encoding="utf-8").splitlines()
    text = (paths["prepared"] / "train.txt").read_text(encoding="utf-8")
    return {"sentences": [{"text": t, "pieces": sp.encode(t, out_type=str), "ids": sp.encode(t)} for t in sentences],
            "vocab_lines_300_305": vocab[299:305],
            "byte_pieces": sum(sp.is_byte(i) for i in range(sp.get_piece_size())),
            "special_ids": sum(sp.is_control(i) or sp.is_unknown(i) for i in range(sp.get_piece_size())),
            "distinct_characters": len(set(text) - {"\n"}),
            "pieces_of": {ch: sp.encode(ch, out_type=str) for ch in ("ñ", "¿", "東")}}


def error_examples() -> dict:
    """Messages the docs quote, made for real: training refused for a step too large for its memory budget."""
    # `make train BATCH_SIZE=128 MAX_MEMORY_GB=0.5` as make runs it: the flags, and make's command line in
    # MAKEFLAGS, from which the message repeats the variables typed (not those of the `make docs` running this)
    typed = {"BATCH_SIZE": "128", "MAX_MEMORY_GB": "0.5"}
    env = {**os.environ, "TRAIN_STARTED_BY_MAKE": "1",
           "MAKEFLAGS": " -- " + " ".join(f"{k}={v}" for k, v in reversed(typed.items()))}
    oom = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--batch-size", "128",
                          "--max-memory-gb", "0.5"], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    if oom.returncode != 1 or "Out of memory" not in oom.stderr:
        raise PipelineError(f"the out-of-memory example did not fail as the docs say (exit {oom.returncode}): "
                            f"{oom.stderr[-500:]}", "fix the example in stages/docs_snapshot.py")
    return {"out_of_memory": oom.stderr.strip().splitlines()}


def main(cfg):
    config = str(REPO_ROOT / "config" / "defaults.yaml")  # the docs show the repository's defaults, whatever CONFIG is
    params = default_params(config)
    fingerprint = params_fingerprint(params)
    if cfg["fingerprint"]:
        print(json.dumps({"fingerprint": fingerprint, "params": params}, indent=2, sort_keys=True))
        return
    data_dir, art = Path(cfg["data_dir"]), Path(cfg["artifacts_dir"])
    paths = stage_paths(cfg)
    check_default_run(paths, data_dir, art, params)
    out = REPO_ROOT / cfg["out"]
    runs = read(art / "runs" / "runs.json")
    snapshot = {
        "snapshot.json": {"fingerprint": fingerprint, "params": params, "machine": machine(),
                          "made": datetime.date.today().isoformat(), "code": git_commit()},
        "corpus.json": read(paths["raw"] / "corpus.json"),
        "prepare.json": read(paths["prepared"] / "stats.json"),
        "tokenizer.json": read(paths["tokenizer"] / "tokenizer.json"),
        "tokenizer_examples.json": tokenizer_examples(paths),
        "encoded.json": {split: read(paths["encoded"] / f"{split}.json") for split in ("train", "val")},
        "history.json": read(paths["checkpoints"] / "history.json"),
        "train_done.json": read(paths["checkpoints"] / "train_done.json"),
        "checkpoint_sizes.json": {p.name: p.stat().st_size for p in sorted(paths["checkpoints"].glob("*.pt"))},
        "report.json": read(paths["eval"] / "report.json"),
        "export.json": {k: v for k, v in read(paths["export"] / "export.json").items() if k != "files"},
        "runs.json": {"runs": [{**{k: v for k, v in r.items() if k != "val_curve"},
                                **run_history(Path(r["folder"]))} for r in runs]},
        "logs.json": logs(cfg),
        "error_examples.json": error_examples(),
    }
    for name in ("bench.json", "profile.json", "nanogpt.json"):
        bench = paths["bench"] / name
        if bench.exists():
            made = datetime.date.fromtimestamp(bench.stat().st_mtime).isoformat()
            snapshot[name] = {**read(bench), "made": made}
    out.mkdir(parents=True, exist_ok=True)
    for stale in set(p.name for p in out.glob("*.json")) - set(snapshot):
        (out / stale).unlink()
    for name, content in snapshot.items():
        write_json_atomic(out / name, content)
    images = REPO_ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(art / "runs" / "val_curves.png", images / "runs_val_curves.png")  # make runs' own chart
    log(f"snapshot of the default run (fingerprint {fingerprint}) -> {out}: {', '.join(sorted(snapshot))}")


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    return out.stdout.strip() or None


if __name__ == "__main__":
    run_stage(main, resolve_config(build_parser(), "docs"), report_time=False)
