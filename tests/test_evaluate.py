"""Evaluation report, plots, the generate CLI, offline use (the text measures: tests/unit/test_evaluate_text.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

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
