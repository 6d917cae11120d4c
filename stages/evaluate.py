"""Stage 6: evaluate the trained model -> artifacts/eval/{report.json, report.md, *.png}.

    make evaluate
    python stages/evaluate.py --checkpoint best_model.pt --temperature 0.8 --top-k 50

Validation loss, perplexity and bits per byte over the whole validation split;
samples from English and Spanish prompts, scored for language (a small
stopword identifier), repetition and diversity. The prompts are the
YAML's for the default corpus; for your own corpus (CORPUS_PATH / CORPUS_URL) they are
the opening words of validation sentences in each language, so the samples are judged
on text like the one trained on (prompt_source: auto | config | corpus); inference speed
and memory measured in a fresh process that only loads the model and generates
(stages/generate.py --latency-steps); plots drawn from history.json; every spec
check reported pass/fail with its figure. Exits 0 even when a check fails: the
report is the verdict.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import time
from pathlib import Path

from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.stage import log, run_stage
from lib.runtime.files import atomic_path, read_json, write_json_atomic, write_text_atomic
from lib.data.language import corpus_prompts, identify_language, words
from lib.runtime.processes import run_script_json
from lib.training.run_summary import settings_text, summarize_run

# Floors from the spec and its on-device targets.
LIMITS = {"val_loss": 5.0, "gap": 0.5, "max_repeat_run": 3, "repeated_3gram_share": 0.25, "p95_ms": 250.0,
          "rss_mb": 400.0, "peak_rss_mb": 512.0, "tokens_per_s": 100.0}


def build_parser():
    p = stage_parser("evaluate", __doc__)
    p.add_argument("--checkpoint", type=str, default=None, help="file in artifacts/checkpoints/ or a path")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--sample-tokens", type=int, default=None, help="new tokens per sample")
    p.add_argument("--eval-seed", type=int, default=None)
    p.add_argument("--latency-steps", type=int, default=None, help="next-token steps timed (>= 200 for the report)")
    p.add_argument("--prompt-source", type=str, default=None, choices=["auto", "config", "corpus"],
                   help="auto: the YAML prompts for the default corpus, else opening words of validation sentences")
    p.add_argument("--prompts-en", type=str, nargs="+", default=None)
    p.add_argument("--prompts-es", type=str, nargs="+", default=None)
    return p


def validate(cfg):
    errors = []
    for key in ("sample_tokens", "latency_steps"):
        if cfg[key] <= 0:
            errors.append(f"{key} (--{key.replace('_', '-')}) must be > 0, got {cfg[key]}")
    if cfg["temperature"] < 0:
        errors.append(f"temperature must be >= 0, got {cfg['temperature']}")
    return errors


# ----------------------------------------------------------------------------- sample metrics


def repetition_metrics(token_ids: list[int], text: str, pieces: list[str] | None = None) -> dict:
    """Degeneracy measures: repeated 3-grams, the longest run of one token, distinct-n of words.

    `pieces` (the tokens' text) tells digits apart: the tokenizer writes a number one piece per digit
    (split_digits), so the year 1333 is three 3s in a row, and a quotation dated 3333 four; a run of one
    digit is a number, not a loop (a number said again and again still raises the 3-gram share).
    """
    grams = [tuple(token_ids[i:i + 3]) for i in range(len(token_ids) - 2)]
    repeated_share = 1 - len(set(grams)) / len(grams) if grams else 0.0
    digits = [p.lstrip("\u2581").isdigit() for p in pieces] if pieces else [False] * len(token_ids)
    longest = run = 1 if token_ids else 0
    for a, b, is_digit in zip(token_ids, token_ids[1:], digits[1:]):
        run = run + 1 if a == b and not is_digit else 1
        longest = max(longest, run)
    w = words(text)
    bigrams = list(zip(w, w[1:]))
    return {"repeated_3gram_share": repeated_share, "max_repeat_run": longest,
            "distinct_1": len(set(w)) / len(w) if w else 0.0,
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0}


def choose_prompts(cfg: dict, paths: dict) -> tuple[dict[str, list[str]], str]:
    """Prompts per language and where they come from (see the module docstring)."""
    configured = {"en": cfg["prompts_en"], "es": cfg["prompts_es"]}
    source = cfg["prompt_source"]
    if source == "auto":
        given = {"prompts_en", "prompts_es"} & set(cfg.get("_overridden", []))
        corpus_kind = read_json(paths["raw"] / "corpus.json", "corpus sidecar", "run `make download`")["source"]["kind"]
        source = "config" if given or corpus_kind == "wheel" else "corpus"
    if source == "config":
        return configured, "config"
    val_text = (paths["prepared"] / "val.txt").read_text(encoding="utf-8")
    found = corpus_prompts(val_text, max(len(configured["en"]), len(configured["es"]), 1))
    return found, "validation documents"


# ----------------------------------------------------------------------------- plots


def draw_plots(history: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    figures = {
        "loss.png": ("loss (nats/token)", [("train (running mean)", "train_loss"), ("train (eval mode)", "train_loss_eval"),
                                           ("validation", "val_loss")]),
        "lr.png": ("learning rate at epoch end", [("learning rate", "lr")]),
        "bpb.png": ("validation bits per byte", [("validation", "val_bpb")]),
    }
    written = []
    for name, (ylabel, series) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, key in series:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, never 2.5
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(name)
    return written


# ----------------------------------------------------------------------------- report


def report_checks(val_loss, history, samples, latency) -> list[dict]:
    last = history[-1]
    train_losses = [h["train_loss"] for h in history]
    falls = all(b < a for a, b in zip(train_losses, train_losses[1:]))
    languages = {s["language"] for s in samples}
    worst_run = max(s["max_repeat_run"] for s in samples)
    worst_share = max(s["repeated_3gram_share"] for s in samples)
    checks = [
        ("validation loss < 5.0", val_loss < LIMITS["val_loss"], f"{val_loss:.3f} < {LIMITS['val_loss']}"),
        ("overfitting gap (val - train, eval mode, last epoch) < 0.5", last["gap"] < LIMITS["gap"], f"{last['gap']:+.3f} < {LIMITS['gap']}"),
        ("training loss falls every epoch", falls, " > ".join(f"{x:.2f}" for x in train_losses)),
        ("samples in both languages", {"en", "es"} <= languages, ", ".join(s["language"] for s in samples)),
        ("no token repeated > 3 times in a row", worst_run <= LIMITS["max_repeat_run"], f"longest run {worst_run}"),
        ("repeated 3-gram share <= 0.25", worst_share <= LIMITS["repeated_3gram_share"], f"worst {worst_share:.3f}"),
        ("next-token p95 latency <= 250 ms", latency["p95_ms"] <= LIMITS["p95_ms"], f"{latency['p95_ms']:.2f} ms"),
        ("tokens/s >= 100 (one thread)", latency["tokens_per_s"] >= LIMITS["tokens_per_s"], f"{latency['tokens_per_s']:.0f}"),
        ("runtime RSS <= 400 MB", latency["rss_mb"] <= LIMITS["rss_mb"], f"{latency['rss_mb']:.0f} MB"),
        ("peak RSS <= 512 MB", latency["peak_rss_mb"] <= LIMITS["peak_rss_mb"], f"{latency['peak_rss_mb']:.0f} MB"),
    ]
    return [{"check": name, "passed": bool(ok), "figure": figure} for name, ok, figure in checks]


def render_markdown(report: dict) -> str:
    m, lat = report["metrics"], report["inference"]
    lines = [
        "# Evaluation report", "",
        f"Model: `{report['checkpoint']}` (epoch {report['epoch']}, {report['parameters']:,} parameters)", "",
        f"Run: `{report['run']['folder']}` ({'the current run' if report['run']['current'] else 'an archived run'}; "
        f"settings besides the defaults: {settings_text(report['run']['settings'])})", "",
        "| metric | value |", "|---|---|",
        f"| validation loss (nats/token) | {m['val_loss']:.4f} |",
        f"| perplexity | {m['perplexity']:.1f} |",
        f"| bits per byte | {m['val_bpb']:.4f} |",
        f"| next-token latency mean / p50 / p95 (ms, 1 thread, KV cache) | {lat['mean_ms']:.2f} / {lat['p50_ms']:.2f} / {lat['p95_ms']:.2f} |",
        f"| tokens/s (1 thread) | {lat['tokens_per_s']:.0f} |",
        f"| RSS steady / peak (MB, inference process) | {lat['rss_mb']:.0f} / {lat['peak_rss_mb']:.0f} |",
        f"| CPU-seconds per token (energy proxy; battery is not measurable here) | {lat['cpu_seconds_per_token']:.5f} |",
        "", "## Checks", "", "| check | result | figure |", "|---|---|---|",
    ]
    lines += [f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} | {c['figure']} |" for c in report["checks"]]
    lines += ["", "## Samples", "", f"temperature {report['sampling']['temperature']}, top-k {report['sampling']['top_k']}, "
              f"top-p {report['sampling']['top_p']}", ""]
    for s in report["samples"]:
        lines += [f"**{s['prompt']}** ({s['language']}; repeated 3-grams {s['repeated_3gram_share']:.2f}, "
                  f"longest run {s['max_repeat_run']}, distinct-2 {s['distinct_2']:.2f})", "", f"> {s['text']}", ""]
    lines += ["## Plots", "", "![loss](loss.png) ![learning rate](lr.png) ![bits per byte](bpb.png)", ""]
    return "\n".join(lines)


def validation_loss(model, paths: dict, tokenizer: dict) -> tuple[float, float, dict]:
    """Loss (nats/token) and bits per byte over the whole validation split, and its token file's sidecar."""
    import torch

    from lib.data.batches import load_split, mean_loss, window_starts

    start = time.perf_counter()
    T = model.cfg.max_seq_length
    val_tokens, val_meta = load_split(paths, "val", tokenizer)
    # The reference model computes whole logits: 16 windows x 256 x 8000 in fp32 hold 130 MB (64 held
    # over 1 GB), and take no longer than the fast path's chunks (15.9 s for the default split, 16.8 s chunked).
    val_loss = mean_loss(model, val_tokens, window_starts(val_tokens.size, T), T, 16, torch.device("cpu"), nullcontext)
    val_bpb = val_loss / math.log(2) * val_meta["tokens"] / val_meta["source_bytes"]
    log(f"validation: loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.1f}, "
        f"{val_bpb:.4f} bits/byte ({time.perf_counter() - start:.1f}s)")
    return val_loss, val_bpb, val_meta


def sample_texts(model, sp, cfg: dict, paths: dict) -> tuple[list[dict], str]:
    """A sample per prompt, each with its language and repetition metrics, and where the prompts came from."""
    import torch

    prompts_by_language, prompt_origin = choose_prompts(cfg, paths)
    log(f"prompts from {prompt_origin}: " + "; ".join(f"{lang} {p!r}" for lang, ps in prompts_by_language.items() for p in ps))
    samples = []
    for lang, prompts in prompts_by_language.items():
        for i, prompt in enumerate(prompts):
            prompt_ids = sp.encode(prompt)
            gen = torch.Generator().manual_seed(cfg["eval_seed"] + i)
            new = [t for t in model.generate([sp.bos_id()] + prompt_ids, cfg["sample_tokens"], cfg["temperature"],
                                             cfg["top_k"], cfg["top_p"], generator=gen, eos_id=sp.eos_id())
                   if t != sp.eos_id()]
            continuation = sp.decode(new)
            text = sp.decode(prompt_ids + new)
            samples.append({"prompt": prompt, "prompt_language": lang, "text": text,
                            "language": identify_language(continuation),
                            **repetition_metrics(new, continuation, [sp.id_to_piece(t) for t in new])})
            log(f"sample [{samples[-1]['language']}] {text!r}")
    return samples, prompt_origin


def main(cfg):
    import sentencepiece as spm

    from lib.training.checkpoints import existing_checkpoint, load_model

    log_config(cfg)
    paths = stage_paths(cfg)
    out = paths["eval"]
    tokenizer = read_json(paths["tokenizer"] / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer`")
    path = existing_checkpoint(cfg, "evaluate")
    model, payload = load_model(path, tokenizer["model_sha256"])
    # The run the model comes from: its own folder (an archived run's, with CHECKPOINT=...) or the current run.
    run_dir = path.parent if (path.parent / "history.json").exists() else paths["checkpoints"]
    history = read_json(run_dir / "history.json", "training history", "run `make train`")["epochs"]
    run = summarize_run(run_dir)
    log(f"model {path}, from the run in {run_dir}: {settings_text(run['settings'])}")
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))

    val_loss, val_bpb, val_meta = validation_loss(model, paths, tokenizer)
    samples, prompt_origin = sample_texts(model, sp, cfg, paths)

    log(f"measuring inference latency in a fresh process ({cfg['latency_steps']} next-token steps)")
    latency = run_script_json(cfg, "generate.py", [
        "--checkpoint", str(path), "--latency-steps", str(cfg["latency_steps"]), "--temperature", str(cfg["temperature"]),
        "--top-k", str(cfg["top_k"]), "--top-p", str(cfg["top_p"])], "the latency measurement")

    checks = report_checks(val_loss, history, samples, latency)
    mix = {lang: sum(s["language"] == lang for s in samples) for lang in ("en", "es", "unknown")}
    headline = (f"val loss {val_loss:.3f} | bpb {val_bpb:.3f} | p50/p95 {latency['p50_ms']:.2f}/{latency['p95_ms']:.2f} ms | "
                f"{latency['tokens_per_s']:.0f} tok/s | peak RSS {latency['peak_rss_mb']:.0f} MB | samples en {mix['en']}, "
                f"es {mix['es']} | checks {sum(c['passed'] for c in checks)}/{len(checks)} passed")
    plots = draw_plots(history, out)
    report = {
        "headline": headline, "checkpoint": str(path), "epoch": payload.get("epoch"),
        "run": {"folder": str(run_dir), "current": run_dir == paths["checkpoints"], "fingerprint": run["fingerprint"],
                "settings": run["settings"], "epochs": run["epochs"], "finished": run["finished"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": {"val_loss": val_loss, "perplexity": math.exp(val_loss), "val_bpb": val_bpb,
                    "val_tokens": val_meta["tokens"], "val_bytes": val_meta["source_bytes"],
                    "final_train_loss": history[-1]["train_loss"], "final_train_loss_eval": history[-1]["train_loss_eval"],
                    "final_gap": history[-1]["gap"]},
        "sampling": {**{k: cfg[k] for k in ("temperature", "top_k", "top_p", "sample_tokens", "eval_seed")},
                     "prompts_from": prompt_origin},
        "samples": samples, "language_mix": mix, "inference": latency, "checks": checks,
        "all_checks_passed": all(c["passed"] for c in checks), "plots": plots,
    }
    write_text_atomic(out / "report.md", render_markdown(report))
    write_json_atomic(out / "report.json", report)  # last: make's target for this stage
    for c in checks:
        log(f"{'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['figure']}")
    log(headline)


if __name__ == "__main__":
    config = resolve_config(build_parser(), "evaluate", validate=validate)
    run_stage(main, config, log_file=stage_log(config, "evaluate"))
