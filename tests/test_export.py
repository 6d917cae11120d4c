"""make export on the tiny trained model: transformers and onnxruntime really load what it writes,
the proofs hold, the ONNX path runs with torch unimportable, bad input leaves no export behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import PYTHON, REPO, TINY_TOKENIZER, Workspace, assert_clean_failure
from faults_helpers import fill, small_disk


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Workspace:
    """A copy of the shared trained workspace, exported once."""
    root = tmp_path_factory.mktemp("exported")
    shutil.copytree(trained.data, root / "data")
    shutil.copytree(trained.artifacts, root / "artifacts")
    ws = Workspace(root)
    ws.export_output = ws.run("export.py", "--latency-steps", "60", timeout=600).stdout
    return ws


def block_torch(tmp_path) -> dict:
    """An environment in which `import torch` fails."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is not available in this test")\n')
    return {"PYTHONPATH": str(fake.parent)}


def test_export_writes_folders_whose_proofs_hold(exported):
    out = exported.artifacts / "export"
    summary = json.loads((out / "export.json").read_text())
    proofs = summary["proofs"]
    assert proofs["passed"]
    assert proofs["tokenizer"]["mismatches"] == 0 and proofs["tokenizer"]["strings"] > 100
    assert proofs["logits"]["max_abs_diff"] <= 1e-4 and proofs["logits"]["windows"] == 8
    assert {r["runtime"] for r in proofs["greedy"]["runs"]} == {"transformers", "onnx"}
    assert all(r["identical"] for r in proofs["greedy"]["runs"])
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / "hf" / name).is_file(), name
    # the export's own settings are recorded for make, not those of the proof process it starts
    params = json.loads((exported.artifacts / "params" / "export.json").read_text())
    assert params["checkpoint"] == "best_model.pt" and params["prove"] == "" and params["latency_steps"] == 60
    assert {"model.onnx", "model.json", "spm.model"} <= {p.name for p in (out / "onnx").iterdir()}
    bench = json.loads((out / "benchmark.json").read_text())
    for runtime in ("onnx", "torch"):
        assert set(bench[runtime]) >= {"p50_ms", "p95_ms", "tokens_per_s", "rss_mb", "peak_rss_mb"}
    assert bench["onnx"]["peak_rss_mb"] < bench["torch"]["peak_rss_mb"], "the ONNX runtime carries no torch"
    assert not list(out.glob(".staging-*"))
    card = (out / "hf" / "README.md").read_text()
    architecture = json.loads((out / "hf" / "config.json").read_text())["architectures"][0]
    assert "Intended use and limits" in card and architecture in card


def test_transformers_loads_the_export_and_generates_our_tokens(exported):
    """In this process, offline: AutoModel/AutoTokenizer from the folder, greedy ids equal ours."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "stages"))
    from lib.training.checkpoints import load_model

    hf_dir = exported.artifacts / "export" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ours, _ = load_model(exported.artifacts / "checkpoints" / "best_model.pt")
    inputs = tokenizer("Y el rey habló", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == 2, "the tokenizer puts <s> first, as generation does"
    hf_ids = hf_model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    our_ids = list(ours.generate(inputs["input_ids"][0].tolist(), 12, temperature=0, eos_id=3))
    assert hf_ids == our_ids
    with torch.no_grad():
        x = inputs["input_ids"]
        assert torch.allclose(hf_model(x).logits, ours(x)[0], atol=1e-4)


def test_onnx_generation_runs_without_torch_and_matches_torch(exported, tmp_path):
    args = ["--prompt", "Y el rey habló", "--max-tokens", "40", "--temperature", "0"]
    torch_text = exported.run("generate.py", *args).stdout
    onnx_text = exported.run("generate.py", *args, "--runtime", "onnx", env=block_torch(tmp_path)).stdout
    assert onnx_text == torch_text and len(onnx_text) > len("Y el rey habló")
    blocked = exported.run("generate.py", *args, env=block_torch(tmp_path), check=False)
    assert blocked.returncode != 0, "the torch path must fail when torch is blocked: the block works"


def test_make_generate_runtime_onnx(exported, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(block_torch(tmp_path))
    result = subprocess.run(["make", "-s", "generate", f"VENV={sys.prefix}", f"DATA_DIR={exported.data}",
                             f"ARTIFACTS_DIR={exported.artifacts}", "RUNTIME=onnx", "PROMPT=En el principio",
                             "MAX_TOKENS=10"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("En el principio")


def no_export_left(ws: Workspace) -> bool:
    out = ws.artifacts / "export"
    return not out.exists() or not [p for p in out.iterdir()]


def test_export_without_a_model_or_with_a_bad_one_fails_clearly(encoded, trained, tmp_path):
    none = encoded.run("export.py", check=False)
    assert none.returncode == 1 and "no trained model" in none.stderr and "make train" in none.stderr
    assert no_export_left(encoded)

    ws = Workspace(tmp_path / "bad")
    shutil.copytree(trained.data, ws.data)
    shutil.copytree(trained.artifacts, ws.artifacts)
    checkpoint = ws.artifacts / "checkpoints" / "best_model.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # truncated
    corrupted = ws.run("export.py", check=False)
    assert corrupted.returncode == 1 and str(checkpoint) in corrupted.stderr and "make train" in corrupted.stderr
    assert "Traceback" not in corrupted.stderr and no_export_left(ws)

    shutil.copy2(trained.artifacts / "checkpoints" / "best_model.pt", checkpoint)
    ws.run("train_tokenizer.py", "--vocab-size", str(int(TINY_TOKENIZER[1]) - 10))  # another tokenizer
    mismatch = ws.run("export.py", check=False)
    assert mismatch.returncode == 1 and "another tokenizer" in mismatch.stderr and "make train" in mismatch.stderr
    assert no_export_left(ws)


def test_killed_export_never_looks_finished(trained, tmp_path):
    ws = Workspace(tmp_path / "killed")
    shutil.copytree(trained.data, ws.data)
    shutil.copytree(trained.artifacts, ws.artifacts)
    killed = ws.run("export.py", "--latency-steps", "30", env={"FAULT_KILL_BEFORE_RENAME": "README.md"}, check=False)
    assert killed.returncode == -9
    out = ws.artifacts / "export"
    assert not (out / "hf").exists() and not (out / "onnx").exists() and not (out / "export.json").exists()
    ws.run("export.py", "--latency-steps", "30")
    assert (out / "export.json").exists() and not list(out.glob(".staging-*")), "the next export cleans up"


def test_both_architectures_export_with_passing_proofs(encoded):
    """Learned positions map onto GPT-2, rotary positions onto GPT-NeoX, with each activation; all prove equal.

    (The other tests export the default, rotary positions with squared ReLU.)
    """
    for positions, activation, architecture in (("learned", "gelu", "GPT2LMHeadModel"), ("learned", "relu2", "GPT2LMHeadModel"),
                                                ("rotary", "relu", "GPTNeoXForCausalLM")):
        encoded.run("train.py", "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--max-seq-length", "32",
                    "--batch-size", "16", "--epochs", "1", "--dtype", "float32", "--threads", "1",
                    "--positions", positions, "--activation", activation, "--rotary-fraction", "0.5")
        encoded.run("export.py", "--latency-steps", "20", "--onnx-greedy-tokens", "40")
        out = encoded.artifacts / "export"
        assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == [architecture]
        assert json.loads((out / "export.json").read_text())["proofs"]["passed"]


# ----------------------------------------------------------------------------- real faults


def copy_of(ws: Workspace, root) -> Workspace:
    shutil.copytree(ws.data, root / "data", symlinks=True)
    shutil.copytree(ws.artifacts, root / "artifacts", symlinks=True)
    return Workspace(root)


def test_a_damaged_export_is_refused_by_generate_and_rebuilt(exported, tmp_path):
    ws = copy_of(exported, tmp_path)
    export_dir, stamp = ws.artifacts / "export", ws.artifacts / "export" / "files-checked.txt"
    ws.run("export.py", "--check-files", stamp)
    assert stamp.stat().st_mtime < (export_dir / "export.json").stat().st_mtime, "an intact export is not rebuilt"
    onnx = export_dir / "onnx" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # truncated, as by a full disk or a bad copy
    refused = ws.run("generate.py", "--runtime", "onnx", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "is damaged: model.onnx" in refused.stderr and "make export" in refused.stderr
    checked = ws.run("export.py", "--check-files", stamp)
    assert "damaged, rebuilding: onnx/model.onnx" in checked.stdout
    assert stamp.stat().st_mtime >= (export_dir / "export.json").stat().st_mtime, "make now rebuilds export.json"


def test_onnx_generation_names_an_export_of_another_model(exported, tmp_path):
    ws = copy_of(exported, tmp_path)
    ckpt = ws.artifacts / "checkpoints"
    other = ws.run("generate.py", "--runtime", "onnx", "--checkpoint", "final_model.pt", check=False)
    assert other.returncode == 1 and "the ONNX export is of" in other.stderr
    assert "make export CHECKPOINT=final_model.pt" in other.stderr
    shutil.copy(ckpt / "epoch_001.pt", ckpt / "best_model.pt")  # best_model.pt changed since the export
    stale = ws.run("generate.py", "--runtime", "onnx", "--max-tokens", "5")
    assert "made from an earlier version of" in stale.stderr and "make export" in stale.stderr


def test_two_exports_at_once_and_a_double_ctrl_c_leave_one_clean_export(exported, tmp_path):
    ws = copy_of(exported, tmp_path)
    export_dir = ws.artifacts / "export"
    before = json.loads((export_dir / "export.json").read_text())["files"]
    cmd = [PYTHON, str(REPO / "stages" / "export.py"), "--data-dir", str(ws.data), "--artifacts-dir", str(ws.artifacts),
           "--latency-steps", "60"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 120
    while not list(export_dir.glob(".staging-*/onnx")) and time.time() < deadline:
        time.sleep(0.05)
    second = ws.run("export.py", check=False)
    assert second.returncode == 1 and "another export" in second.stderr and str(first.pid) in second.stderr
    os.killpg(first.pid, signal.SIGINT)
    while first.poll() is None:  # impatient: Ctrl+C held down, so later ones land while it cleans up
        time.sleep(0.002)
        try:
            os.killpg(first.pid, signal.SIGINT)
        except ProcessLookupError:
            break
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err and "download" not in err, err
    assert not list(export_dir.glob(".staging-*")), "no staging folder is left behind"
    assert not (export_dir / ".export.lock").exists()
    assert json.loads((export_dir / "export.json").read_text())["files"] == before, "the previous export is intact"


def test_a_full_disk_before_or_during_an_export_keeps_the_previous_one(exported, tmp_path):
    """The artifacts folder on a small tmpfs: too little room is refused before writing; a disk that
    fills while the files are written (safetensors, ONNX) is said as such, and the staging folder goes."""
    ws = Workspace(tmp_path)
    with small_disk(tmp_path / "artifacts", "48m"):
        shutil.copytree(exported.artifacts, ws.artifacts, symlinks=True, dirs_exist_ok=True)
        shutil.copytree(exported.data, ws.data, symlinks=True)
        export_dir = ws.artifacts / "export"
        before = json.loads((export_dir / "export.json").read_text())["files"]

        filler = fill(ws.artifacts, leave_bytes=200_000)
        refused = ws.run("export.py", check=False)
        assert_clean_failure(refused, "needs about", "the export was not started", "#disk-full")
        filler.unlink()

        def fill_when_writing_starts():
            deadline = time.time() + 120
            while not list(export_dir.glob(".staging-*")) and time.time() < deadline:
                time.sleep(0.0005)
            try:
                fill(ws.artifacts, leave_bytes=0)
            except OSError:  # the export's own writes took the last bytes first: full all the same
                pass

        filling = threading.Thread(target=fill_when_writing_starts)
        filling.start()
        during = ws.run("export.py", "--latency-steps", "30", check=False)
        filling.join()
        assert_clean_failure(during, "#disk-full")  # (which file met the full disk depends on the timing)
        assert not list(export_dir.glob(".staging-*")), "no staging folder is left behind"
        assert json.loads((export_dir / "export.json").read_text())["files"] == before, "the previous export is intact"
