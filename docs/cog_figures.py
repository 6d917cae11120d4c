"""What the cog blocks of docs/*.md and README.md call: every measured figure, read from the snapshot.

    make docs                                       # snapshot of the default run, figures, then cog
    python -m cogapp -r -P -I docs -p "from cog_figures import *" docs/*.md README.md   # cog alone

A block in the Markdown looks like this (the generated text sits between the markers):

    <!-- [[[cog
    print(f"The default run ends at a validation loss of {final('val_loss'):.3f}.")
    ]]] -->
    The default run ends at a validation loss of 4.029.
    <!-- [[[end]]] -->

docs/data/ holds the default run's files (stages/docs_snapshot.py copies them);
docs/data/experiments/ holds the measured experiments of docs/experiments.md, each
table with the code, settings and machine it was measured on.
"""

from __future__ import annotations

import json
import math
import re
import sys
from functools import lru_cache
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DATA = DOCS / "data"
REPO = DOCS.parent


@lru_cache(maxsize=None)
def data(name: str):
    """One snapshot file, e.g. data('history') -> docs/data/history.json."""
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def experiment(name: str) -> dict:
    return json.loads((DATA / "experiments" / f"{name}.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the defaults, from the config


@lru_cache(maxsize=None)
def config() -> dict:
    """config/defaults.yaml as written (not the snapshot): a default the prose states comes from here."""
    import yaml

    return yaml.safe_load((REPO / "config" / "defaults.yaml").read_text(encoding="utf-8"))


def yaml_comments() -> dict:
    """{(section, key): the comment beside the key in config/defaults.yaml, with its continuation lines}."""
    found, section, last = {}, None, None
    for line in (REPO / "config" / "defaults.yaml").read_text(encoding="utf-8").splitlines():
        if re.match(r"^\w+:", line):
            section, last = line.split(":")[0], None
        elif m := re.match(r"^  (\w+):[^#]*(?:#\s*(.*))?$", line):
            last = (section, m[1])
            found[last] = (m[2] or "").strip()
        elif last and (m := re.match(r"^\s{6,}#\s*(.*)$", line)):
            found[last] = f"{found[last]} {m[1].strip()}".strip()
    return found


def default(key: str):
    """One default: default('max_seq_length'), or default('evaluate.temperature') for a key several stages share."""
    if "." in key:
        stage, name = key.split(".", 1)
        return config()[stage][name]
    found = [values[key] for values in config().values() if isinstance(values, dict) and key in values]
    if len(found) != 1:
        raise LookupError(f"{key!r} is in {len(found)} sections of config/defaults.yaml: write 'stage.{key}'")
    return found[0]


def make_default(variable: str) -> str:
    """A Make variable's default as the Makefile sets it (`VENV ?= .venv`): the ones that are no key of the YAML."""
    found = re.findall(rf"^{variable} *\?= *(.*)$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    if len(found) != 1:
        raise LookupError(f"the Makefile sets {variable} with ?= {len(found)} times")
    return found[0].strip()


def optimiser_names() -> str:
    """What the default optimiser is called in prose: 'Muon + AdamW' (Muon on the block matrices) or 'AdamW'."""
    return "Muon + AdamW" if default("optimizer") == "muon" else "AdamW"


# ----------------------------------------------------------------------------- the default run


def params(stage: str) -> dict:
    """The default configuration's parameters of one stage (as config/defaults.yaml resolves them)."""
    return data("snapshot")["params"][stage]


def run_config() -> dict:
    """The default run's resolved training config (dropout: the number 'auto' chose)."""
    return data("history")["config"]


def epochs() -> list[dict]:
    return data("history")["epochs"]


def mean_tokens_per_s() -> float:
    """The default run's training speed, averaged over its epochs."""
    return sum(e["tokens_per_s"] for e in epochs()) / len(epochs())


def final(key: str):
    return epochs()[-1][key]


def max_gap() -> float:
    return max(e["gap"] for e in epochs())


def report() -> dict:
    return data("report")


def log_lines(stage: str, pattern: str = "") -> list[str]:
    """The lines of a stage's log (the default run's) matching a regular expression."""
    return [line for line in data("logs")[stage] if re.search(pattern, line)]


def log_line(stage: str, pattern: str) -> str:
    found = log_lines(stage, pattern)
    if not found:
        raise LookupError(f"no line of the {stage} log matches {pattern!r}")
    return found[0]


def done_s(stage: str) -> float:
    """A stage's wall time, from its log's `done in` line."""
    return float(re.search(r"done in ([0-9.]+)s", log_line(stage, r"done in"))[1])


def stages_s() -> float:
    return sum(done_s(stage) for stage in ("download", "prepare", "tokenizer", "encode", "train", "evaluate"))


def text_block(lines: list[str]) -> None:
    print("```text")
    for line in lines:
        print(line)
    print("```")


def epoch_log(numbers=(1, 2, 5, 20)) -> list[str]:
    return [log_line("train", rf"epoch +{n}/") for n in numbers]


def machine() -> str:
    m = data("snapshot")["machine"]
    bf16 = "native bf16" if m["native_bf16"] else "no native bf16, so training runs in float32"
    return f"{m['cores']} cores of an {m['cpu']} ({bf16}), PyTorch {m['torch']}"


def snapshot_note() -> str:
    s = data("snapshot")
    return f"the default run of {s['made']} on {machine()}"


# ----------------------------------------------------------------------------- numbers as the docs write them


def k(x: float) -> str:
    """Tokens per second as 12.6K."""
    return f"{x / 1000:.1f}K"


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def thousands(n: int) -> str:
    return f"{n:,}"


def share(x: float) -> str:
    return f"{100 * x:.0f}%"


def span(values, fmt="{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


# ----------------------------------------------------------------------------- tables


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# A row written as "today's block" was measured on 2026-11-26 (AdamW, context 128, batch 64 then); named by its date,
# it stays true after the defaults moved on.
BLOCK_OF_2026_11_26 = "the block of 2026-11-26"


# "block" means a round of experiments on these pages; the speed rows' "block" was the model's, which is named instead
REWORDED = {"today's block": BLOCK_OF_2026_11_26, "the block's cost": "their cost"}


def fp32_slowdown() -> float:
    """How many times as long the default step took in float32 as in bf16 (the speed page's profile)."""
    paths = data("profile")["paths"]
    return paths["float32"]["step_ms"] / paths["bfloat16"]["step_ms"]


def era(cell):
    if isinstance(cell, str):
        for old, new in REWORDED.items():
            cell = cell.replace(old, new)
    return cell


def experiment_table(name: str, bold=None) -> None:
    """An experiment's rows, as measured; `bold(row)` marks the row to stress."""
    exp = experiment(name)
    rows = []
    def cell(column, value):  # losses and gaps with their three decimals (JSON drops trailing zeros)
        if isinstance(value, float) and ("loss" in column or "gap" in column or "share" in column):
            return f"{value:.3f}"
        return value

    blank = False
    for row in exp["rows"]:
        cells = [era(cell(c, row.get(c, ""))) for c in exp["columns"]]
        blank = blank or any(c in ("", None) for c in cells)
        cells = ["—" if c in ("", None) else c for c in cells]
        if bold and bold(row):
            cells = [f"**{c}**" if c != "—" else c for c in cells]
        rows.append(cells)
    table(exp["columns"], rows)
    if blank:
        print()
        print("— : not measured, or does not apply.")


def provenance(name: str) -> str:
    exp = experiment(name)
    return f"measured {exp['measured']} on {exp['machine']}, code {exp['code']}; {exp['how']}"


def largest_corpus() -> str:
    """The size of the largest corpus measured, '110 MB', as its experiment's title gives it."""
    return re.search(r"[0-9.]+ MB", experiment("large_corpus")["title"])[0]


def row(name: str, **match) -> dict:
    """The one row of an experiment whose columns equal `match` (keys: column names with _ for spaces)."""
    exp = experiment(name)
    found = [r for r in exp["rows"]
             if all(str(r.get(key.replace("_", " "))) == str(value) for key, value in match.items())]
    if len(found) != 1:
        raise LookupError(f"{name}: {len(found)} rows match {match}")
    return found[0]


def setting_of(table_row: dict) -> dict:
    """A sweep row's setting ("key=value key=value", train.py's keys) as a dict."""
    return dict(part.split("=", 1) for part in table_row["setting"].split())


def same_value(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def sweep_row(name: str, **match) -> dict:
    """The one row of a sweep table (stages/sweep.py --to-docs) whose setting is exactly `match`."""
    found = [r for r in experiment(name)["rows"] if setting_of(r).keys() == match.keys()
             and all(same_value(setting_of(r)[k], v) for k, v in match.items())]
    if len(found) != 1:
        raise LookupError(f"{name}: {len(found)} rows have the setting {match}")
    return found[0]


def adopted_row(name: str) -> dict:
    """The sweep row that today's defaults come from: of the rows (one seed) whose every setting has its default
    value today, the one that names the most settings (a row naming fewer left the others at that day's defaults)."""
    matching = [r for r in experiment(name)["rows"] if "seed" not in setting_of(r)
                and all(same_value(params("train").get(k), v) for k, v in setting_of(r).items())]
    return max(matching, key=lambda r: len(setting_of(r)))


def other_seeds(name: str) -> list[dict]:
    """The rows of the adopted setting with another seed."""
    adopted = setting_of(adopted_row(name))
    return [r for r in experiment(name)["rows"] if "seed" in setting_of(r)
            and {k: v for k, v in setting_of(r).items() if k != "seed"} == adopted]


# ----------------------------------------------------------------------------- the code, run


def stages_on_path() -> None:
    for folder in (REPO, REPO / "stages"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def run_and_show(code: str) -> None:
    """A Python block of the docs and, below it, what it printed when cog ran it (stages/ on the path)."""
    import contextlib
    import io

    stages_on_path()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    print("```python")
    print(code)
    print("```")
    print()
    text_block(printed.getvalue().splitlines())


def ln(x: float) -> float:
    return math.log(x)


def pins(*packages: str) -> str:
    """`name==version` of each package as requirements.txt pins it."""
    pinned = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    return " ".join(f"{name}=={pinned[name]}" for name in packages)


def as_typed(key: str, variables: dict) -> str:
    """A setting as a user types it: its Make variable, else the config key (a flag of its stage)."""
    return f"`{variables[key]}`" if key in variables else f"`{key}` (no Make variable)"


def not_in_params() -> str:
    """The settings left out of every stage's parameter file (NOT_RESULT_KEYS in stages/lib/runtime/config.py), as
    typed: the Make variable where there is one, else the config key."""
    stages_on_path()
    from lib.runtime.config import NOT_RESULT_KEYS
    from lib.training.runs import make_variables

    variables = make_variables()
    return ", ".join(sorted(as_typed(key, variables) for key in NOT_RESULT_KEYS))


def not_in_identity() -> str:
    """The settings a run's identity leaves out (NOT_IN_FINGERPRINT in stages/lib/training/runs.py), as typed:
    the Make variable where there is one, else the config key."""
    stages_on_path()
    from lib.training.runs import NOT_IN_FINGERPRINT, make_variables

    variables = make_variables()
    return ", ".join(f"`{variables.get(key, key)}`" for key in sorted(NOT_IN_FINGERPRINT, key=lambda k: variables.get(k, k)))


def same_run_rerun() -> str:
    """The settings a run's identity leaves out but train's parameter file keeps: changing one reruns train.py,
    which finds the same run (NOT_IN_FINGERPRINT minus NOT_RESULT_KEYS), as typed. RESUME is left out: it is
    the setting that says what to do with that run."""
    stages_on_path()
    from lib.runtime.config import NOT_RESULT_KEYS
    from lib.training.runs import NOT_IN_FINGERPRINT, make_variables

    variables = make_variables()
    return ", ".join(as_typed(key, variables) for key in
                     sorted(NOT_IN_FINGERPRINT - set(NOT_RESULT_KEYS) - {"resume"}, key=lambda k: variables.get(k, k)))


def block_time_share() -> float:
    """One block's share of a default training step's time, from bench.py --profile: everything but the output
    layer, split evenly over the blocks (an upper bound: embedding lookups, the last norm and the embedding's
    AdamW update are in it too)."""
    bf = data("profile")["paths"]["bfloat16"]
    output = sum(r["total"] for r in bf["rows"] if r["part"] == "output layer")
    return (bf["profiled_step_ms"] - output) / params("train")["n_layers"] / bf["profiled_step_ms"]
