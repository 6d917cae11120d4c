"""Generate text with the trained model; prints the prompt and streams the continuation.

    make generate PROMPT="En el principio" MAX_TOKENS=100 TEMPERATURE=0.8 TOP_K=50 SEED=1
    make generate RUNTIME=onnx PROMPT="En el principio"       # the ONNX export, without torch
    python stages/generate.py --prompt "In the beginning" --max-tokens 100 --temperature 0.8 --top-k 50 --gen-seed 1

Loads artifacts/checkpoints/best_model.pt (--checkpoint picks another file in that
folder, or a path) and artifacts/tokenizer/spm.model; with --runtime onnx, the export
in artifacts/export/onnx/ (model.onnx and its spm.model) on onnxruntime, and then imports
no torch at all. Uses the KV cache; outputs
longer than the model's context continue with a sliding window. Needs no network.
`--latency-steps N` instead times N next-token steps and prints JSON (used by
evaluate.py in a fresh process, so only inference memory is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lib.runtime.config import checkpoint_path, resolve_config, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import run_stage
from lib.runtime.files import damaged_files, read_json, sha256_file


def build_parser():
    p = stage_parser("generate", __doc__)
    p.add_argument("--checkpoint", type=str, default=None, help="file in artifacts/checkpoints/ or a path")
    p.add_argument("--prompt", type=str, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="number of new tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=None, help="1.0 = no nucleus filter")
    p.add_argument("--gen-seed", type=int, default=None, help="sampling seed (make: SEED)")
    p.add_argument("--runtime", type=str, default=None, choices=["torch", "onnx"],
                   help="torch: the checkpoint; onnx: the export of `make export` on onnxruntime, without torch")
    p.add_argument("--onnx-dir", type=str, default=None, help="folder of model.onnx (default: artifacts/export/onnx)")
    p.add_argument("--latency-steps", type=int, default=0, help=argparse.SUPPRESS)
    return p


def validate(cfg):
    errors = []
    if cfg["max_tokens"] <= 0:
        errors.append(f"max_tokens (--max-tokens / MAX_TOKENS) must be > 0, got {cfg['max_tokens']}")
    if cfg["temperature"] < 0:
        errors.append(f"temperature (--temperature / TEMPERATURE) must be >= 0, got {cfg['temperature']}")
    if cfg["top_k"] < 0:
        errors.append(f"top_k (--top-k / TOP_K) must be >= 0, got {cfg['top_k']}")
    if not 0 < cfg["top_p"] <= 1:
        errors.append(f"top_p (--top-p / TOP_P) must be within (0, 1], got {cfg['top_p']}")
    return errors


def torch_runtime(cfg):
    """The trained checkpoint on PyTorch: a generate(prompt_ids, n, seed, eos_id=None) function, the tokenizer,
    the context. The latency measurement leaves eos_id out: it times every step it asks for."""
    import sentencepiece as spm
    import torch

    from lib.training.checkpoints import existing_checkpoint, load_model

    paths = stage_paths(cfg)
    path = existing_checkpoint(cfg, "generate from")
    tokenizer = read_json(paths["tokenizer"] / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer`")
    model, _ = load_model(path, tokenizer["model_sha256"])
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    if cfg["latency_steps"]:
        torch.set_num_threads(1)  # the documented target is single-thread tokens/s

    def generate(prompt_ids, max_new_tokens, seed, eos_id=None):
        return model.generate(prompt_ids, max_new_tokens, temperature=cfg["temperature"], top_k=cfg["top_k"],
                              top_p=cfg["top_p"], generator=torch.Generator().manual_seed(seed), eos_id=eos_id)
    return generate, sp, model.cfg.max_seq_length


def onnx_runtime(cfg):
    """The ONNX export on onnxruntime + numpy + sentencepiece: the same triple, and no torch imported."""
    import sentencepiece as spm

    from lib.export.onnx_runtime import OnnxLanguageModel

    folder = Path(cfg["onnx_dir"]) if cfg["onnx_dir"] else stage_paths(cfg)["export"] / "onnx"
    if not (folder / "model.onnx").exists():
        raise PipelineError(f"no ONNX model at {folder / 'model.onnx'}", "export one first: `make export`")
    if not cfg["onnx_dir"]:
        check_export(cfg, folder)
    model = OnnxLanguageModel(folder, threads=1 if cfg["latency_steps"] else 0)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))

    def generate(prompt_ids, max_new_tokens, seed, eos_id=None):
        return model.generate(prompt_ids, max_new_tokens, temperature=cfg["temperature"], top_k=cfg["top_k"],
                              top_p=cfg["top_p"], seed=seed, eos_id=eos_id)
    return generate, sp, model.max_seq_length


def check_export(cfg, folder: Path) -> None:
    """The export in artifacts/export/ must be intact and of the model asked for (sizes and sha256 from export.json)."""
    summary = read_json(folder.parent / "export.json", "export summary", "rebuild the export: `make export`")
    damaged = damaged_files(folder, summary.get("files", {}).get("onnx", {}))
    if damaged:
        raise PipelineError(f"the ONNX export in {folder} is damaged: {', '.join(damaged)}",
                            "rebuild it: `make export` (it notices the damage and exports again)",
                            "export-damaged-or-out-of-date")
    wanted = checkpoint_path(cfg)  # the model asked for, compared by content: folders may have moved
    same = wanted.exists() and sha256_file(wanted) == summary.get("checkpoint_sha256")
    if "checkpoint" in cfg.get("_overridden", []) and not same:
        raise PipelineError(f"the ONNX export is of {summary['checkpoint']}, not of CHECKPOINT={cfg['checkpoint']} ({wanted})",
                            f"export that checkpoint first: `make export CHECKPOINT={cfg['checkpoint']}`, or use "
                            f"RUNTIME=torch", "export-damaged-or-out-of-date")
    if wanted.exists() and not same:
        print(f"warning: the ONNX export was made from an earlier version of {wanted} (it has been trained since); "
              f"`make export` brings the export up to date", file=sys.stderr, flush=True)


def stream(generate, sp, prompt: str, cfg, out=sys.stdout) -> list[int]:
    """Print the prompt, then each new piece of text as soon as it decodes."""
    prompt_ids = sp.encode(prompt)
    new_ids: list[int] = []
    shown = sp.decode(prompt_ids)
    out.write(shown)
    out.flush()
    for token in generate([sp.bos_id()] + prompt_ids, cfg["max_tokens"], cfg["gen_seed"], eos_id=sp.eos_id()):
        if token == sp.eos_id():
            break
        new_ids.append(token)
        text = sp.decode(prompt_ids + new_ids)
        if text.startswith(shown) and "\ufffd" not in text[len(shown):]:  # wait for complete UTF-8 byte pieces
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write("\n")
    out.flush()
    return new_ids


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_latency(generate, sp, max_seq_length: int, cfg) -> dict:
    """Time next-token steps with the KV cache over several generations, each within the context."""
    prompts = ["In the beginning", "En el principio", "And the LORD said", "Y dijo Dios"]
    per_generation = max(8, max_seq_length - 16)
    timings, cpu_start = [], os.times()
    generated = 0
    i = 0
    while generated < cfg["latency_steps"]:
        ids = [sp.bos_id()] + sp.encode(prompts[i % len(prompts)])
        steps = min(per_generation, cfg["latency_steps"] - generated, max_seq_length - len(ids))
        gen = generate(ids, steps, cfg["gen_seed"] + i)
        t = time.perf_counter()
        for _ in gen:
            now = time.perf_counter()
            timings.append((now - t) * 1000)
            t = now
        generated += steps
        i += 1
    cpu_end = os.times()
    timings.sort()
    mean = sum(timings) / len(timings)
    cpu_seconds = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return {
        "steps": len(timings), "generations": i, "mean_ms": mean,
        "p50_ms": timings[len(timings) // 2], "p95_ms": timings[min(len(timings) - 1, int(0.95 * len(timings)))],
        "tokens_per_s": 1000 / mean, "threads": 1,
        "rss_mb": rss_kb("VmRSS") / 1024, "peak_rss_mb": rss_kb("VmHWM") / 1024,
        "cpu_seconds_per_token": cpu_seconds / len(timings),
    }


def main(cfg):
    generate, sp, max_seq_length = (onnx_runtime if cfg["runtime"] == "onnx" else torch_runtime)(cfg)
    if cfg["latency_steps"]:
        print(json.dumps({"runtime": cfg["runtime"], **measure_latency(generate, sp, max_seq_length, cfg)}))
        return
    try:
        stream(generate, sp, cfg["prompt"], cfg)
    except BrokenPipeError:
        # the reader has what it wanted (`make generate | head`): stop without a word; the text
        # still buffered for the closed pipe goes nowhere instead of failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    config = resolve_config(build_parser(), "generate", validate=validate)
    run_stage(main, config, report_time=False)
