"""The CUDA path (DEVICE=cuda): skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TRAIN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXACT = ["--dropout", "0", "--input-noise", "0", "--dtype", "float32"]


def test_cuda_trains_like_the_cpu_in_float32(encoded, tmp_path):
    encoded.run("train.py", *TINY_TRAIN, *EXACT, "--device", "cuda")
    on_gpu = encoded.history()["epochs"]
    encoded.run("train.py", *TINY_TRAIN, *EXACT, "--device", "cpu", "--restart")
    on_cpu = encoded.history()["epochs"]
    for gpu, cpu in zip(on_gpu, on_cpu):
        for key in ("train_loss", "train_loss_eval", "val_loss"):
            assert gpu[key] == pytest.approx(cpu[key], rel=1e-3), (gpu["epoch"], key)


def test_cuda_bf16_run_resumes_after_ctrl_c_and_its_model_loads_on_the_cpu(encoded):
    out = encoded.run("train.py", *TINY_TRAIN, "--device", "cuda", "--restart")
    assert "device cuda:0, bf16 autocast" in out.stdout
    straight = encoded.history()["epochs"]
    steps = straight[0]["step"]
    stopped = encoded.run("train.py", *TINY_TRAIN, "--device", "cuda", "--restart", check=False,
                          env={"FAULT_AT_STEP": f"{steps + 2}:sigint"})
    assert stopped.returncode == 130
    encoded.run("train.py", *TINY_TRAIN, "--device", "cuda")
    for resumed, want in zip(encoded.history()["epochs"], straight):
        # the GPU's atomics make the last digits vary from run to run; the random streams must match
        assert resumed["val_loss"] == pytest.approx(want["val_loss"], rel=2e-3)
    out = encoded.run("generate.py", "--prompt", "And the king", "--max-tokens", "5", check=False)  # on the CPU
    assert out.returncode == 0, out.stderr
