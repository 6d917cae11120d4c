"""Training: loss falls, schedule, clipping, checkpoints, exact resume, signals, refusals, overrides, prompt."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pty
import re
import select
import sys
import time

import pytest
import torch

from conftest import PYTHON, REPO, TINY_TRAIN, assert_clean_failure

sys.path.insert(0, str(REPO / "stages"))
sys.path.insert(0, str(REPO))


def epochs_of(ws):
    return ws.history()["epochs"]


def losses(ws):
    return [(e["train_loss"], e["train_loss_eval"], e["val_loss"]) for e in epochs_of(ws)]


def test_tiny_training_learns_and_writes_every_artifact(encoded):
    out = encoded.run("train.py", *TINY_TRAIN, "--epochs", "3")
    ckpt = encoded.artifacts / "checkpoints"
    for name in ("best_model.pt", "final_model.pt", "last.pt", "epoch_001.pt", "epoch_003.pt", "history.json",
                 "metrics.jsonl", "config.json", "train_done.json"):
        assert (ckpt / name).exists(), name
    history = epochs_of(encoded)
    assert len(history) == 3
    assert history[0]["val_loss"] < math.log(320)
    assert history[2]["train_loss"] < history[1]["train_loss"] < history[0]["train_loss"]
    for entry in history:
        for key in ("train_loss", "train_loss_eval", "val_loss", "val_bpb", "lr", "tokens_per_s", "seconds", "samples"):
            assert entry[key] is not None, key
        assert set(entry["samples"]) == {"en", "es"}
    assert len((ckpt / "metrics.jsonl").read_text().splitlines()) == 3
    assert "parameters" in out.stdout and "epoch  3/3" in out.stdout and "sample [es]" in out.stdout
    # your own corpus: the progress samples continue the opening words of validation sentences, not the Bible's
    val_lines = (encoded.data / "prepared" / "val.txt").read_text(encoding="utf-8").splitlines()
    for lang, opening in (("en", "And "), ("es", "Y ")):
        prompt = " ".join(history[-1]["samples"][lang].split()[:4])
        assert prompt.startswith(opening) and any(line.startswith(prompt) for line in val_lines), prompt
    # dropout 'auto' on a few thousand tokens is the cap, and the number used is what the run records
    assert "dropout 0.4 (auto:" in out.stdout
    assert json.loads((ckpt / "config.json").read_text())["dropout"] == 0.4


def test_auto_dropout_is_0_2_on_the_default_corpus_and_grows_as_the_text_shrinks():
    from lib.training.regularisation import resolve_dropout
    assert resolve_dropout("auto", 667_136)[0] == 0.2    # the default corpus's training split
    assert resolve_dropout("auto", 5_000_000)[0] == 0.2  # more text never lowers it
    assert resolve_dropout("auto", 433_333)[0] == 0.3    # 2/3 of the default corpus
    assert resolve_dropout("auto", 264_787)[0] == 0.4    # the Debian Reference manual: capped
    assert resolve_dropout("auto", 1_000)[0] == 0.4      # capped
    assert resolve_dropout(0.05, 1_000) == (0.05, "as configured; 1,000 training tokens")


def test_checkpoint_is_plain_and_loads_with_weights_only(encoded):
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "1")
    ckpt = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "position", "rng", "best_val_loss", "config",
                "tokenizer_sha256", "model_config", "history"):
        assert key in ckpt, key
    assert set(ckpt["rng"]) == {"python", "numpy", "torch"}
    assert ckpt["epoch"] == 1 and ckpt["position"] == 0 and ckpt["config"]["learning_rate"] == 0.003
    assert ckpt["world_size"] == 1 and len(ckpt["rng_by_rank"]) == 1  # one training process
    json.dumps({k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "rng_by_rank")})  # JSON-able metadata
    best = torch.load(encoded.artifacts / "checkpoints" / "best_model.pt", weights_only=True)
    assert best["kind"] == "best" and "optimizer" not in best
    assert not list((encoded.artifacts / "checkpoints").glob(".*tmp*")), "temp files left behind"


def test_lr_schedule_warmup_then_cosine_to_floor():
    from lib.training.optim import lr_at
    cfg = {"learning_rate": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 10}
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 50 / 99)))


def test_wsd_schedule_holds_the_peak_then_decays_linearly_to_the_floor():
    from lib.training.optim import lr_at
    cfg = {"learning_rate": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 10, "lr_schedule": "wsd", "decay_fraction": 0.2}
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[89] == pytest.approx(1e-3)  # stable until the last 20 of 100 steps
    assert lrs[90] < 1e-3 and all(a > b for a, b in zip(lrs[90:], lrs[91:]))
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[99] == pytest.approx(1e-3 - 9e-4 * 10 / 20)


def test_muon_moves_the_block_matrices_and_resumes_from_its_state_dict():
    from lib.training.optim import make_optimizer, set_learning_rate, train_step
    from model import ModelConfig, TinyTransformer
    cfg = {"learning_rate": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "optimizer": "muon",
           "muon_lr_scale": 3.0, "muon_momentum": 0.95, "muon_weight_decay": 0.1}
    torch.manual_seed(0)
    model = TinyTransformer(ModelConfig(vocab_size=300, d_model=32, n_heads=2, max_seq_length=16, positions="rotary"))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    muon_params = {id(p) for p in optimizer.muon.param_groups[0]["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in muon_params} == {
        f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    set_learning_rate(optimizer, 1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3, 1e-3, 1e-3])
    x, y = torch.randint(0, 300, (2, 3, 16)), torch.randint(0, 300, (2, 3, 16))
    def step(m, o, i):
        train_step(m, o, x[i], y[i], contextlib.nullcontext, m.loss, grad_clip=1.0)

    step(model, optimizer, 0)
    # a copy restored from a saved state takes the same next step as the original
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    saved = torch.load(saved, weights_only=True)
    assert set(saved["optimizer"]) == {"muon", "adamw"}
    twin = TinyTransformer(model.cfg)
    twin.load_state_dict(saved["model"])
    twin_optimizer = make_optimizer(twin, cfg, torch.device("cpu"))
    twin_optimizer.load_state_dict(saved["optimizer"])
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        step(m, o, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_input_noise_swaps_about_the_rate_for_tokens_of_the_text_and_leaves_the_batch_alone():
    import numpy as np
    from lib.data.batches import get_batch
    from lib.training.regularisation import noise_inputs
    text = np.arange(1000, 3000, dtype=np.uint16)
    x, y = get_batch(text, np.array([0, 500, 1000]), 300, "cpu")
    before_x, before_y = x.clone(), y.clone()
    torch.manual_seed(0)
    noisy = noise_inputs(x, text, 0.2)
    changed = noisy != x
    assert 0.15 < changed.float().mean().item() < 0.25
    assert ((noisy[changed] >= 1000) & (noisy[changed] < 3000)).all()  # drawn from the text itself
    assert torch.equal(x, before_x) and torch.equal(y, before_y)  # targets (a view of the same rows) stay clean
    assert noise_inputs(x, text, 0.0) is x


def test_gradient_clipping_caps_every_step_and_the_log_keeps_the_norm_before_it(encoded):
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--optimizer", "adamw", "--grad-clip", "0.01")
    entry = epochs_of(encoded)[0]
    assert min(entry["step_grad_norms"]) > 0.05, "the logged norms are those before clipping, far above the limit"
    # AdamW's first moment is a running average of the gradients it was given (m = 0.9 m + 0.1 g), so its
    # norm is at most the largest of theirs: 0.01 when every step was clipped, near the logged norms if not.
    state = torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["state"]
    first_moment = torch.cat([s["exp_avg"].flatten() for s in state.values()]).norm().item()
    assert first_moment <= 0.01 * (1 + 1e-4), first_moment


def test_resume_after_sigint_equals_uninterrupted_run(tmp_path, corpus_file):
    from conftest import Workspace
    straight = Workspace(tmp_path / "a").prepare_data(corpus_file)
    straight.run("train.py", *TINY_TRAIN, "--epochs", "3", "--dropout", "0.1")
    interrupted = Workspace(tmp_path / "b").prepare_data(corpus_file)
    # The fault hook sends SIGINT to the process itself at step 30 (mid-epoch 2): deterministic, no sleeps.
    first = interrupted.run("train.py", *TINY_TRAIN, "--epochs", "3", "--dropout", "0.1",
                            env={"FAULT_AT_STEP": "30:sigint"}, check=False)
    assert first.returncode == 130, first.stderr
    assert "resume with:" in first.stderr
    assert not (interrupted.artifacts / "checkpoints" / "train_done.json").exists()
    last = torch.load(interrupted.artifacts / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 31 and last["position"] > 0  # the step in flight finishes, then it stops
    second = interrupted.run("train.py", *TINY_TRAIN, "--epochs", "3", "--dropout", "0.1")
    assert "resuming" in second.stdout
    assert losses(interrupted) == losses(straight)


@pytest.mark.parametrize("name, code", [("sigterm", 143), ("sighup", 129)])
def test_sigterm_and_sighup_save_name_the_resume_and_exit_128_plus_the_signal(encoded, name, code):
    """SIGHUP with the terminal still there (kill -HUP): the messages reach it; test_train_faults.py closes it."""
    result = encoded.run("train.py", *TINY_TRAIN, env={"FAULT_AT_STEP": f"5:{name}"}, check=False)
    assert result.returncode == code, result.stderr
    assert f"{name.upper()}: stopping after this step and saving" in result.stderr
    assert "resume with: python stages/train.py" in result.stderr and "Traceback" not in result.stderr
    assert torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


def test_same_seed_gives_same_losses(tmp_path, corpus_file):
    from conftest import Workspace
    a = Workspace(tmp_path / "a").prepare_data(corpus_file)
    b = Workspace(tmp_path / "b").prepare_data(corpus_file)
    for ws in (a, b):
        ws.run("train.py", *TINY_TRAIN, "--epochs", "1")
    assert losses(a) == losses(b)


def test_new_settings_start_a_new_run_and_keep_the_old_models(encoded):
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "1")
    out = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--learning-rate", "0.001")
    assert "moved aside" in out.stdout and "learning_rate 0.003 -> 0.001" in out.stdout
    archived = list((encoded.artifacts / "checkpoints-archive").glob("*/final_model.pt"))
    assert len(archived) == 1
    assert json.loads((encoded.artifacts / "checkpoints" / "config.json").read_text())["learning_rate"] == 0.001


def test_finished_run_is_not_retrained_and_restart_moves_it_aside(encoded):
    encoded.run("train.py", *TINY_TRAIN, "--epochs", "1")
    again = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1")
    assert "already finished" in again.stdout
    restart = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--restart")
    assert "moved aside" in restart.stdout
    assert len(list((encoded.artifacts / "checkpoints-archive").iterdir())) == 1


def test_resume_yes_without_a_run_fails_clearly(encoded):
    result = encoded.run("train.py", *TINY_TRAIN, "--resume", "yes", check=False)
    assert result.returncode == 1 and "nothing to resume" in result.stderr


def test_mismatched_tokenizer_is_refused(encoded):
    encoded.run("train_tokenizer.py", "--vocab-size", "310")  # token files are now stale
    result = encoded.run("train.py", *TINY_TRAIN, check=False)
    assert result.returncode == 1
    assert "encoded with another tokenizer" in result.stderr and "make encode" in result.stderr


def test_bad_training_parameters_are_refused_before_work(encoded):
    result = encoded.run("train.py", "--learning-rate", "-1", "--batch-size", "0", "--epochs", "0",
                         "--max-seq-length", "100000", check=False)
    assert result.returncode == 2
    for name in ("learning_rate", "batch_size", "epochs", "max_seq_length"):
        assert name in result.stderr
    assert not (encoded.artifacts / "checkpoints").exists()


def test_overrides_reach_the_log_and_the_saved_config(encoded):
    out = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--batch-size", "8")
    assert "batch_size=8*" in out.stdout and "epochs=1*" in out.stdout
    saved = json.loads((encoded.artifacts / "checkpoints" / "config.json").read_text())
    assert saved["batch_size"] == 8 and "batch_size" in saved["overridden"]


def test_memory_estimate_refuses_a_batch_that_cannot_fit_and_names_one_that_does(encoded):
    result = encoded.run("train.py", *TINY_TRAIN, "--batch-size", "4096", "--max-memory-gb", "0.25", check=False)
    assert result.returncode == 1
    assert "Out of memory" in result.stderr and "but the limit MAX_MEMORY_GB=0.25 is 0.25 GB" in result.stderr  # one unit
    fits = int(re.search(r"the largest batch that fits is about BATCH_SIZE=(\d+)", result.stderr)[1])
    assert 16 <= fits <= 1024, "far over the budget, the hint is many halvings down, not one"
    assert f"type: python stages/train.py --batch-size {fits} " in result.stderr and "never down)" in result.stderr
    trained = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--batch-size", fits, "--max-memory-gb", "0.25")
    assert "finished" in trained.stdout, "the batch the message names does fit"
    nothing = encoded.run("train.py", *TINY_TRAIN, "--max-memory-gb", "0.1", check=False)
    assert_clean_failure(nothing, "even BATCH_SIZE=1 does not fit", "MAX_MEMORY_GB")


def test_out_of_memory_during_a_step_saves_and_explains(encoded):
    result = encoded.run("train.py", *TINY_TRAIN, env={"FAULT_AT_STEP": "3:oom"}, check=False)
    assert result.returncode == 1
    assert "Out of memory at BATCH_SIZE=16, SEQ_LEN=32" in result.stderr
    # run as a script, the command to type is the script's, with half the batch and every other flag it was given
    # (the run's LR among them: under Muon a smaller batch keeps it)
    assert re.search(r"type: python stages/train\.py --batch-size 8 .*--learning-rate 0\.003 .*--warmup-steps 5",
                     result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert torch.load(encoded.artifacts / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def test_interactive_prompt_offers_resume_or_restart(encoded):
    encoded.run("train.py", *TINY_TRAIN, env={"FAULT_AT_STEP": "5:sigint"}, check=False)
    cmd = [PYTHON, str(REPO / "stages" / "train.py"), "--data-dir", str(encoded.data), "--artifacts-dir",
           str(encoded.artifacts), *TINY_TRAIN]
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execv(PYTHON, cmd)
    output = b""
    deadline = time.time() + 120
    while b"[R]esume / [s]tart over" not in output and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            output += os.read(fd, 4096)
    assert b"Resume from epoch 1, batch 6?" in output
    os.write(fd, b"s\n")
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"you chose to start over" in output
    assert len(list((encoded.artifacts / "checkpoints-archive").iterdir())) == 1


def test_compile_failure_falls_back_to_eager(encoded, tmp_path):
    # No C++ compiler: torch.compile's first call fails; training must go on in eager mode.
    env = {"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = encoded.run("train.py", *TINY_TRAIN, "--epochs", "1", "--compile", env=env)
    assert "torch.compile failed" in out.stdout and "continuing in eager mode" in out.stdout
    assert (encoded.artifacts / "checkpoints" / "train_done.json").exists()


def test_bf16_fast_path_and_plain_fp32_path_both_train(tmp_path, corpus_file):
    from conftest import Workspace
    results = {}
    for name, flags in (("plain", ["--dtype", "float32", "--loss-chunk-tokens", "0"]),
                        ("fast", ["--dtype", "bfloat16", "--loss-chunk-tokens", "128"])):
        ws = Workspace(tmp_path / name).prepare_data(corpus_file)
        out = ws.run("train.py", *[a for a in TINY_TRAIN if a not in ("--dtype", "float32")], "--epochs", "2", *flags)
        assert ("bf16 autocast" in out.stdout) == (name == "fast")
        results[name] = epochs_of(ws)[-1]["val_loss"]
    # same seed and data: bf16 matmuls change the numbers a little, not the learning
    assert abs(results["fast"] - results["plain"]) / results["plain"] < 0.05


def test_progress_samples_use_the_bible_prompts_for_the_default_corpus(tmp_path):
    from lib.training.samples import SAMPLE_PROMPTS, sample_prompts
    (tmp_path / "raw").mkdir()
    (tmp_path / "prepared").mkdir()
    (tmp_path / "raw" / "corpus.json").write_text(json.dumps({"source": {"kind": "wheel"}}))
    paths = {"raw": tmp_path / "raw", "prepared": tmp_path / "prepared"}
    assert sample_prompts(paths) == SAMPLE_PROMPTS  # no val.txt (a folder of token files only): still trains
    (tmp_path / "prepared" / "val.txt").write_text("The shell is the program that reads commands.\n", encoding="utf-8")
    assert sample_prompts(paths) == SAMPLE_PROMPTS
    (tmp_path / "raw" / "corpus.json").write_text(json.dumps({"source": {"kind": "path"}}))
    # an English-only corpus: its own English prompt, the Bible's Spanish one
    assert sample_prompts(paths) == {"en": "The shell is the", "es": SAMPLE_PROMPTS["es"]}
