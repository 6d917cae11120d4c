"""The make command that goes on from here: a run's resume line, and the commands error messages name.

Under make, the command repeats make's own command line (CORPUS_PATH=... included) and every
other setting that differs from the defaults; outside make, train.py's flags.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
from pathlib import Path

from lib.runtime.config import DEFAULT_CONFIG, REPO_ROOT

LAUNCH_SETTINGS_ENV = "TRAIN_LAUNCH_SETTINGS"  # launch.py hands each rank the launch settings (NPROC, ...) here
# Set by the Makefile's train recipe: this train.py is the user's `make train` / `make all`, whose command line
# MAKEFLAGS holds. (MAKELEVEL alone would also be set under `make sweep` or `make test`, whose runs are not.)
STARTED_BY_MAKE_ENV = "TRAIN_STARTED_BY_MAKE"


@functools.lru_cache(maxsize=1)  # read once per process: make runs lists every run's settings through it
def make_variables() -> dict[str, str]:
    """{config key: Make variable} as the Makefile passes them on (`$(call flag,--learning-rate,LR)`); read-only."""
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    pairs = {flag.replace("-", "_"): var for flag, var in re.findall(r"\$\(call flag,--([a-z0-9-]+),([A-Z_0-9]+)\)", text)}
    return {**pairs, "compile": "COMPILE", "data_dir": "DATA_DIR", "artifacts_dir": "ARTIFACTS_DIR"}


def make_command_line_variables() -> dict[str, str]:
    """NAME=value pairs given on make's command line, from MAKEFLAGS (` -- LR=0.001 PROMPT=a\\ b`); no RESUME."""
    flags = os.environ.get("MAKEFLAGS", "")
    if " -- " not in f" {flags} ":
        return {}
    tail = f" {flags} ".split(" -- ", 1)[1]
    pairs = {}
    for word in re.split(r"(?<!\\) ", tail.strip()):
        name, sep, value = word.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name != "RESUME":
            pairs[name] = value.replace("\\ ", " ")
    return dict(reversed(list(pairs.items())))  # make lists them last first


def resume_command(cfg: dict, **changes) -> str:
    """The command that continues this run: the same settings, so it is not taken for a new run.

    Every setting that differs from the defaults is repeated, as Make variables under make
    (`make train EPOCHS=3 LR=0.001 NPROC=2`), as flags otherwise; RESUME / --restart are left out.
    changes: settings replaced in it, the rest kept: then it is the command of a new run with those settings
    (the out-of-memory advice's batch and LR, the divergence advice's LR), not this run's.
    """
    launch = json.loads(os.environ.get(LAUNCH_SETTINGS_ENV) or "{}")  # a rank of launch_ranks: NPROC and co.
    cfg = {**cfg, **launch, **changes}
    changed = list(changes) + [key for key in cfg.get("_overridden", []) if key != "resume" and key not in changes]
    changed += [key for key in launch if key not in changed]
    config = cfg.get("_config")
    default_config = config is None or Path(config).resolve() == DEFAULT_CONFIG.resolve()

    def shown(value) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        return shlex.quote(str(value))

    variables = make_variables()
    if os.environ.get(STARTED_BY_MAKE_ENV) and all(key in variables for key in changed):
        # make's command line first: it also holds what the stages before training were given (CORPUS_PATH=...)
        given = make_command_line_variables()
        for key in changes:  # a changed setting replaces what was typed for it, and comes first
            given.pop(variables[key], None)
        words = (["make", "train"] + [f"{variables[key]}={shown(cfg[key])}" for key in changes]
                 + [f"{name}={shlex.quote(value)}" for name, value in given.items()])
        if not default_config and "CONFIG" not in given:
            words.append(f"CONFIG={shlex.quote(str(config))}")
        return " ".join(words + [f"{variables[key]}={shown(cfg[key])}" for key in changed
                                 if variables[key] not in given and key not in changes])
    words = ["python", "stages/train.py"] + ([] if default_config else ["--config", shlex.quote(str(config))])
    for key in changed:
        words += flag_words(key, cfg[key], shown)
    return " ".join(words)


def flag_words(key: str, value, shown) -> list[str]:
    """train.py's flag for a setting: `--beta1 0.8`, or `--qk-norm` / `--no-qk-norm` for a boolean; `shown`
    writes the value."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, shown(value)]
