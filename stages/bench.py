"""Speed benchmark (prints figures; not a test): `make bench` -> artifacts/bench/bench.json.

    make bench
    python stages/bench.py [--steps 30] [--guard-epochs 3] [--skip-pipeline]
    python stages/bench.py --processes 2     # instead: one process against torchrun processes
    python stages/bench.py --compare "optimizer=muon max_seq_length=256 batch_size=32"   # instead: two settings
    python stages/bench.py --profile         # instead: where a step's time goes, by operator and call site
    python stages/bench.py --nanogpt         # instead: the default step against nanoGPT's, alternating

In one run, on this machine:
1. matmul peak: GFLOP/s of large fp32 and bf16 matrix products (all threads);
2. training-step tokens/s of the plain reference model in eager fp32 (model/tiny_transformer.py as it is)
   and of the default fast path, same model and same batches, and their ratio;
   model FLOPs utilisation (MFU) of each against the matching measured peak;
3. quality guard: a short training (--guard-epochs) with each path from the same
   seed; the fast path's validation loss must be within 1% of the fp32 path's;
4. wall time and peak RSS of every stage of `make all`, run from a scratch copy of
   the data (the downloaded corpus and wheel are reused, the torch.compile cache is
   empty), with the default settings.
Needs the encoded data and tokenizer of a previous `make all` (or `make encode`).

--compare "KEY=VALUE ..." measures instead the training step of the defaults and of
the defaults with those train settings changed, side by side: --rounds rounds, each
timing both in turn (in alternating order), so that a slower machine shows in both;
it prints every round and the median ratio (artifacts/bench/compare.json).

--profile runs instead a few default training steps, in bf16 (where the CPU has it) and in
fp32, with every PyTorch operator call timed and named by the line of this repository that
issued it (lib/training/step_profile.py; in the backward pass, the forward line that built
the autograd node), by phase: forward (the chunked output layer computes its gradients
there), backward, optimizer (clipping included); with the unprofiled step time beside them
(artifacts/bench/profile.json; the speed page's tables).

--nanogpt times instead the default step against nanoGPT's step on a CPU, rebuilt
from this repository's model in the configuration nanoGPT's train.py runs there:
GPT-2 layout (learned positions, GELU), float32, no torch.compile, dropout 0, the
whole logits into F.cross_entropy, PyTorch's fused attention, AdamW (foreach; fused
is CUDA-only in nanoGPT), gradient clipping at 1.0; same batch, same shape, same
tokens, alternating rounds (artifacts/bench/nanogpt.json).

--processes N measures instead the default training step in one process with every
core against N torchrun processes with cores / N threads each (DDP, gloo), on the same
global batch, and the share of the N-process step spent exchanging gradients (steps
with DDP's gradient all-reduce against steps without it, alternating).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lib.data.batches import get_batch, window_starts
from lib.runtime.config import DEFAULT_CONFIG, REPO_ROOT, load_yaml, stage_paths
from lib.runtime.files import write_json_atomic
from lib.training.hardware import keep_freed_memory, resolve_dtype
from lib.runtime.key_values import parse_key_values, typed_like
from lib.training.optim import make_optimizer, train_step
from lib.training.regularisation import resolve_dropout
from model import ModelConfig, TinyTransformer, model_config
from model.fast_cpu import use_fast_cpu_path


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per trained token (3x the forward's matmul FLOPs)."""
    d, L, T, V = cfg.d_model, cfg.n_layers, cfg.max_seq_length, cfg.vocab_size
    per_layer = 2 * (4 * d * d + 2 * cfg.mlp_ratio * d * d) + 2 * 2 * T * d / 2  # projections + causal attention
    return 3 * (L * per_layer + 2 * d * V)


def training_model(train_cfg: dict, vocab: int, tokens: np.ndarray, dtype: torch.dtype, fast: bool = True):
    """train.py's model (its dropout for these tokens), optimizer and autocast, on the CPU, from seed 0.

    fast: with train.py's CPU fast path (its loss_chunk_tokens); else the plain reference model.
    """
    torch.manual_seed(0)
    mcfg = model_config({**train_cfg, "dropout": resolve_dropout(train_cfg["dropout"], tokens.size)[0]}, vocab)
    model = TinyTransformer(mcfg).train()
    if fast:
        use_fast_cpu_path(model, train_cfg["loss_chunk_tokens"])
    optimizer = make_optimizer(model, train_cfg, torch.device("cpu"))
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    return model, optimizer, autocast


def fixed_batches(tokens: np.ndarray, train_cfg: dict, count: int, seed: int = 0) -> list:
    """count batches of training windows, drawn from a seeded generator: every path times the same ones."""
    T, B = train_cfg["max_seq_length"], train_cfg["batch_size"]
    starts, rng = window_starts(tokens.size, T), np.random.default_rng(seed)
    return [get_batch(tokens, rng.choice(starts, B, replace=False), T, "cpu") for _ in range(count)]


def step_throughput(train_cfg: dict, vocab: int, tokens: np.ndarray, dtype: torch.dtype, steps: int,
                    fast: bool = True) -> float:
    """Tokens/s of train.py's own training step (same model, dropout and optimizer) on fixed batches."""
    T, B = train_cfg["max_seq_length"], train_cfg["batch_size"]
    model, optimizer, autocast = training_model(train_cfg, vocab, tokens, dtype, fast)
    loss_fn = model.loss
    batches = fixed_batches(tokens, train_cfg, steps + 3)
    for x, y in batches[:3]:
        train_step(model, optimizer, x, y, autocast, loss_fn, train_cfg["grad_clip"])
    start = time.perf_counter()
    for x, y in batches[3:]:
        loss, _ = train_step(model, optimizer, x, y, autocast, loss_fn, train_cfg["grad_clip"])
        loss.item()  # as the training loop does: one sync per step
    return steps * B * T / (time.perf_counter() - start), model.cfg


# Runs a Python script as __main__ and, at exit, writes its own peak RSS (VmHWM) to the
# file named by BENCH_PEAK_RSS_FILE. The rusage of a child is no use here: a process
# forked from this one starts with this process's (large) high-water mark.
PEAK_RSS_WRAPPER = """
import atexit, os, runpy, sys
def _report():
    with open('/proc/self/status') as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))
    with open(os.environ['BENCH_PEAK_RSS_FILE'], 'w') as out:
        out.write(str(kb))
atexit.register(_report)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py` would have it
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MB) and exit code of one Python script run as a child process."""
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        env = {**env, "BENCH_PEAK_RSS_FILE": rss_file.name}
        start = time.perf_counter()
        proc = subprocess.run([cmd[0], "-c", PEAK_RSS_WRAPPER, *cmd[1:]], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        text = Path(rss_file.name).read_text().strip()
    return wall, int(text) / 1024 if text else float("nan"), proc.returncode, proc.stdout


def quality_guard(args, paths, scratch: Path) -> dict:
    results = {}
    for name, flags in (("fp32_plain", ["--dtype", "float32", "--loss-chunk-tokens", "0"]), ("fast_default", [])):
        art = scratch / f"guard_{name}"
        shutil.copytree(paths["tokenizer"], art / "tokenizer")
        cmd = [sys.executable, "stages/train.py", "--data-dir", args.data_dir, "--artifacts-dir", str(art),
               "--epochs", str(args.guard_epochs), "--sample-every", "1000", *flags]
        wall, rss, code, output = run_measured(cmd, dict(os.environ))
        if code != 0:
            raise SystemExit(f"quality-guard run {name} failed:\n{output[-2000:]}")
        history = json.loads((art / "checkpoints" / "history.json").read_text())["epochs"]
        results[name] = {"val_loss": history[-1]["val_loss"], "wall_s": wall,
                         "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history]))}
        print(f"  {name:>12}: val loss {results[name]['val_loss']:.4f} after {args.guard_epochs} epochs, "
              f"{results[name]['tokens_per_s'] / 1000:.1f}K tok/s, {wall:.0f}s", flush=True)
    rel = abs(results["fast_default"]["val_loss"] - results["fp32_plain"]["val_loss"]) / results["fp32_plain"]["val_loss"]
    results["relative_difference"] = rel
    results["within_1_percent"] = rel <= 0.01
    print(f"  val loss difference {rel * 100:.2f}% -> {'PASS' if rel <= 0.01 else 'FAIL'} (<= 1%)", flush=True)
    return results


def pipeline_stages(args, scratch: Path) -> list[dict]:
    data, art = scratch / "data", scratch / "artifacts"
    (data / "raw").mkdir(parents=True)
    src_raw = Path(args.data_dir) / "raw"
    if (src_raw / "wheels").exists():
        shutil.copytree(src_raw / "wheels", data / "raw" / "wheels")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor-cache")}  # cold compile cache
    base = ["--data-dir", str(data), "--artifacts-dir", str(art)]
    rows = []
    for script in ("check.py", "download.py", "prepare.py", "train_tokenizer.py", "encode.py", "train.py", "evaluate.py"):
        extra = ["--min-free-gb", "0.5"] if script == "check.py" else []
        wall, rss, code, output = run_measured([sys.executable, f"stages/{script}", *base, *extra], env)
        rows.append({"stage": script, "wall_s": wall, "peak_rss_mb": rss, "exit_code": code})
        print(f"  {script:<20} {wall:7.1f}s  peak RSS {rss:6.0f} MB", flush=True)
        if code != 0:
            print(output[-3000:])
            break
    total = sum(r["wall_s"] for r in rows)
    print(f"  {'total':<20} {total:7.1f}s", flush=True)
    return rows


def size_table(args) -> None:
    """Tokens/s of the default fast path and peak RSS of a process that trains, per batch x sequence size."""
    train_cfg = load_yaml(args.config)["train"]
    paths = stage_paths(vars(args))
    if args.one_size:  # child process: measure one setting, print JSON
        torch.set_num_threads(os.cpu_count() or 1)
        keep_freed_memory()
        batch, seq = map(int, args.one_size.split("x"))
        cfg = {**train_cfg, "batch_size": batch, "max_seq_length": seq}
        vocab = json.loads((paths["tokenizer"] / "tokenizer.json").read_text())["vocab_size"]
        tokens = np.load(paths["encoded"] / "train.npy", mmap_mode="r")
        tps, _ = step_throughput(cfg, vocab, tokens, resolve_dtype({"dtype": cfg["dtype"], "device": "cpu"}), args.steps)
        print(json.dumps({"tokens_per_s": tps}))
        return
    rows = []
    print(f"{'batch x seq':>12} {'tokens/s':>10} {'peak RSS':>10}")
    for size in args.sizes.split():
        cmd = [sys.executable, "stages/bench.py", "--one-size", size, "--steps", str(args.steps),
               "--data-dir", args.data_dir, "--artifacts-dir", args.artifacts_dir, "--config", str(args.config)]
        wall, rss, code, output = run_measured(cmd, dict(os.environ))
        if code != 0:
            raise SystemExit(output[-2000:])
        tps = json.loads(output.strip().splitlines()[-1])["tokens_per_s"]
        rows.append({"size": size, "tokens_per_s": tps, "peak_rss_mb": rss})
        print(f"{size:>12} {tps / 1000:9.1f}K {rss:8.0f} MB", flush=True)
    write_json_atomic(paths["bench"] / "sizes.json", rows)


def load_inputs(args) -> tuple[dict, dict, int, np.ndarray]:
    """File locations, the YAML's training settings, the vocabulary size and the training tokens."""
    paths = stage_paths(vars(args))
    train_cfg = load_yaml(args.config)["train"]
    vocab = json.loads((paths["tokenizer"] / "tokenizer.json").read_text())["vocab_size"]
    return paths, train_cfg, vocab, np.load(paths["encoded"] / "train.npy", mmap_mode="r")


def compare_settings(args) -> None:
    """--compare: tokens/s of the default training step and of a changed one, alternating, on this machine."""
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()
    paths, train_cfg, vocab, tokens = load_inputs(args)
    changes = {}
    for key, values in parse_key_values(args.compare, "--compare"):
        if key not in train_cfg or len(values) != 1:
            raise SystemExit(f"error: --compare {key}: expected KEY=VALUE with one value and a key of the train section")
        changes[key] = typed_like(train_cfg[key], values[0])
    settings = {"defaults": train_cfg, args.compare: {**train_cfg, **changes}}
    dtype = resolve_dtype({"dtype": train_cfg["dtype"], "device": "cpu"})
    print(f"training step tokens/s, {args.steps} steps each, {args.rounds} rounds, {str(dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads:", flush=True)
    rounds = []
    for r in range(args.rounds):
        order = list(settings) if r % 2 == 0 else list(reversed(settings))
        speeds = {name: step_throughput(settings[name], vocab, tokens, dtype, args.steps)[0] for name in order}
        rounds.append(speeds)
        print("  " + "  ".join(f"{name}: {speed / 1000:5.1f}K" for name, speed in speeds.items())
              + f"  ratio {speeds[args.compare] / speeds['defaults']:.3f}", flush=True)
    ratio = float(np.median([r[args.compare] / r["defaults"] for r in rounds]))
    print(f"median ratio ({args.compare} / defaults): {ratio:.3f}", flush=True)
    write_json_atomic(paths["bench"] / "compare.json", {"changes": changes, "rounds": rounds, "median_ratio": ratio,
                                                         "dtype": str(dtype), "threads": torch.get_num_threads()})


# What kind of work an operator does: the matrix products run near the matmul peak; the
# rest is what bf16 must not make dearer than fp32 (the speed page's second table).
MATRIX_PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "baddbmm_"}
ATTENTION_KERNELS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
SOFTMAX = {"_softmax", "_softmax_backward_data", "_log_softmax"}
RANDOM = {"randint", "random_", "bernoulli_", "rand", "uniform_"}


def op_kind(op: str) -> str:
    if op in MATRIX_PRODUCTS:
        return "matrix products"
    if op in ATTENTION_KERNELS:
        return "fused attention"
    if op in SOFTMAX:
        return "softmax"
    if op in RANDOM:
        return "random numbers"
    return "elementwise and the rest"


# Which part of the model a call site serves, by the function named in it.
PARTS = [("output layer", ("ChunkedLinearCrossEntropy", "softmax_xent", "output_loss")),
         ("attention", ("CausalAttention", "bf16_causal_attention", "attend")),
         ("rotary positions", ("RotateQueriesKeys", "rotate_queries_keys", "swap_pairs", "apply_rotary")),
         ("dropout", ("DropoutMask", "Dropout")),
         ("MLP", ("MLP.", "SquaredReLU", "squared_relu")),
         ("attention projections", ("CausalSelfAttention.",)),
         ("norms and residual sums", ("Block.", "hidden_states", "embed")),
         ("optimizer and clipping", ("optim.py",))]


def site_part(site: str) -> str:
    return next((part for part, names in PARTS if any(name in site for name in names)), "other")


def torch_profiler_faults(model, optimizer, autocast, cfg: dict, batches: list) -> float:
    """Page faults per step under torch.profiler (record_shapes, as its per-operator tables need): the reason
    StepProfile exists. Unprofiled steps reuse freed memory; under torch.profiler they keep getting fresh pages."""
    from torch.profiler import ProfilerActivity, profile

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True):
        for x, y in batches:
            train_step(model, optimizer, x, y, autocast, model.loss, cfg["grad_clip"])[0].item()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(batches)


def profile_dtype(args, paths, cfg: dict, vocab: int, tokens, dtype: torch.dtype) -> dict:
    """One dtype's step: its unprofiled time and the StepProfile rows of args.steps more steps."""
    from lib.training.step_profile import StepProfile

    model, optimizer, autocast = training_model(cfg, vocab, tokens, dtype)
    batches = fixed_batches(tokens, cfg, 3 + 2 * args.steps)
    warm, timed, profiled = batches[:3], batches[3:3 + args.steps], batches[3 + args.steps:]
    for x, y in warm:
        train_step(model, optimizer, x, y, autocast, model.loss, cfg["grad_clip"])
    start = time.perf_counter()
    for x, y in timed:
        train_step(model, optimizer, x, y, autocast, model.loss, cfg["grad_clip"])[0].item()
    step_ms = (time.perf_counter() - start) / len(timed) * 1000
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with StepProfile(REPO_ROOT) as prof:
        for x, y in profiled:
            train_step(model, optimizer, x, y, autocast, model.loss, cfg["grad_clip"], phase=prof.phase)[0].item()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(profiled)
    unprofiled_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for x, y in timed[:5]:
        train_step(model, optimizer, x, y, autocast, model.loss, cfg["grad_clip"])[0].item()
    unprofiled_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - unprofiled_faults) / len(timed[:5])
    torch_faults = torch_profiler_faults(model, optimizer, autocast, cfg, profiled[:5])
    rows = [{**row, "kind": op_kind(row["op"]), "part": site_part(row["site"])} for row in prof.rows()]
    kinds = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0.0) + row["total"]
    return {"dtype": str(dtype).replace("torch.", ""), "step_ms": step_ms, "profiled_step_ms": sum(r["total"] for r in rows),
            "page_faults_per_step": {"unprofiled": unprofiled_faults, "this profiler": faults,
                                     "torch.profiler": torch_faults},
            "kinds_ms": kinds, "rows": rows}


def profile_step(args) -> None:
    """--profile: milliseconds per step of each operator call, by the line that issued it, bf16 and fp32."""
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()
    paths, cfg, vocab, tokens = load_inputs(args)
    default_dtype = resolve_dtype({"dtype": cfg["dtype"], "device": "cpu"})
    dtypes = [default_dtype] + ([torch.float32] if default_dtype != torch.float32 else [])
    result = {"batch_size": cfg["batch_size"], "max_seq_length": cfg["max_seq_length"],
              "threads": torch.get_num_threads(), "steps": args.steps, "flops_per_token": None, "paths": {}}
    for dtype in dtypes:
        found = profile_dtype(args, paths, cfg, vocab, tokens, dtype)
        result["paths"][found["dtype"]] = found
        print(f"training step, batch {cfg['batch_size']} x {cfg['max_seq_length']}, {found['dtype']}, "
              f"{torch.get_num_threads()} threads: {found['step_ms']:.0f} ms unprofiled, operators "
              f"{found['profiled_step_ms']:.0f} ms ({args.steps} steps); page faults per step: "
              + ", ".join(f"{k} {v:.0f}" for k, v in found["page_faults_per_step"].items()))
        print(f"  {'ms/step':>7} {'fwd':>6} {'bwd':>6} {'optim':>6} {'calls':>5}  {'operator':<24} call site")
        for r in found["rows"][:args.profile_rows]:
            print(f"  {r['total']:7.2f} {r['forward']:6.2f} {r['backward']:6.2f} {r['optimizer']:6.2f} "
                  f"{r['calls']:5.0f}  {r['op']:<24} {r['site']}")
        print("  by kind: " + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in
                                        sorted(found["kinds_ms"].items(), key=lambda kv: -kv[1])), flush=True)
    result["flops_per_token"] = flops_per_token(model_config(cfg, vocab))
    write_json_atomic(paths["bench"] / "profile.json", result)


def nanogpt_config(cfg: dict) -> dict:
    """The train settings under which this repository's training step is nanoGPT's on a CPU (see --nanogpt)."""
    return {**cfg, "positions": "learned", "activation": "gelu", "dropout": 0.0, "optimizer": "adamw",
            "qk_norm": False, "logit_softcap": 0.0, "dtype": "float32", "loss_chunk_tokens": 0, "grad_clip": 1.0}


def nanogpt_throughput(cfg: dict, vocab: int, batches: list) -> float:
    """Tokens/s of nanoGPT's CPU training step (nanogpt_config), on the given batches (the first 3: warm-up)."""
    torch.manual_seed(0)
    model = TinyTransformer(model_config(cfg, vocab)).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))  # foreach, as nanoGPT on a CPU
    for i, (x, y) in enumerate(batches):
        if i == 3:
            start = time.perf_counter()
        _, loss = model(x, y)  # the whole logits, F.cross_entropy
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return (len(batches) - 3) * batches[0][0].numel() / (time.perf_counter() - start)


def compare_nanogpt(args) -> None:
    """--nanogpt: the default step against nanoGPT's, same batch and tokens, alternating rounds."""
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()
    paths, cfg, vocab, tokens = load_inputs(args)
    dtype = resolve_dtype({"dtype": cfg["dtype"], "device": "cpu"})
    reference = nanogpt_config(cfg)
    batches = fixed_batches(tokens, cfg, args.steps + 3)
    print(f"training step tokens/s, batch {cfg['batch_size']} x {cfg['max_seq_length']}, {args.steps} steps each, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads:", flush=True)
    measure = {"nanogpt": lambda: nanogpt_throughput(reference, vocab, batches),
               "ours": lambda: step_throughput(cfg, vocab, tokens, dtype, args.steps)[0]}
    rounds = []
    for r in range(args.rounds):
        speeds = {name: measure[name]() for name in (("ours", "nanogpt") if r % 2 == 0 else ("nanogpt", "ours"))}
        rounds.append(speeds)
        print(f"  ours {speeds['ours'] / 1000:5.1f}K  nanoGPT {speeds['nanogpt'] / 1000:5.1f}K  "
              f"ratio {speeds['ours'] / speeds['nanogpt']:.2f}", flush=True)
    ratio = float(np.median([r["ours"] / r["nanogpt"] for r in rounds]))
    train_tokens = int(tokens.size)
    nanogpt_tps = float(np.median([r["nanogpt"] for r in rounds]))
    nanogpt_epochs_s = cfg["epochs"] * train_tokens / nanogpt_tps
    print(f"median ratio (ours / nanoGPT): {ratio:.2f}; nanoGPT would take {nanogpt_epochs_s:.0f} s "
          f"for {cfg['epochs']} epochs of these {train_tokens} tokens", flush=True)
    write_json_atomic(paths["bench"] / "nanogpt.json", {
        "rounds": rounds, "median_ratio": ratio, "nanogpt_tokens_per_s": nanogpt_tps,
        "ours_tokens_per_s": float(np.median([r["ours"] for r in rounds])), "dtype": str(dtype),
        "threads": torch.get_num_threads(), "batch_size": cfg["batch_size"], "max_seq_length": cfg["max_seq_length"],
        "epochs": cfg["epochs"], "train_tokens": train_tokens,
        "nanogpt_epochs_s": nanogpt_epochs_s, "nanogpt_settings": {
            k: reference[k] for k in ("positions", "activation", "dropout", "optimizer", "dtype", "loss_chunk_tokens")}})


def process_worker(args) -> None:
    """One of the torchrun processes of --processes: times DDP steps with and without the gradient exchange."""
    from torch.nn.parallel import DistributedDataParallel

    from lib.training.distributed import join
    from lib.training.optim import LossModule

    world = join("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    keep_freed_memory()
    _, cfg, vocab, tokens = load_inputs(args)
    T, B = cfg["max_seq_length"], cfg["batch_size"]
    model, optimizer, autocast = training_model(cfg, vocab, tokens, resolve_dtype({"dtype": cfg["dtype"], "device": "cpu"}))
    ddp = DistributedDataParallel(LossModule(model), broadcast_buffers=False,
                                  gradient_as_bucket_view=True)
    rng = np.random.default_rng(0)
    starts = window_starts(tokens.size, T)
    times = {"exchange": [], "local": []}
    for i in range(2 * args.steps + 4):
        mine, weight = world.share(rng.choice(starts, B, replace=False))
        x, y = get_batch(tokens, mine, T, "cpu")
        mode = "exchange" if i % 2 == 0 else "local"
        start = time.perf_counter()
        with (ddp.no_sync() if mode == "local" else contextlib.nullcontext()):
            train_step(model, optimizer, x, y, autocast, ddp, cfg["grad_clip"], weight)[0].item()
        if i >= 4:
            times[mode].append(time.perf_counter() - start)
    medians = {mode: float(np.median(t)) for mode, t in times.items()}
    if world.is_main:
        print(json.dumps({"tokens_per_s": B * T / medians["exchange"], "step_s": medians["exchange"],
                          "step_without_exchange_s": medians["local"], "threads": torch.get_num_threads()}), flush=True)
    world.close()


def process_table(args) -> None:
    """--processes N: one process (all cores) against N torchrun processes, same global batch."""
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()
    paths, cfg, vocab, tokens = load_inputs(args)
    fast_dtype = resolve_dtype({"dtype": cfg["dtype"], "device": "cpu"})
    one, _ = step_throughput(cfg, vocab, tokens, fast_dtype, args.steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
           str(REPO_ROOT / "stages" / "bench.py"), "--process-worker", "--config", str(args.config),
           "--data-dir", args.data_dir, "--artifacts-dir", args.artifacts_dir, "--steps", str(args.steps)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    many = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    share = 1 - many["step_without_exchange_s"] / many["step_s"]
    cores = os.cpu_count() or 1
    print(f"training step, global batch {cfg['batch_size']} x {cfg['max_seq_length']}, {args.steps} steps:")
    print(f"  NPROC=1 THREADS={cores}: {one / 1000:6.1f}K tok/s")
    print(f"  NPROC={args.processes} THREADS={many['threads']}: {many['tokens_per_s'] / 1000:6.1f}K tok/s "
          f"({many['tokens_per_s'] / one:.2f}x); gradient all-reduce {share * 100:.0f}% of a step "
          f"({(many['step_s'] - many['step_without_exchange_s']) * 1000:.1f} of {many['step_s'] * 1000:.1f} ms)")
    write_json_atomic(paths["bench"] / "processes.json", {"one_process_tokens_per_s": one, "processes": args.processes,
                                                          **many, "allreduce_share": share})


def reference_and_fast_steps(args, train_cfg: dict, vocab: int, tokens: np.ndarray, peaks: dict) -> dict:
    """Tokens/s and MFU of the reference model's eager fp32 step and of train.py's fast-path step."""
    fast_dtype = resolve_dtype({"dtype": train_cfg["dtype"], "device": "cpu"})
    print(f"training step, batch {train_cfg['batch_size']} x {train_cfg['max_seq_length']}, {args.steps} steps:", flush=True)
    plain, mcfg = step_throughput(train_cfg, vocab, tokens, torch.float32, args.steps, fast=False)
    fast, _ = step_throughput(train_cfg, vocab, tokens, fast_dtype, args.steps)
    fpt = flops_per_token(mcfg)
    mfu_plain = plain * fpt / (peaks["float32"] * 1e9)
    mfu_fast = fast * fpt / (peaks["bfloat16" if fast_dtype == torch.bfloat16 else "float32"] * 1e9)
    print(f"  reference, eager fp32: {plain / 1000:6.1f}K tok/s  MFU {mfu_plain * 100:4.1f}% of the fp32 peak", flush=True)
    print(f"  fast path ({str(fast_dtype).replace('torch.', '')}, chunk {train_cfg['loss_chunk_tokens']}): "
          f"{fast / 1000:6.1f}K tok/s  MFU {mfu_fast * 100:4.1f}% of the {'bf16' if fast_dtype == torch.bfloat16 else 'fp32'} peak",
          flush=True)
    print(f"  speed-up: {fast / plain:.2f}x  ({fpt / 1e6:.1f} MFLOP per token)", flush=True)
    return {"plain_fp32_tokens_per_s": plain, "fast_tokens_per_s": fast, "ratio": fast / plain,
            "fast_dtype": str(fast_dtype), "flops_per_token": fpt, "mfu_plain": mfu_plain,
            "mfu_fast": mfu_fast}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--artifacts-dir", default="artifacts")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per path")
    parser.add_argument("--guard-epochs", type=int, default=3)
    parser.add_argument("--skip-guard", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--sizes", type=str, default="",
                        help="instead: tokens/s and peak RSS per 'BATCHxSEQ' setting, e.g. '16x128 32x128 64x128 32x64'")
    parser.add_argument("--one-size", type=str, default="", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=0,
                        help="instead: one process against N torchrun processes (tokens/s, all-reduce share)")
    parser.add_argument("--process-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=str, default="",
                        help="instead: the default step against one with these train settings, e.g. 'optimizer=muon'")
    parser.add_argument("--rounds", type=int, default=5, help="--compare, --nanogpt: alternating rounds")
    parser.add_argument("--profile", action="store_true",
                        help="instead: each operator's time per step and the line that called it, bf16 and fp32")
    parser.add_argument("--profile-rows", type=int, default=25, help="--profile: rows printed per dtype")
    parser.add_argument("--nanogpt", action="store_true", help="instead: the default step against nanoGPT's, alternating")
    args = parser.parse_args()
    if args.compare:
        return compare_settings(args)
    if args.profile:
        return profile_step(args)
    if args.nanogpt:
        return compare_nanogpt(args)
    if args.process_worker:
        return process_worker(args)
    if args.processes:
        return process_table(args)
    if args.one_size or args.sizes:
        return size_table(args)
    return full_bench(args)


def full_bench(args) -> None:
    """The default run of bench.py: matmul peaks, the two training steps, the quality guard, the stages."""
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()
    paths, train_cfg, vocab, tokens = load_inputs(args)
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()}}

    print("matmul peak (2048 x 2048, all threads):", flush=True)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    for name, value in peaks.items():
        print(f"  {name:>9}: {value:6.0f} GFLOP/s", flush=True)
    report["matmul_peak_gflops"] = peaks

    report["train_step"] = reference_and_fast_steps(args, train_cfg, vocab, tokens, peaks)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        if not args.skip_guard:
            print(f"quality guard ({args.guard_epochs} epochs each, same seed):", flush=True)
            report["quality_guard"] = quality_guard(args, paths, scratch)
        if not args.skip_pipeline:
            print("every stage of make all (defaults, cold torch.compile cache):", flush=True)
            report["stages"] = pipeline_stages(args, scratch)
    out = paths["bench"] / "bench.json"
    write_json_atomic(out, report)
    print(f"written {out}")


if __name__ == "__main__":
    main()
