"""Evaluation report, language identifier, repetition metrics, plots, the generate CLI, offline use."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "stages"))
from evaluate import choose_prompts, corpus_prompts, identify_language, repetition_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Makes any network use fail inside the child process: evaluate and generate must not need it.
NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access blocked by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def offline_env(tmp_path):
    site = tmp_path / "offline_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    return {"PYTHONPATH": str(site)}


def test_language_identifier_on_known_sentences():
    assert identify_language("And the king said unto them, Go ye into the city of David.") == "en"
    assert identify_language("Y el rey les dijo: Id á la ciudad de David, porque es tiempo.") == "es"
    assert identify_language("Blessed are the poor in spirit: for theirs is the kingdom of heaven.") == "en"
    assert identify_language("Bienaventurados los pobres en espíritu: porque de ellos es el reino.") == "es"
    assert identify_language("12345 !!! ???") == "unknown"


def test_repetition_metrics_on_crafted_sequences():
    fresh = repetition_metrics([1, 2, 3, 4, 5, 6], "one two three four five six")
    assert fresh["repeated_3gram_share"] == 0 and fresh["max_repeat_run"] == 1
    assert fresh["distinct_1"] == 1 and fresh["distinct_2"] == 1
    looping = repetition_metrics([1, 2, 3, 1, 2, 3, 1, 2, 3], "the the the the")
    assert looping["repeated_3gram_share"] == 1 - 3 / 7
    assert looping["distinct_1"] == 0.25
    stuck = repetition_metrics([5, 7, 7, 7, 7, 7, 2], "x")
    assert stuck["max_repeat_run"] == 5


VAL_TEXT = (
    "1.2.1. Basic information about the system\n"
    "Table 3. List of tools\n"
    "The shell is the program that reads the commands you type.\n"
    "The kernel then runs them for you.\n"
    "\n"
    "El intérprete de órdenes es el programa que lee lo que escribe.\n"
    "\n"
    "You can change the shell of your account with the chsh command.\n"
)


def test_corpus_prompts_open_sentences_not_headings_one_per_document():
    prompts = corpus_prompts(VAL_TEXT, per_language=3)
    assert prompts == {"en": ["The shell is the", "You can change the"], "es": ["El intérprete de órdenes"]}
    assert corpus_prompts(VAL_TEXT, per_language=1)["en"] == ["The shell is the"]


def test_prompts_are_the_yaml_ones_for_the_default_corpus_else_from_the_validation_split(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "val.txt").write_text(VAL_TEXT, encoding="utf-8")
    paths = {"raw": tmp_path / "raw", "prepared": tmp_path / "prepared"}
    cfg = {"prompt_source": "auto", "prompts_en": ["In the beginning"], "prompts_es": ["En el principio"],
           "_overridden": []}
    for kind, expected in (("wheel", "config"), ("path", "validation documents"), ("url", "validation documents")):
        (tmp_path / "raw" / "corpus.json").write_text(json.dumps({"source": {"kind": kind}}))
        prompts, origin = choose_prompts(cfg, paths)
        assert origin == expected, kind
    assert prompts == {"en": ["The shell is the"], "es": ["El intérprete de órdenes"]}
    assert choose_prompts({**cfg, "_overridden": ["prompts_en"]}, paths)[1] == "config"  # the user's prompts win
    assert choose_prompts({**cfg, "prompt_source": "corpus"}, paths)[1] == "validation documents"


def test_report_fields_checks_and_plots(trained, tmp_path):
    out = trained.run("evaluate.py", "--latency-steps", "200", env=offline_env(tmp_path))
    eval_dir = trained.artifacts / "eval"
    report = json.loads((eval_dir / "report.json").read_text())
    for key in ("val_loss", "perplexity", "val_bpb"):
        assert report["metrics"][key] > 0
    lat = report["inference"]
    assert lat["steps"] >= 200 and lat["generations"] >= 2
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["tokens_per_s"] > 0 and lat["peak_rss_mb"] >= lat["rss_mb"] > 0
    assert lat["cpu_seconds_per_token"] > 0
    names = {c["check"] for c in report["checks"]}
    assert {"validation loss < 5.0", "samples in both languages"} <= names and any("overfitting gap" in n for n in names)
    assert not any("SC-" in n or "FR-" in n for n in names)  # the report stands alone: no spec numbers
    val_check = next(c for c in report["checks"] if c["check"] == "validation loss < 5.0")
    assert val_check["passed"] == (report["metrics"]["val_loss"] < 5.0)
    assert len(report["samples"]) == 6 and {s["prompt_language"] for s in report["samples"]} == {"en", "es"}
    for plot in ("loss.png", "lr.png", "bpb.png"):
        data = (eval_dir / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    markdown = (eval_dir / "report.md").read_text()
    assert "| validation loss" in markdown and "PASS" in markdown or "FAIL" in markdown
    assert report["headline"] in out.stdout


def test_generate_streams_and_is_reproducible_offline(trained, tmp_path):
    args = ("--prompt", "En el principio", "--max-tokens", "60", "--gen-seed", "5")
    first = trained.run("generate.py", *args, env=offline_env(tmp_path))
    second = trained.run("generate.py", *args, env=offline_env(tmp_path))
    assert first.stdout.startswith("En el principio")
    assert first.stdout == second.stdout
    other = trained.run("generate.py", "--prompt", "En el principio", "--max-tokens", "60", "--gen-seed", "6")
    assert other.stdout != first.stdout


def test_generate_beyond_the_context_uses_a_sliding_window(trained):
    # the tiny model's context is 32 tokens; 100 new tokens need the window to slide
    import sentencepiece as spm
    out = trained.run("generate.py", "--prompt", "And the king", "--max-tokens", "100", "--temperature", "0")
    sp = spm.SentencePieceProcessor(model_file=str(trained.artifacts / "tokenizer" / "spm.model"))
    assert len(sp.encode(out.stdout.strip())) > 60


def test_generate_into_a_pipe_that_closes_early_stops_quietly(trained):
    """`make generate | head`: the reader leaves after 40 bytes; generate stops without a traceback."""
    generate = (f"'{sys.executable}' '{REPO / 'stages' / 'generate.py'}' --data-dir '{trained.data}' "
                f"--artifacts-dir '{trained.artifacts}' --max-tokens 20000 --temperature 1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", f"{generate} | head -c 40"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and len(result.stdout.encode()) == 40, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_generate_without_a_model_points_to_make_train(workspace):
    result = workspace.run("generate.py", check=False)
    assert result.returncode == 1 and "make train" in result.stderr and "Traceback" not in result.stderr


def test_malicious_checkpoint_is_not_executed(trained, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Exploit()}))
    result = trained.run("generate.py", "--checkpoint", evil, check=False)
    assert result.returncode == 1
    assert "not a checkpoint of this pipeline" in result.stderr and "it was not executed" in result.stderr
    assert not marker.exists()


def test_figures_are_drawn_from_the_snapshot_and_the_model_of_its_run(trained, tmp_path):
    """figures.py draws from a snapshot (docs/data/ for the docs) and the trained model of the same run."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    history = json.loads((trained.artifacts / "checkpoints" / "history.json").read_text())
    (snapshot / "history.json").write_text(json.dumps(history))
    (snapshot / "tokenizer.json").write_text((trained.artifacts / "tokenizer" / "tokenizer.json").read_text())
    (snapshot / "runs.json").write_text(json.dumps({"runs": [{"config": {**history["config"], "dropout": 0.0,
                                                                          "input_noise": 0.0},
                                                               "epochs": history["epochs"]}]}))
    (snapshot / "snapshot.json").write_text(json.dumps({"params": {"evaluate": {"temperature": 0.8, "top_k": 50,
                                                                                "top_p": 1.0}}}))
    out = trained.run("figures.py", "--out", tmp_path / "images", "--snapshot", snapshot)
    for name in ("lr_schedule.png", "window_grid.png", "loss_curves.png", "first_steps.png", "overfitting.png",
                 "rotary.png", "attention.png", "sampling.png"):
        data = (tmp_path / "images" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    heads = json.loads((snapshot / "attention.json").read_text())["heads"]
    assert len(heads) == 2 and all(0 <= h["self"] <= 1 and 0 <= h["bos"] <= 1 for h in heads)
    sampling = json.loads((snapshot / "sampling.json").read_text())["settings"]
    assert [s["tokens_possible"] for s in sampling][0] == 1 and sampling[3]["tokens_possible"] == 50
    assert "wrote lr_schedule.png" in out.stdout

    history["fingerprint"] = "another run"
    (snapshot / "history.json").write_text(json.dumps(history))
    refused = trained.run("figures.py", "--out", tmp_path / "images", "--snapshot", snapshot, check=False)
    assert refused.returncode == 1 and "is not the run of the snapshot" in refused.stderr
