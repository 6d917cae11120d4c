"""Make never throws away a good output, and never trusts a bad one: each fault made for real in a scratch
copy of the project (a failed stage, a full disk, a damaged or missing output, an unsafe path, a broken
link, a file dated in the future), then the printed fix followed literally.

The make helpers and the tiny pipeline's variables are tests/test_make.py's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, TINY_TRAIN, copy_project, make_corpus_text
from test_make import make, project, ran  # noqa: F401 - project is a fixture

STAGE_SCRIPTS = {"download": "download.py", "prepare": "prepare.py", "tokenizer": "train_tokenizer.py",
                 "encode": "encode.py"}
OUTPUTS = {"download": ["data/raw/corpus.txt", "data/raw/corpus.json"],
           "prepare": ["data/prepared/train.txt", "data/prepared/val.txt", "data/prepared/stats.json"],
           "tokenizer": ["artifacts/tokenizer/spm.model", "artifacts/tokenizer/spm.vocab",
                         "artifacts/tokenizer/tokenizer.json"],
           "encode": ["data/encoded/train.npy", "data/encoded/train.json", "data/encoded/val.npy",
                      "data/encoded/val.json"]}
STAGE_OF = {output: stage for stage, outputs in OUTPUTS.items() for output in outputs}
DATA_FILES = [output for outputs in OUTPUTS.values() for output in outputs]


def snapshot(proj: Path) -> dict[str, tuple[bytes, int]]:
    """Every data stage output's bytes and modification time."""
    return {name: ((proj / name).read_bytes(), (proj / name).stat().st_mtime_ns) for name in DATA_FILES}


def printed_fix(stderr: str) -> str:
    """The command in an error's `fix:` line, as printed."""
    match = re.search(r"fix: .*?`([^`]+)`", stderr)
    assert match, f"no command in a fix line:\n{stderr}"
    return match[1]


def follow(proj: Path, command: str, tiny: list[str]) -> subprocess.CompletedProcess:
    """Run a printed `make ...` fix literally (plus the tiny pipeline's variables, which every command here gets)."""
    words = shlex.split(command)
    assert words[0] == "make", command
    return make(proj, *words[1:], *tiny)


# ----------------------------------------------------------------------------- the Makefile itself


def test_no_grouped_targets_and_nothing_newer_than_make_3_81():
    """GNU make 3.81 (macOS) reads `&:` as a target named `&`; these are the features it lacks."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    rules = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for feature in ("&:", ".DELETE_ON_ERROR", "$(file ", ".ONESHELL", "::=", "!=", "undefine ", "$(guile",
                    ".RECIPEPREFIX", "private "):
        assert not any(feature in line for line in rules), f"the Makefile uses {feature}"


def test_help_shows_the_defaults_of_the_yaml_for_generate(project):
    proj, _, _ = project
    out = make(proj, "help").stdout
    generate = yaml.safe_load((proj / "config" / "defaults.yaml").read_text())["generate"]
    assert f"PROMPT='{generate['prompt']}'" in out
    assert "test-fast" in out and "test " in out


# ----------------------------------------------------------------------------- a failed stage deletes nothing


def test_a_failed_stage_leaves_every_output_as_it_was(project):
    """A tokenizer that cannot be trained, then a disk full while encoding: make deletes nothing, `make generate`
    still works, and the same command reruns the stage once the fault is gone. Built with -j4 to keep it safe."""
    proj, tiny, _ = project
    make(proj, "all", "-j4", *tiny)
    assert ran(make(proj, "all", "-j4", *tiny).stdout) == [], "a second make all -j4 rebuilds nothing"
    before = snapshot(proj)

    failed = make(proj, "tokenizer", *tiny, "VOCAB_SIZE=60000", check=False)
    assert failed.returncode != 0 and "nothing was written" in failed.stderr
    assert snapshot(proj) == before, "a failed stage must leave every output, its own included, as it was"
    assert "Deleting" not in failed.stderr
    generated = make(proj, "generate", *tiny, "MAX_TOKENS=5")
    assert "Traceback" not in generated.stderr

    full = subprocess.run(["make", "encode", *tiny, "VOCAB_SIZE=310"], cwd=proj, capture_output=True, text=True,
                          timeout=600, env={**{k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
                                            "FAULT_ENOSPC": "val.json"})
    assert full.returncode != 0 and "disk full" in full.stderr and "Deleting" not in full.stderr, full.stderr
    for name in OUTPUTS["encode"]:
        assert (proj / name).exists(), f"{name} was deleted after the encode stage failed"
    assert "rerun the same command" in full.stderr
    again = make(proj, "encode", *tiny, "VOCAB_SIZE=310")
    assert ran(again.stdout) == ["encode.py"], "the failed stage reruns"
    assert json.loads((proj / "data" / "encoded" / "val.json").read_text())["vocab_size"] == 310
    assert ran(make(proj, "encode", *tiny, "VOCAB_SIZE=310").stdout) == []


# ----------------------------------------------------------------------------- a damaged output reruns its stage


@pytest.fixture(scope="module")
def encoded_project(tmp_path_factory):
    """A scratch project whose data stages ran once; each test damages a copy of it."""
    root = tmp_path_factory.mktemp("encoded")
    proj = copy_project(root / "proj")
    corpus = root / "corpus_in.txt"
    corpus.write_text(make_corpus_text(), encoding="utf-8")
    tiny = [f"VENV={sys.prefix}", f"CORPUS_PATH={corpus}", "VOCAB_SIZE=320", "THREADS=1", "MIN_FREE_GB=0.01"]
    make(proj, "encode", *tiny)
    return proj, tiny


@pytest.fixture
def damaged_copy(encoded_project, tmp_path):
    proj, tiny = encoded_project
    copy = tmp_path / "proj"
    shutil.copytree(proj, copy, symlinks=True)  # copy2: times kept, so the copy is as up to date as the original
    return copy, tiny


def damage(path: Path, how: str) -> None:
    time.sleep(0.01)
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # replaced by something else of the same size, so that only the content tells
        path.write_bytes(b"x" * path.stat().st_size)


# Every output truncated; one of each stage missing, and one overwritten with as many bytes (only the hash tells).
DAMAGES = [(output, "truncated") for output in DATA_FILES] + [(outputs[0], "missing") for outputs in OUTPUTS.values()] \
    + [(outputs[-1], "overwritten") for outputs in OUTPUTS.values()]


@pytest.mark.parametrize(("output", "how"), DAMAGES)
def test_a_damaged_output_reruns_its_stage_and_what_follows(damaged_copy, output, how):
    proj, tiny = damaged_copy
    assert ran(make(proj, "encode", *tiny).stdout) == [], "the copy is up to date"
    whole = (proj / output).read_bytes()
    damage(proj / output, how)
    result = make(proj, "encode", *tiny)
    stages = list(STAGE_SCRIPTS)
    expected = [STAGE_SCRIPTS[s] for s in stages[stages.index(STAGE_OF[output]):]]
    assert ran(result.stdout) == expected, result.stdout
    assert f"check: {output} " in result.stdout and f"{STAGE_OF[output]} is out of date" in result.stdout
    if output.endswith(".json"):  # a sidecar holds timings: the same fields, whole again
        assert json.loads((proj / output).read_text()).keys() == json.loads(whole).keys()
    else:
        assert (proj / output).read_bytes() == whole, "the stage wrote it again, byte for byte"
    assert ran(make(proj, "encode", *tiny).stdout) == []


# Each error that names a damaged data output, the command that shows it, and the fix it prints.
CONSUMERS = {
    "data/raw/corpus.txt": ("missing", "prepare.py", []),
    "data/prepared/train.txt": ("missing", "train_tokenizer.py", ["--vocab-size", "320"]),
    "artifacts/tokenizer/spm.model": ("overwritten", "encode.py", []),
    "artifacts/tokenizer/tokenizer.json": ("truncated", "encode.py", []),
    "data/encoded/train.npy": ("truncated", "train.py", TINY_TRAIN),
    "data/encoded/val.json": ("truncated", "train.py", TINY_TRAIN),
}


@pytest.mark.parametrize("output", list(CONSUMERS))
def test_the_printed_fix_repairs_a_damaged_output(damaged_copy, output):
    """The stage that reads the damaged file names a make command; that command, typed as printed, repairs it."""
    proj, tiny = damaged_copy
    how, script, flags = CONSUMERS[output]
    damage(proj / output, how)
    stage = [PYTHON, f"stages/{script}", *flags]
    broken = subprocess.run(stage, cwd=proj, capture_output=True, text=True, timeout=600)
    assert broken.returncode != 0 and "Traceback" not in broken.stderr, broken.stderr
    command = printed_fix(broken.stderr)
    follow(proj, command, tiny)
    assert ran(follow(proj, command, tiny).stdout) == [], "the fix is done once"
    repaired = subprocess.run(stage, cwd=proj, capture_output=True, text=True, timeout=600)
    assert repaired.returncode == 0, repaired.stderr



# ----------------------------------------------------------------------------- paths make cannot carry


@pytest.mark.parametrize(("variable", "folder", "said"), [("DATA_DIR", "my data", "a space"),
                                                          ("ARTIFACTS_DIR", "art:1", ":"),
                                                          ("DATA_DIR", "data#2", "#")])
def test_an_unsafe_path_is_refused_before_any_rule_runs(project, tmp_path, variable, folder, said):
    proj, tiny, _ = project
    unsafe = tmp_path / folder
    for goal in ("download", "check"):
        refused = make(proj, goal, *tiny, f"{variable}={unsafe}", check=False)
        assert refused.returncode != 0 and f"{variable}='{unsafe}' holds {said}," in refused.stderr, refused.stderr
        assert refused.stdout == "", "no rule ran"
    assert not (proj / "data").exists() and not (proj / "artifacts").exists() and not unsafe.exists()
    assert not list(tmp_path.glob(folder.split()[0] + "*")) and not (proj / folder.split()[-1]).exists()

    suggested = re.search(rf"fix: rerun with {variable}=(\S+),", refused.stderr)[1]
    make(proj, "encode", *tiny, f"{variable}={suggested}")
    default = "data" if variable == "DATA_DIR" else "artifacts"
    assert (Path(suggested) / ("raw/corpus.txt" if default == "data" else "tokenizer/spm.model")).exists()
    assert not (proj / default).exists(), "nothing went to the default folder"


# ----------------------------------------------------------------------------- the corpus files make cannot see


def test_a_corpus_folder_is_read_as_download_reads_it(project, tmp_path):
    """Names with spaces, upper-case suffixes, a broken link, a folder named like a file, a file of another kind:
    make lists exactly the files download.py reads, reruns download when one of them changes, and only then."""
    proj, tiny, _ = project
    folder = tmp_path / "my corpus"
    folder.mkdir()
    kept = {"chapter one.txt": "A", "B.TXT": "B", "c.Html": "<h1>C</h1><p>C</p>"}
    for name, marker in kept.items():
        (folder / name).write_text(make_corpus_text(documents=8).replace("And", f"And{marker[-1]}", 1))
    (folder / "notes.md").write_text("not a corpus file\n")
    (folder / "gone.txt").symlink_to(folder / "removed.txt")
    (folder / "sub.txt").mkdir()
    tiny = [v for v in tiny if not v.startswith("CORPUS_PATH=")] + [f"CORPUS_PATH={folder}"]

    first = make(proj, "download", *tiny)
    assert ran(first.stdout) == ["download.py"]
    listed = (proj / "data" / "params" / "inputs.txt").read_text()
    corpus = (proj / "data" / "raw" / "corpus.txt").read_text()
    for name in ("chapter one.txt", "B.TXT", "c.Html", "notes.md", "gone.txt", "sub.txt"):
        assert (str(folder / name) in listed) == (name in kept), name
    for marker in ("AndA", "AndB"):
        assert marker in corpus, "what make lists is what download.py read"
    assert ran(make(proj, "download", *tiny).stdout) == []

    (folder / "notes.md").write_text("edited\n")
    (folder / "gone.txt").unlink()
    assert ran(make(proj, "download", *tiny).stdout) == [], "files download.py does not read change nothing"
    time.sleep(0.01)
    (folder / "chapter one.txt").write_text(make_corpus_text(documents=9))
    assert ran(make(proj, "download", *tiny).stdout) == ["download.py"]
    (folder / "d.txt").write_text(make_corpus_text(documents=3))
    assert ran(make(proj, "download", *tiny).stdout) == ["download.py"], "a new file reruns download"


# ----------------------------------------------------------------------------- a date in the future


@pytest.mark.parametrize("dated", ["corpus", "code"])
def test_a_future_dated_input_is_named_with_its_fix(project, dated):
    proj, tiny, corpus = project
    make(proj, "encode", *tiny)
    late = corpus if dated == "corpus" else proj / "stages" / "prepare.py"
    future = time.time() + 3 * 3600
    os.utime(late, (future, future))
    before = snapshot(proj)
    refused = make(proj, "all", *tiny, check=False)
    assert refused.returncode != 0 and "dated in the future" in refused.stderr and str(late.name) in refused.stderr
    assert ran(refused.stdout) == [] and snapshot(proj) == before, "nothing was rebuilt"

    subprocess.run(printed_fix(refused.stderr), shell=True, cwd=proj, check=True)
    fixed = make(proj, "encode", *tiny)
    assert ran(fixed.stdout) == ["download.py", "prepare.py", "train_tokenizer.py", "encode.py"][
        0 if dated == "corpus" else 1:], "touched: it reruns what it feeds, once"
    assert ran(make(proj, "encode", *tiny).stdout) == []
