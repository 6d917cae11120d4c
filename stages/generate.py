"""Generate text with the trained model; prints the prompt and streams the continuation.

    make generate PROMPT="En el principio" MAX_TOKENS=100 TEMPERATURE=0.8 TOP_K=50 SEED=1
    python stages/generate.py --prompt "In the beginning" --max-tokens 100 --temperature 0.8 --top-k 50 --gen-seed 1

Loads artifacts/checkpoints/best_model.pt (--checkpoint picks another file in that
folder, or a path) and artifacts/tokenizer/spm.model. Uses the KV cache; outputs
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

from lib.config import resolve_config, stage_parser, stage_paths
from lib.errors import PipelineError, run_stage
from lib.files import read_json


def build_parser():
    p = stage_parser("generate", __doc__)
    p.add_argument("--checkpoint", type=str, default=None, help="file in artifacts/checkpoints/ or a path")
    p.add_argument("--prompt", type=str, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="number of new tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=None, help="1.0 = no nucleus filter")
    p.add_argument("--gen-seed", type=int, default=None, help="sampling seed (make: SEED)")
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


def load_model_and_tokenizer(cfg):
    import sentencepiece as spm
    from lib.checkpoints import checkpoint_path, load_model

    paths = stage_paths(cfg)
    path = checkpoint_path(cfg)
    if not path.exists():
        raise PipelineError(f"no trained model at {path}", "train one first: `make train` (or `make all`)",
                            "interrupted-runs-and-resume")
    tokenizer = read_json(paths["tokenizer"] / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer`")
    model, payload = load_model(path, tokenizer["model_sha256"])
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    return model, sp, payload


def stream(model, sp, prompt: str, cfg, out=sys.stdout) -> list[int]:
    """Print the prompt, then each new piece of text as soon as it decodes."""
    import torch

    prompt_ids = sp.encode(prompt)
    generator = torch.Generator().manual_seed(cfg["gen_seed"])
    new_ids: list[int] = []
    shown = sp.decode(prompt_ids)
    out.write(shown)
    out.flush()
    for token in model.generate([sp.bos_id()] + prompt_ids, cfg["max_tokens"], temperature=cfg["temperature"],
                                top_k=cfg["top_k"], top_p=cfg["top_p"], generator=generator, eos_id=sp.eos_id()):
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


def measure_latency(model, sp, cfg) -> dict:
    """Time next-token steps with the KV cache over several generations, each within the context."""
    import torch

    torch.set_num_threads(1)  # the documented target is single-thread tokens/s
    prompts = ["In the beginning", "En el principio", "And the LORD said", "Y dijo Dios"]
    per_generation = max(8, model.cfg.max_seq_length - 16)
    timings, cpu_start = [], os.times()
    generated = 0
    i = 0
    while generated < cfg["latency_steps"]:
        ids = [sp.bos_id()] + sp.encode(prompts[i % len(prompts)])
        steps = min(per_generation, cfg["latency_steps"] - generated, model.cfg.max_seq_length - len(ids))
        gen = model.generate(ids, steps, temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"],
                             generator=torch.Generator().manual_seed(cfg["gen_seed"] + i))
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
    model, sp, _ = load_model_and_tokenizer(cfg)
    if cfg["latency_steps"]:
        print(json.dumps(measure_latency(model, sp, cfg)))
        return
    stream(model, sp, cfg["prompt"], cfg)


if __name__ == "__main__":
    config = resolve_config(build_parser(), "generate", validate=validate)
    run_stage(main, config, report_time=False)
