"""Stage 5: train the TinyTransformer -> artifacts/checkpoints/ (best_model.pt, final_model.pt, history.json, ...).

    make train                                   # defaults from config/defaults.yaml
    make train LR=0.001 EPOCHS=10                # retrains; the tokenizer is not touched
    python stages/train.py --learning-rate 0.001 --epochs 10 --batch-size 32 --max-seq-length 128
    python stages/train.py --restart             # start over; the old run is moved aside, not deleted
    make train NPROC=2                           # two processes (torchrun, DistributedDataParallel)

An epoch is one pass over every training token (data/encoded/train.npy) in windows of
max_seq_length, shuffled per epoch by a seeded generator (lib/data/batches.py); AdamW or Muon,
warmup then cosine or warmup-stable-decay (lib/training/optim.py), gradient clipping. After
every epoch: the loss on the whole validation split and on a training slice of the same size
(their difference is the overfitting gap), one log line, history.json, metrics.jsonl, last.pt
(epoch_NNN.pt every --checkpoint-every epochs, best_model.pt); at the end final_model.pt and,
last, train_done.json, which make waits for.

An unfinished run with identical data, tokenizer, code and settings resumes exactly
(lib/training/runs.py). Ctrl+C, SIGTERM or SIGHUP (a closed terminal) stops after the step,
saves last.pt and exits 130 / 143 / 129. --nproc/--nnodes above 1: the script runs torchrun,
which starts it once per process (lib/training/launch.py, distributed.py).

main() at the bottom is the outline: setup() builds what is fixed for the run (a Run; what
changes is a Progress: lib/training/state.py), train_epoch() is the training loop (batch,
forward, backward, clip, step, log), measure_epoch() and end_of_epoch() evaluate, log, save.
What guards the loop (stop requests, out of memory, ...) is in lib/training/guards.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.data.batches import epoch_windows, get_batch, load_training_data, loss_sum
from lib.runtime.config import check_positive, log_config, public, resolve_config, stage_parser, stage_paths
from lib.runtime.files import write_json_atomic, write_text_atomic
from lib.runtime.stage import log, run_stage, silence_log
from lib.training.checkpoints import check_room_for_saves, model_checkpoint, save_checkpoint, save_resumable
from lib.training.distributed import World, data_parallel, join
from lib.training.guards import (StopRequest, compile_or_eager, lost_peer_explained, save_and_exit, step_guard,
                                 stop_if_diverged)
from lib.training.hardware import check_memory, keep_freed_memory, resolve_device, resolve_dtype
from lib.training.launch import launch_ranks, launched_by_torchrun, end_of_rank
from lib.training.optim import LossModule, lr_at, make_optimizer, set_learning_rate
from lib.training.regularisation import (AUTO_DROPOUT, AUTO_DROPOUT_MAX, AUTO_DROPOUT_TOKENS, dropout_setting,
                                         noise_inputs, resolve_dropout)
from lib.training.runs import acquire_lock, fingerprint, resume_command, run_identity
from lib.training.samples import generate_samples, sample_prompts
from lib.training.state import Progress, Run, reseed_rank, start_or_resume
from model import TinyTransformer, model_config
from model.fast_cpu import use_fast_cpu_path


def build_parser():
    p = stage_parser("train", __doc__)
    a = p.add_argument
    for flag in ("--n-layers", "--d-model", "--n-heads", "--mlp-ratio"):
        a(flag, type=int, default=None)
    a("--positions", type=str, default=None, choices=["learned", "rotary"],
      help="learned: a position table added to the input (GPT-2); rotary: queries and keys rotated by position")
    a("--rotary-base", type=float, default=None, help="base of the rotation frequencies")
    a("--rotary-fraction", type=float, default=None, help="share of each head's dimensions that rotate")
    a("--activation", type=str, default=None, choices=["gelu", "relu", "relu2"], help="MLP activation; relu2 = squared ReLU")
    a("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
      help="RMS-normalise queries and keys per head (an option: the export refuses it)")
    a("--logit-softcap", type=float, default=None, help="> 0: logits = cap * tanh(logits / cap) (an option: the export refuses it)")
    a("--dropout", type=dropout_setting, default=None,
      help=f"on embeddings and residual branches; 'auto' = {AUTO_DROPOUT:g}, more for a training split under "
           f"{AUTO_DROPOUT_TOKENS // 1000}K tokens, at most {AUTO_DROPOUT_MAX:g}")
    a("--input-noise", type=float, default=None,
      help="share of input tokens replaced by random tokens of the training text (targets stay clean)")
    a("--max-seq-length", type=int, default=None, help="tokens per window; the model's context")
    a("--learning-rate", type=float, default=None, help="peak learning rate after warmup")
    a("--min-lr-ratio", type=float, default=None, help="the schedule's floor as a fraction of the peak")
    a("--lr-schedule", type=str, default=None, choices=["cosine", "wsd"],
      help="after the warmup: cosine decay, or wsd (the peak held, then a linear decay over the last --decay-fraction)")
    a("--decay-fraction", type=float, default=None, help="wsd: share of the steps after the warmup spent decaying")
    a("--optimizer", type=str, default=None, choices=["adamw", "muon"],
      help="adamw; muon: Muon on the blocks' matrices, AdamW on embeddings, norms and biases")
    a("--muon-lr-scale", type=float, default=None, help="muon: its rate as a multiple of the scheduled rate")
    a("--muon-momentum", type=float, default=None)
    a("--muon-weight-decay", type=float, default=None)
    a("--warmup-steps", type=int, default=None)
    for flag in ("--weight-decay", "--beta1", "--beta2"):
        a(flag, type=float, default=None)
    a("--grad-clip", type=float, default=None, help="max global gradient norm; 0 disables clipping")
    for flag in ("--batch-size", "--epochs", "--seed"):
        a(flag, type=int, default=None)
    a("--checkpoint-every", type=int, default=None, help="write epoch_NNN.pt every N epochs")
    a("--sample-every", type=int, default=None, help="log sample generations every N epochs")
    a("--sample-tokens", type=int, default=None)
    a("--resume", type=str, default=None, choices=["auto", "yes", "no"],
      help="auto: resume a matching unfinished run (asks on a terminal); yes: must resume; no: start over")
    a("--restart", dest="resume", action="store_const", const="no", help="same as --resume no")
    a("--device", type=str, default=None, choices=["cpu", "cuda", "mps"])
    a("--dtype", type=str, default=None, choices=["auto", "float32", "bfloat16"],
      help="auto: bf16 autocast where the CPU has native bf16, else float32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the training step")
    a("--loss-chunk-tokens", type=int, default=None,
      help="compute logits + loss N tokens at a time (never the whole B x T x vocab tensor); 0 = all at once")
    a("--threads", type=int, default=None, help="torch threads per process; 0 = the cores divided among the processes")
    a("--max-memory-gb", type=float, default=None, help="memory budget for the estimate; 0 = available RAM")
    # several processes: torchrun's settings (docs/configuration.md#scaling-out)
    a("--nproc", type=int, default=None, help="training processes on this machine (torchrun --nproc_per_node)")
    a("--nnodes", type=int, default=None, help="machines taking part (torchrun --nnodes)")
    a("--node-rank", type=int, default=None, help="this machine's number, 0 .. nnodes-1 (torchrun --node_rank)")
    a("--master-addr", type=str, default=None, help="address of machine 0, reachable from every machine")
    a("--master-port", type=int, default=None, help="a free port on machine 0, the same on every machine")
    return p


def validate(cfg):
    errors = []
    check_positive(cfg, ["n_layers", "d_model", "n_heads", "mlp_ratio", "max_seq_length", "learning_rate", "batch_size",
                         "epochs", "checkpoint_every", "sample_every", "sample_tokens", "nproc", "nnodes",
                         "master_port"], errors)
    check_positive(cfg, ["warmup_steps", "weight_decay", "grad_clip", "threads", "max_memory_gb", "loss_chunk_tokens",
                         "node_rank", "muon_lr_scale", "muon_weight_decay", "logit_softcap"], errors, allow_zero=True)
    if cfg["d_model"] > 0 and cfg["n_heads"] > 0 and cfg["d_model"] % cfg["n_heads"]:
        errors.append(f"d_model ({cfg['d_model']}) must be divisible by n_heads ({cfg['n_heads']})")
    if cfg["dropout"] != "auto" and not 0 <= cfg["dropout"] < 1:
        errors.append(f"dropout (--dropout) must be 'auto' or within [0, 1), got {cfg['dropout']}")
    if not 0 <= cfg["input_noise"] < 1:
        errors.append(f"input_noise (--input-noise) must be within [0, 1), got {cfg['input_noise']}")
    if not 0 < cfg["rotary_fraction"] <= 1 or cfg["rotary_base"] <= 1:
        errors.append(f"rotary_fraction must be within (0, 1] and rotary_base > 1, got {cfg['rotary_fraction']}, "
                      f"{cfg['rotary_base']}")
    if not 0 <= cfg["min_lr_ratio"] <= 1:
        errors.append(f"min_lr_ratio (--min-lr-ratio) must be within [0, 1], got {cfg['min_lr_ratio']}")
    if not 0 < cfg["decay_fraction"] <= 1:
        errors.append(f"decay_fraction (--decay-fraction) must be within (0, 1], got {cfg['decay_fraction']}")
    for key in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= cfg[key] < 1:
            errors.append(f"{key} (--{key}) must be within [0, 1), got {cfg[key]}")
    if cfg["max_seq_length"] > 8192:
        errors.append(f"max_seq_length (--max-seq-length / SEQ_LEN) must be <= 8192, got {cfg['max_seq_length']}")
    return errors


# ----------------------------------------------------------------------------- setup


def setup(cfg: dict, world: World) -> Run:
    paths = stage_paths(cfg)
    # THREADS=0: the cores shared out among this machine's training processes
    torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // world.local_size))
    keep_freed_memory()
    device = resolve_device(cfg["device"], world.local_rank)
    amp_dtype = resolve_dtype(cfg)
    data = load_training_data(cfg, paths)
    prompts = sample_prompts(paths)
    cfg["dropout"], why = resolve_dropout(cfg["dropout"], data.train_tokens.size)
    log(f"dropout {cfg['dropout']} ({why})")

    T = cfg["max_seq_length"]
    mcfg = model_config(cfg, data.tokenizer["vocab_size"])
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2 ** 32)
    model = TinyTransformer(mcfg).to(device)
    use_fast_cpu_path(model, cfg["loss_chunk_tokens"])  # the same function, computed by faster kernels
    if world.rank > 0:
        reseed_rank(cfg["seed"], world.rank)  # the same initial weights; its own dropout and noise draws
    n_params = model.num_parameters()
    log(f"model: {n_params:,} parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads} heads, "
        f"vocab {mcfg.vocab_size}, context {T}, {mcfg.positions} positions, {mcfg.activation}"
        f"{', QK norm' if mcfg.qk_norm else ''}{f', logit cap {mcfg.logit_softcap:g}' if mcfg.logit_softcap else ''}); device {device}, "
        f"{'bf16 autocast' if amp_dtype == torch.bfloat16 else 'float32'}, compile {'on' if cfg['compile'] else 'off'}")
    check_memory(cfg, n_params, mcfg.vocab_size)
    optimizer = make_optimizer(model, cfg, device)

    # Every epoch's windows, drawn once: the schedule needs their counts, the loop their order.
    windows_by_epoch = [epoch_windows(data.train_tokens.size, T, cfg["seed"], e) for e in range(cfg["epochs"])]
    total_steps = sum(math.ceil(len(w) / cfg["batch_size"]) for w in windows_by_epoch)
    identity = run_identity(cfg, data.train_meta, data.val_meta, data.tokenizer)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else nullcontext
    return Run(cfg=cfg, paths=paths, device=device, autocast=autocast, prompts=prompts, model_config=mcfg, model=model,
               optimizer=optimizer, windows_by_epoch=windows_by_epoch, total_steps=total_steps, identity=identity,
               fingerprint=fingerprint(identity), data=data, world=world, step_loss=model.loss, resume=resume_command(cfg))


# ----------------------------------------------------------------------------- the loop


def train_epoch(run: Run, state: Progress, epoch: int, stop: StopRequest) -> dict:
    """The batches of one epoch from state.position on: forward, backward, clip, step; returns the step statistics."""
    cfg, model, optimizer, T = run.cfg, run.model, run.optimizer, run.cfg["max_seq_length"]
    windows = run.windows_by_epoch[epoch]
    batches = [windows[i:i + cfg["batch_size"]] for i in range(0, len(windows), cfg["batch_size"])]
    started, grad_norms, step_losses, trained_tokens = time.perf_counter(), [], [], 0
    with tqdm(total=len(batches), initial=state.position, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
              disable=None if run.world.is_main else True, file=sys.stderr, dynamic_ncols=True) as bar:
        for b in range(state.position, len(batches)):
            if stop.due(run.world):  # Ctrl+C, SIGTERM or SIGHUP came: save this position and exit
                bar.close()
                save_and_exit(run, state, epoch, b, stop.due(run.world))
            lr = lr_at(state.step, cfg, run.total_steps)
            set_learning_rate(optimizer, lr)
            windows, weight = run.world.share(batches[b])  # several processes: this one's slice, its share
            x, y = get_batch(run.data.train_tokens, windows, T, run.device)
            x = noise_inputs(x, run.data.train_tokens, cfg["input_noise"])
            with step_guard(run, state, epoch, b):  # out of memory: save, then name a batch that fits
                with run.autocast():
                    loss = run.step_loss(x, y)  # model.loss(x, y); with several processes through DDP
                (loss * weight).backward()  # DDP averages the processes' gradients during this
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # several processes: the loss over all of them, and whether any of them was asked to stop
            loss_value = stop.agree(run.world, loss.item(), y.numel() * (weight > 0), run.device)
            stop_if_diverged(loss_value, lr, state, epoch, b, len(batches), cfg)
            state.step += 1
            state.running_sum += loss_value
            state.running_count += 1
            trained_tokens += len(batches[b]) * T
            grad_norms.append(float(norm))  # before clipping: the spikes the clip caps show in history.json
            step_losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{state.running_sum / state.running_count:.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{trained_tokens / (time.perf_counter() - started):.0f}", refresh=False)
    state.position = 0
    return {"started": started, "train_seconds": time.perf_counter() - started, "grad_norms": grad_norms,
            "step_losses": step_losses, "trained_tokens": trained_tokens}


def measure_epoch(run: Run, state: Progress, epoch: int, stats: dict, run_started: float) -> dict:
    """The epoch's history entry: validation, the eval-mode training loss, the gap, speed, samples."""
    cfg, T, norms = run.cfg, run.cfg["max_seq_length"], stats["grad_norms"]

    def mean_loss(tokens, starts):  # each rank measures its share of the windows
        total, count = loss_sum(run.model, tokens, np.array_split(starts, run.world.size)[run.world.rank], T, 64,
                                run.device, run.autocast)
        total, count = run.world.sum([total, count], run.device)
        return total / max(1, count)

    val_loss = mean_loss(run.data.val_tokens, run.data.val_starts)
    train_eval = mean_loss(run.data.train_tokens, run.data.train_eval_starts)
    # bits per byte: nats/token -> bits/token -> bits per byte of the UTF-8 text those tokens encode
    val_bpb = val_loss / math.log(2) * run.data.val_meta["tokens"] / run.data.val_meta["source_bytes"]
    entry = {
        "epoch": epoch + 1, "step": state.step, "train_loss": state.running_sum / max(1, state.running_count),
        "train_loss_eval": train_eval, "val_loss": val_loss, "val_bpb": val_bpb, "gap": val_loss - train_eval,
        "lr": lr_at(state.step - 1, cfg, run.total_steps), "grad_norm_mean": float(np.mean(norms)) if norms else None,
        "grad_norm_max": float(np.max(norms)) if norms else None,
        # every step's loss and gradient norm (before clipping): the first steps, the spikes the clipping caps
        "step_losses": [round(v, 4) for v in stats["step_losses"]], "step_grad_norms": [round(v, 4) for v in norms],
        "tokens_per_s": stats["trained_tokens"] / stats["train_seconds"] if stats["train_seconds"] > 0 else None,
        "seconds": time.perf_counter() - stats["started"], "elapsed_s": time.perf_counter() - run_started,
    }
    if run.world.is_main and ((epoch + 1) % cfg["sample_every"] == 0 or epoch + 1 == cfg["epochs"]):
        entry["samples"] = generate_samples(run.model, run.data.sp, cfg, run.device, epoch + 1, run.prompts)
    return entry


def end_of_epoch(run: Run, state: Progress, entry: dict) -> None:
    """Log one line; save best_model.pt / epoch_NNN.pt / last.pt, then history.json and metrics.jsonl (rank 0 writes).

    The history files come after the checkpoints, rewritten whole: whatever stops a save (a full disk),
    they hold each epoch once, matching last.pt."""
    epoch, epochs, main = entry["epoch"], run.cfg["epochs"], run.world.is_main
    state.history.append(entry)
    state.running_sum, state.running_count = 0.0, 0
    log(f"epoch {epoch:>2}/{epochs} | train {entry['train_loss']:.3f} (eval {entry['train_loss_eval']:.3f}) | "
        f"val {entry['val_loss']:.3f} | bpb {entry['val_bpb']:.3f} | gap {entry['gap']:+.3f} | lr {entry['lr']:.2e} | "
        f"{(entry['tokens_per_s'] or 0) / 1000:.1f}K tok/s | {entry['seconds']:.1f}s | elapsed {entry['elapsed_s']:.0f}s")
    for lang, text in entry.get("samples", {}).items():
        log(f"  sample [{lang}] {text!r}")

    if entry["val_loss"] < state.best_val:
        state.best_val = entry["val_loss"]
        if main:
            save_checkpoint(run.dir / "best_model.pt",
                            model_checkpoint(run, state, "best", epoch, val_loss=entry["val_loss"]))
    if epoch % run.cfg["checkpoint_every"] == 0:
        save_resumable(run, state, run.dir / f"epoch_{epoch:03d}.pt", "epoch", epoch, 0)
    save_resumable(run, state, run.dir / "last.pt", "last", epoch, 0)
    if main:
        write_json_atomic(run.dir / "history.json", {"config": public(run.cfg), "fingerprint": run.fingerprint,
                                                     "epochs": state.history})
        write_text_atomic(run.dir / "metrics.jsonl",
                          "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in state.history))


def finish(run: Run, state: Progress) -> None:
    final = state.history[-1]
    save_checkpoint(run.dir / "final_model.pt",
                    model_checkpoint(run, state, "final", run.cfg["epochs"], val_loss=final["val_loss"]))
    summary = {"fingerprint": run.fingerprint, "epochs": run.cfg["epochs"], "final_val_loss": final["val_loss"],
               "final_val_bpb": final["val_bpb"], "best_val_loss": state.best_val, "final_gap": final["gap"],
               "wall_s": final["elapsed_s"], "parameters": run.model.num_parameters()}
    write_json_atomic(run.dir / "train_done.json", summary)  # last: make's target for this stage
    log(f"finished: val {final['val_loss']:.3f} (best {state.best_val:.3f}), bpb {final['val_bpb']:.3f}, "
        f"{final['elapsed_s']:.0f}s; models in {run.dir}")


# ----------------------------------------------------------------------------- main


def main(cfg):
    if cfg["nproc"] * cfg["nnodes"] > 1 and not launched_by_torchrun():
        return launch_ranks(cfg)  # runs this script once per process under torchrun, and waits
    world = join(cfg["device"])
    if not world.is_main:
        silence_log(f"train rank {world.rank}")  # rank 0 speaks for all
    log_config(cfg)
    run = setup(cfg, world)
    lock = acquire_lock(Path(cfg["artifacts_dir"])) if world.is_main else None
    try:  # whatever ends the run (an error, Ctrl+C, a full disk), the lock and its file go
        train(run, world)
    finally:
        if lock:
            lock.close()
    world.close()


def train(run: Run, world: World) -> None:
    cfg, state = run.cfg, start_or_resume(run)
    if state is None:  # this run already finished
        return
    run.model.train()
    if cfg["compile"]:
        compile_or_eager(run)
    if world.distributed:  # the loss through DistributedDataParallel, which averages the gradients in backward
        run.step_loss = data_parallel(LossModule(run.model), run.device)
    stop = StopRequest().listen()
    T, batch = cfg["max_seq_length"], cfg["batch_size"]
    processes = (f"world size {world.size} ({world.backend}, {batch // world.size} windows per process and step, "
                 f"{torch.get_num_threads()} threads each)" if world.distributed else "world size 1 (one process)")
    log(f"training {cfg['epochs']} epochs x ~{math.ceil(len(run.data.train_starts) / batch)} steps of {batch} x {T} tokens "
        f"({len(run.data.train_starts) * T:,} tokens/epoch); validation {len(run.data.val_starts) * T:,} tokens; "
        f"{processes}")
    run_started = time.perf_counter() - (state.history[-1]["elapsed_s"] if state.history else 0.0)
    with lost_peer_explained(run, state):
        for epoch in range(state.epoch, cfg["epochs"]):
            check_room_for_saves(run, state, epoch)
            stats = train_epoch(run, state, epoch, stop)
            entry = measure_epoch(run, state, epoch, stats, run_started)
            end_of_epoch(run, state, entry)
    if world.is_main:
        finish(run, state)


if __name__ == "__main__":
    config = resolve_config(build_parser(), "train", validate=validate)
    with end_of_rank():
        run_stage(main, config)
