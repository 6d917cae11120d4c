"""Stage 7 (after training, not part of make all): export the model -> artifacts/export/{hf,onnx}/, proven equal.

    make export                              # artifacts/checkpoints/best_model.pt
    make export CHECKPOINT=final_model.pt    # another checkpoint (a name in artifacts/checkpoints/, or a path)
    python stages/export.py --checkpoint best_model.pt

hf/    a Hugging Face folder that `transformers` loads offline (AutoModelForCausalLM,
       AutoTokenizer): GPT-2 config, safetensors weights, generation config, the
       tokenizer (the same unigram pieces, byte fallback, special tokens), a model card.
onnx/  model.onnx (with a key/value cache), model.json and spm.model: generation on
       onnxruntime + numpy + sentencepiece, without torch (`make generate RUNTIME=onnx`).

Then, in a fresh process, the proofs of lib/export/proofs.py (token ids, logits,
greedy generation); a proof that fails fails the stage. Then both runtimes are timed
the same way, each in a fresh process (generate.py --latency-steps): benchmark.json.
Everything is written under artifacts/export/.staging-PID/ and renamed into place only
when complete and proven, so a failed or interrupted export never looks finished; one
export at a time (artifacts/export/.export.lock). export.json (the proofs' figures, and
the size and sha256 of every exported file) is written last: it is what make waits for.
Before make decides, `--check-files` compares the files with those records, so a damaged
or missing file makes `make export` rebuild.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from pathlib import Path

from lib.runtime.config import check_positive, log_config, public, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage, set_interrupt_note, signals_held
from lib.runtime.files import (damaged_files, file_records, human_bytes, lock_folder, read_json, sha256_file,
                       write_json_atomic, write_text_atomic)
from lib.runtime.processes import run_script_json

RUNTIME_KEYS = ("p50_ms", "p95_ms", "tokens_per_s", "rss_mb", "peak_rss_mb")


def build_parser():
    p = stage_parser("export", __doc__)
    p.add_argument("--checkpoint", type=str, default=None, help="file in artifacts/checkpoints/ or a path")
    p.add_argument("--hf-greedy-tokens", type=int, default=None)
    p.add_argument("--onnx-greedy-tokens", type=int, default=None)
    p.add_argument("--logit-windows", type=int, default=None)
    p.add_argument("--max-logit-diff", type=float, default=None)
    p.add_argument("--latency-steps", type=int, default=None)
    p.add_argument("--proof-prompts", type=str, nargs="+", default=None)
    p.add_argument("--prove", type=str, default="", help=argparse.SUPPRESS)  # internal: the proofs' fresh process
    p.add_argument("--check-files", type=str, default="", metavar="STAMP",
                   help="check the exported files against export.json; rewrite STAMP when damaged (used by make)")
    return p


def validate(cfg):
    errors = []
    check_positive(cfg, ["hf_greedy_tokens", "onnx_greedy_tokens", "logit_windows", "max_logit_diff", "latency_steps"], errors)
    return errors


def load_trained(cfg: dict, paths: dict):
    """The checkpoint as a model, its payload and the tokenizer; clear errors for what is missing or wrong."""
    import sentencepiece as spm

    from lib.training.checkpoints import existing_checkpoint, load_model

    path = existing_checkpoint(cfg, "export")
    tokenizer = read_json(paths["tokenizer"] / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer`")
    model, payload = load_model(path, tokenizer["model_sha256"])
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    return path, model, payload, sp  # load_model gives float32 weights in eval mode


def special_ids(sp) -> dict:
    return {"pad_id": sp.pad_id(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id()}


def write_exports(model, sp, paths: dict, staging: Path) -> None:
    import logging

    import transformers

    from lib.export.hf import hf_model, hf_tokenizer
    from lib.export.onnx import export_onnx

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"

    hf_dir, onnx_dir = staging / "hf", staging / "onnx"
    hf_dir.mkdir(parents=True)
    onnx_dir.mkdir()
    hf_tokenizer(paths["tokenizer"] / "spm.model", model.cfg.max_seq_length).save_pretrained(hf_dir)
    hf_model(model, special_ids(sp)).save_pretrained(hf_dir)
    log(f"Hugging Face folder written: {', '.join(sorted(p.name for p in hf_dir.iterdir()))}")
    export_onnx(model, onnx_dir, special_ids(sp))
    shutil.copy2(paths["tokenizer"] / "spm.model", onnx_dir / "spm.model")
    log(f"ONNX model written: {(onnx_dir / 'model.onnx').stat().st_size / 1e6:.1f} MB with its key/value cache inputs")
    for path in staging.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600: the folder is meant to be shared


def prove(cfg: dict) -> None:
    """--prove STAGING: the proofs, in this (fresh) process, printed as one JSON line."""
    import numpy as np

    from lib.export.proofs import run_proofs

    paths, staging = stage_paths(cfg), Path(cfg["prove"])
    _, model, _, sp = load_trained(cfg, paths)
    val_text = (paths["prepared"] / "val.txt").read_text(encoding="utf-8")
    val_tokens = np.load(paths["encoded"] / "val.npy", mmap_mode="r")
    print(json.dumps(run_proofs(staging / "hf", staging / "onnx", model, sp, val_text, val_tokens, cfg)))


def check_proofs(proofs: dict) -> None:
    tok, logits, greedy = proofs["tokenizer"], proofs["logits"], proofs["greedy"]
    log(f"proof tokenizer: {tok['mismatches']} mismatches in {tok['strings']} strings (validation lines + hard strings)")
    log(f"proof logits: max |HF - ours| = {logits['max_abs_diff']:.2e} on {logits['windows']} windows of "
        f"{logits['window_tokens']} tokens (limit {logits['limit']:.0e})")
    for run in greedy["runs"]:
        log(f"proof greedy [{run['runtime']}] {run['prompt']!r}: {run['tokens']} tokens "
            f"{'identical' if run['identical'] else 'DIFFER from token ' + str(run['first_difference'])}")
    failed = [name for name in ("tokenizer", "logits", "greedy") if not proofs[name]["passed"]]
    if failed:
        raise PipelineError(f"the export does not compute what the model computes: the {', '.join(failed)} proof failed "
                            f"(details above); nothing was written to artifacts/export/",
                            "report it with the lines above; the trained model itself is unaffected")


def benchmark(cfg: dict, checkpoint: Path, onnx_dir: Path) -> dict:
    """The same latency measurement for both runtimes, each in a fresh process, one thread."""
    common = ["--latency-steps", str(cfg["latency_steps"]), "--temperature", "0.8", "--top-k", "50"]
    figures = {"torch": run_script_json(cfg, "generate.py", [*common, "--runtime", "torch", "--checkpoint", str(checkpoint)],
                                        "the torch latency measurement"),
               "onnx": run_script_json(cfg, "generate.py", [*common, "--runtime", "onnx", "--onnx-dir", str(onnx_dir)],
                                       "the ONNX latency measurement")}
    log(f"{'runtime':>8} {'p50 ms':>8} {'p95 ms':>8} {'tokens/s':>9} {'RSS MB':>7} {'peak RSS MB':>12}")
    for name, f in figures.items():
        log(f"{name:>8} {f['p50_ms']:8.2f} {f['p95_ms']:8.2f} {f['tokens_per_s']:9.0f} {f['rss_mb']:7.0f} {f['peak_rss_mb']:12.0f}")
    return {name: {key: f[key] for key in RUNTIME_KEYS} | {"steps": f["steps"]} for name, f in figures.items()}


def write_model_card(payload: dict, model, paths: dict, staging: Path, proofs: dict) -> None:
    from lib.export.hf import model_card

    corpus = paths["raw"] / "corpus.json"
    report = paths["eval"] / "report.json"
    card = model_card(payload, model.num_parameters(),
                      json.loads(corpus.read_text()) if corpus.exists() else None,
                      json.loads(report.read_text()) if report.exists() else None, proofs)
    write_text_atomic(staging / "hf" / "README.md", card)


def remove_stale_staging(export_dir: Path) -> None:
    """Staging folders of exports that were stopped: litter (the export lock says no export is running)."""
    for folder in export_dir.glob(".staging-*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_uninterrupted(folder: Path) -> None:
    """rmtree that a second Ctrl+C cannot cut short (the signals wait until it is done)."""
    with signals_held():
        shutil.rmtree(folder, ignore_errors=True)


def lock_export(export_dir: Path):
    def busy(holder):
        return PipelineError(f"another export (pid {holder}) is writing {export_dir}; this one did not touch it",
                             "wait for it to finish (or stop it), then rerun `make export` if needed")
    return lock_folder(export_dir / ".export.lock", busy)


def export_records(export_dir: Path) -> dict:
    return {name: file_records(export_dir / name) for name in ("hf", "onnx")}


def check_files(cfg: dict, stamp: Path) -> None:
    """--check-files STAMP (run by make before it decides): a damaged or missing export file rewrites
    STAMP, which export.json depends on, so make rebuilds the export; an intact export leaves it alone."""
    export_dir = stage_paths(cfg)["export"]
    summary = export_dir / "export.json"
    if not summary.exists():
        if not stamp.exists():
            write_text_atomic(stamp, "no export yet\n")
        return
    try:
        records = json.loads(summary.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError):
        records = None  # an export.json of an older version, without file records
    damaged = ["export.json has no file records"] if records is None else \
        [f"{name}/{f}" for name in ("hf", "onnx") for f in damaged_files(export_dir / name, records.get(name, {}))]
    if damaged:
        print(f"export: damaged, rebuilding: {', '.join(damaged)}", flush=True)
        write_text_atomic(stamp, "damaged: " + ", ".join(damaged) + "\n")
    elif not stamp.exists():
        write_text_atomic(stamp, "intact\n")
        old = summary.stat().st_mtime - 1
        os.utime(stamp, (old, old))  # older than export.json: an intact export is not rebuilt


def move_into_place(staging: Path, export_dir: Path) -> None:
    """Replace hf/ and onnx/ by their new versions; the old ones are removed only once the new are in place."""
    for name in ("hf", "onnx"):
        target, old = export_dir / name, staging / f"old-{name}"
        if target.exists():
            target.rename(old)
        (staging / name).rename(target)
        shutil.rmtree(old, ignore_errors=True)


def main(cfg):
    if cfg["prove"]:
        return prove(cfg)
    if cfg["check_files"]:
        return check_files(cfg, Path(cfg["check_files"]))
    log_config(cfg)
    paths = stage_paths(cfg)
    checkpoint, model, payload, sp = load_trained(cfg, paths)
    options = [name for name, on in (("QK_NORM", model.cfg.qk_norm), ("LOGIT_SOFTCAP", model.cfg.logit_softcap > 0)) if on]
    if options:
        raise PipelineError(f"{checkpoint} was trained with {' and '.join(options)}, which the transformers "
                            f"architectures this export maps onto (GPT-2, GPT-NeoX) do not have",
                            "export a run trained without them (the defaults); the checkpoint itself runs with "
                            "`make generate` and `make evaluate`")
    log(f"exporting {checkpoint} (epoch {payload.get('epoch')}, {model.num_parameters():,} parameters)")
    export_dir = paths["export"]
    lock = lock_export(export_dir)
    try:
        remove_stale_staging(export_dir)
        export(cfg, paths, checkpoint, model, payload, sp, export_dir)
    finally:
        lock.close()


def export_bytes(model, paths: dict) -> int:
    """About what an export takes on disk: the weights twice in float32 (safetensors, ONNX) and the tokenizer
    three times or so (spm.model in each folder, tokenizer.json), plus a margin for the small files."""
    return 8 * model.num_parameters() + 5 * (paths["tokenizer"] / "spm.model").stat().st_size + (1 << 20)


def is_disk_full(exc: BaseException) -> bool:
    """safetensors and the ONNX writer report a full disk in their own exception types, with the OS's words."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def no_room_for_export(export_dir: Path, needed: int, model, while_writing: bool) -> PipelineError:
    when = "ran out of disk space while writing the new one" if while_writing else "was not started"
    return PipelineError(
        f"{export_dir} has {human_bytes(shutil.disk_usage(export_dir).free)} free, and an export of this model's "
        f"{model.num_parameters():,} parameters needs about {human_bytes(needed)}; the export {when}, the previous "
        f"export (if any) is untouched",
        "free some disk space (or point ARTIFACTS_DIR at a larger disk) and rerun `make export`", "disk-full")


def export(cfg, paths, checkpoint: Path, model, payload, sp, export_dir: Path) -> None:
    staging, needed = export_dir / f".staging-{os.getpid()}", export_bytes(model, paths)
    if shutil.disk_usage(export_dir).free < needed:
        raise no_room_for_export(export_dir, needed, model, while_writing=False)
    try:
        try:
            write_exports(model, sp, paths, staging)
        except Exception as exc:  # the disk may also fill from elsewhere while the files are written
            if not is_disk_full(exc):
                raise
            remove_uninterrupted(staging)  # first, so that the free space named is what is really free
            raise no_room_for_export(export_dir, needed, model, while_writing=True) from None
        proofs = run_script_json(cfg, "export.py", ["--checkpoint", str(checkpoint), "--prove", str(staging)], "the proofs")
        check_proofs(proofs)
        write_model_card(payload, model, paths, staging, proofs)
        bench = benchmark(cfg, checkpoint, staging / "onnx")
        (export_dir / "export.json").unlink(missing_ok=True)  # from here on the old export is incomplete
        move_into_place(staging, export_dir)
    finally:
        remove_uninterrupted(staging)
    write_json_atomic(export_dir / "benchmark.json", bench)
    summary = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "epoch": payload.get("epoch"),
               "fingerprint": payload.get("fingerprint"), "hf": str(export_dir / "hf"), "onnx": str(export_dir / "onnx"),
               "proofs": proofs, "benchmark": bench, "config": public(cfg), "files": export_records(export_dir)}
    write_json_atomic(export_dir / "export.json", summary)  # last: make's target for this stage
    log(f"exported to {export_dir / 'hf'} and {export_dir / 'onnx'}; figures in {export_dir / 'benchmark.json'}")


if __name__ == "__main__":
    config = resolve_config(build_parser(), "export", validate=validate)
    set_interrupt_note("the previous export stays in artifacts/export/ (if it was being replaced, its export.json "
                       "is gone, so `make export` rebuilds it)")
    # the proofs' and the file check's own processes keep no log: the export's does
    quiet = config["prove"] or config["check_files"]
    run_stage(main, config, log_file=None if quiet else stage_log(config, "export"))
