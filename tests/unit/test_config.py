"""Configuration: YAML defaults < Make variables (passed on as flags) < flags, every bad value refused at once,
the resolved parameters printed or saved, in the pytest process (lib/runtime/config.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from unit.conftest import REPO
from lib.runtime.config import resolve_config, stage_parser
from lib.runtime.errors import EXIT_USAGE, PipelineError
from lib.training.runs import make_variables

YAML = """\
paths:
  data_dir: data
  artifacts_dir: artifacts
train:
  learning_rate: 1            # an int in YAML, a float flag
  epochs: 3.0                 # a whole float, an int flag
  compile: false
  prompts: [In the beginning, En el principio]
  optimizer: muon
"""


def parser() -> argparse.ArgumentParser:
    p = stage_parser("train", "a stage with one flag of each kind")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prompts", type=str, nargs="+", default=None)
    p.add_argument("--optimizer", type=str, default=None, choices=["adamw", "muon"])
    return p


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(YAML, encoding="utf-8")
    return path


def resolve(config, *flags, validate=None) -> dict:
    return resolve_config(parser(), "train", ["--config", str(config), *map(str, flags)], validate=validate)


def refused(capsys, config, *flags, validate=None) -> str:
    """The stage stops with exit code 2 before any work; what it printed on stderr."""
    with pytest.raises(SystemExit) as stop:
        resolve(config, *flags, validate=validate)
    assert stop.value.code == EXIT_USAGE
    return capsys.readouterr().err


def test_yaml_values_take_their_flags_types_and_flags_win(config):
    cfg = resolve(config)
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["epochs"] == 3 and isinstance(cfg["epochs"], int)
    assert cfg["compile"] is False and cfg["prompts"] == ["In the beginning", "En el principio"]
    assert (cfg["data_dir"], cfg["artifacts_dir"]) == ("data", "artifacts")
    assert cfg["_overridden"] == [] and cfg["_config"] == str(config)

    cfg = resolve(config, "--learning-rate", "0.001", "--compile", "--epochs", "3", "--prompts", "Hola")
    assert (cfg["learning_rate"], cfg["compile"], cfg["prompts"]) == (0.001, True, ["Hola"])
    # a flag equal to the YAML value is not an override: the resume command need not repeat it
    assert cfg["_overridden"] == ["compile", "learning_rate", "prompts"]


def test_a_flag_without_a_yaml_key_is_marked_only_when_set(config):
    """An internal flag (export's --prove) has an argparse default and no YAML key: a plain run's config
    line must not mark it as overridden (a cold reader took the * for something they had done)."""
    def with_internal():
        p = parser()
        p.add_argument("--prove", type=str, default="")
        return p
    plain = resolve_config(with_internal(), "train", ["--config", str(config)])
    assert plain["prove"] == "" and plain["_overridden"] == []
    given = resolve_config(with_internal(), "train", ["--config", str(config), "--prove", "/tmp/x"])
    assert given["_overridden"] == ["prove"]


def test_every_problem_is_reported_at_once(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML.replace("epochs: 3.0", "epochs: 2.5").replace("compile: false", "compile: maybe")
                   .replace("prompts: [In the beginning, En el principio]", "prompts: In the beginning")
                   .replace("optimizer: muon", "optimiser: muon")
                   + "trian:\n  epochs: 1\n", encoding="utf-8")
    err = refused(capsys, bad)
    assert "bad parameters for stage 'train'" in err
    for problem in ("train.epochs: expected int, got 2.5", "train.compile: expected true or false, got 'maybe'",
                    "train.prompts: expected a list, got 'In the beginning'", "unknown key 'train.optimiser'",
                    "unknown section 'trian'", "optimizer: no value in", "and no --optimizer flag"):
        assert problem in err, problem
    assert "fix: correct the flag, Make variable or YAML key" in err


def test_a_flag_fills_a_value_the_yaml_lacks(config):
    config.write_text(YAML.replace("  optimizer: muon\n", ""), encoding="utf-8")
    assert resolve(config, "--optimizer", "adamw")["optimizer"] == "adamw"


def test_the_stage_checks_run_once_the_values_parse(capsys, config):
    def validate(cfg):
        return [f"epochs must be > 1, got {cfg['epochs']}"] if cfg["epochs"] <= 1 else []

    assert "epochs must be > 1, got 1" in refused(capsys, config, "--epochs", "1", validate=validate)
    assert resolve(config, "--epochs", "2", validate=validate)["epochs"] == 2
    assert "invalid choice: 'sgd'" in refused(capsys, config, "--optimizer", "sgd")  # argparse's own check


@pytest.mark.parametrize("text, message", [
    (None, "not found"),
    ("train: [unclosed", "is not valid YAML"),
    ("- a list\n- of sections\n", "must be a mapping of sections"),
])
def test_an_unreadable_config_file_is_a_usage_error(tmp_path, text, message):
    path = tmp_path / "defaults.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=message) as error:
        resolve(path)
    assert error.value.exit_code == EXIT_USAGE


def test_print_params_shows_the_resolved_values_and_stops(capsys, config):
    with pytest.raises(SystemExit) as stop:
        resolve(config, "--epochs", "7", "--print-params")
    assert stop.value.code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["epochs"] == 7 and shown["learning_rate"] == 1.0 and "_overridden" not in shown


def test_write_params_saves_them_and_rewrites_only_what_changed(capsys, config, tmp_path):
    saved = tmp_path / "params" / "train.json"

    def write(*flags):
        with pytest.raises(SystemExit) as stop:
            resolve(config, *flags, "--write-params", saved)
        assert stop.value.code == 0
        return capsys.readouterr().out

    assert write() == ""
    params = json.loads(saved.read_text())
    assert params == {"compile": False, "epochs": 3, "learning_rate": 1.0, "optimizer": "muon",
                      "prompts": ["In the beginning", "En el principio"]}, "folders are not results: not saved"
    before = saved.stat().st_mtime_ns, saved.stat().st_ino

    assert write("--artifacts-dir", "elsewhere") == "", "another folder reruns nothing"
    assert (saved.stat().st_mtime_ns, saved.stat().st_ino) == before, "unchanged: not rewritten, so make reruns nothing"

    said = write("--learning-rate", "0.5", "--epochs", "4")
    assert said == "params: train reruns: epochs 3 -> 4, learning_rate 1.0 -> 0.5\n"
    assert json.loads(saved.read_text())["learning_rate"] == 0.5
    assert [p.name for p in saved.parent.iterdir()] == ["train.json"], "no temp file left"


def test_the_shipped_defaults_resolve_for_training_and_make_variables_are_its_flags():
    from train import build_parser, validate  # the real stage's flags and checks

    shipped = yaml.safe_load((REPO / "config" / "defaults.yaml").read_text(encoding="utf-8"))
    defaults = resolve_config(build_parser(), "train", [], validate=validate)
    assert {k: defaults[k] for k in shipped["train"]} == shipped["train"]
    assert defaults["_overridden"] == []

    variables = make_variables()  # what `make train LR=... EPOCHS=...` turns into which flag
    assert (variables["learning_rate"], variables["epochs"], variables["batch_size"]) == ("LR", "EPOCHS", "BATCH_SIZE")
    made = resolve_config(build_parser(), "train", ["--learning-rate", "0.001", "--epochs", "3"], validate=validate)
    assert (made["learning_rate"], made["epochs"]) == (0.001, 3) and made["_overridden"] == ["epochs", "learning_rate"]
    assert {k: made[k] for k in shipped["train"] if k not in ("learning_rate", "epochs")} == \
        {k: defaults[k] for k in shipped["train"] if k not in ("learning_rate", "epochs")}


def test_the_real_training_checks_report_every_bad_value(capsys):
    from train import build_parser, validate

    with pytest.raises(SystemExit) as stop:
        resolve_config(build_parser(), "train", ["--d-model", "30", "--n-heads", "4", "--epochs", "0",
                                                 "--dropout", "1.5"], validate=validate)
    assert stop.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    for problem in ("d_model (30) must be divisible by n_heads (4)", "epochs (--epochs) must be > 0, got 0",
                    "dropout (--dropout) must be 'auto' or within [0, 1)"):
        assert problem in err, problem

