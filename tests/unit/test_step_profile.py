"""bench.py --profile's timer (lib/training/step_profile.py): every operator of a training step is timed once and
named by the line of this repository that issued it, in the backward pass by the forward line that built its
autograd node; the speed page's tables group those rows by kind of work and part of the model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from model import ModelConfig, TinyTransformer  # noqa: E402
from model.fast_cpu import use_fast_cpu_path  # noqa: E402
from lib.training.optim import make_optimizer, train_step  # noqa: E402
from lib.training.step_profile import StepProfile, qualified_name  # noqa: E402

TRAIN = {"learning_rate": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "optimizer": "muon",
         "muon_lr_scale": 2.0, "muon_momentum": 0.95, "muon_weight_decay": 0.1}


def BF16():  # train_step's autocast: the bf16 path, whose attention kernel has a backward of its own
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_run():
    """A one-block fast-path model with Muon, and a batch, from seed 0."""
    torch.manual_seed(0)
    model = TinyTransformer(ModelConfig(vocab_size=97, n_layers=1, d_model=32, n_heads=2, max_seq_length=16,
                                        dropout=0.1)).train()
    use_fast_cpu_path(model, chunk_tokens=24)
    optimizer = make_optimizer(model, TRAIN, torch.device("cpu"))
    return model, optimizer, torch.randint(97, (3, 16)), torch.randint(97, (3, 16))


def profiled_steps(steps: int = 2) -> tuple[StepProfile, list[float]]:
    model, optimizer, x, y = tiny_run()
    losses = [train_step(model, optimizer, x, y, BF16, model.loss, 1.0)[0].item()]  # the optimizer's state is made
    with StepProfile(REPO) as prof:
        for _ in range(steps):
            loss, _ = train_step(model, optimizer, x, y, BF16, model.loss, 1.0, phase=prof.phase)
            losses.append(loss.item())
    return prof, losses


def test_every_operator_is_named_by_the_line_of_ours_that_issued_it():
    prof, losses = profiled_steps()
    rows = prof.rows()
    assert all(r["total"] >= 0 for r in rows) and sum(r["total"] for r in rows) > 0
    sites = {r["site"] for r in rows}
    # forward: the model's own lines, with the function around them
    assert any(s.startswith("model/tiny_transformer.py:") and "MLP.forward" in s for s in sites), sites
    assert any(s.startswith("model/fast_cpu.py:") and "ChunkedLinearCrossEntropy.forward" in s for s in sites), sites
    # backward of a built-in operator: the forward line that built the node, and the node
    backward = [r for r in rows if r["backward"] > 0]
    assert any("MLP.forward (AddmmBackward0)" in r["site"] for r in backward), [r["site"] for r in backward]
    # backward of a custom autograd Function: its own backward's line
    assert any("CausalAttention.backward" in r["site"] for r in backward)
    # the optimizer phase: Muon's step, called from the optimizer wrapper
    assert any(r["optimizer"] > 0 and "MuonAdamW.step" in r["site"] for r in rows)
    assert not any(s == "(no frame of ours)" for s in sites)


def test_counts_are_per_step_and_profiling_changes_nothing_it_measures():
    one, _ = profiled_steps(1)
    two, losses = profiled_steps(2)
    calls = lambda prof: {(r["site"], r["op"]): r["calls"] for r in prof.rows()}
    assert calls(one) == calls(two), "rows are per step: two steps count each call once"
    # the same steps unprofiled give the same losses: the timer only watches
    model, optimizer, x, y = tiny_run()
    plain = [train_step(model, optimizer, x, y, BF16, model.loss, 1.0)[0].item() for _ in range(3)]
    assert plain == losses


def test_qualified_names_come_from_the_source():
    path = str(REPO / "model" / "tiny_transformer.py")
    text = (REPO / "model" / "tiny_transformer.py").read_text().splitlines()
    line = next(i for i, s in enumerate(text, 1) if "return self.dropout(self.c_proj(self.activation" in s)
    assert qualified_name(path, line) == "MLP.forward"
