"""Stage 4: encode the splits to token files -> data/encoded/{train,val}.npy + {train,val}.json.

    make encode
    python stages/encode.py

Each document becomes <s> piece ids of its lines </s>; documents are concatenated
into one flat array (uint16 while the vocabulary has < 65536 pieces) that the
trainer memory-maps. The JSON sidecar describes the file (dtype, vocab size,
token count, source bytes for bits-per-byte, tokenizer checksum), so the trainer
refuses a stale file or one made by another tokenizer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage
from lib.runtime.files import (atomic_path, human_bytes, read_json, sha256_file, write_json_atomic,
                       write_text_atomic)


def build_parser():
    p = stage_parser("encode", __doc__)
    p.add_argument("--check-tokenizer", type=str, default="", metavar="STAMP",
                   help="rewrite STAMP when a token file was made by another tokenizer or text (used by make)")
    return p


def check_tokenizer(cfg: dict, stamp: Path) -> None:
    """--check-tokenizer STAMP (run by make before it decides). Make compares times, which cannot tell two
    tokenizers apart (a copied or restored spm.model is older than the token files): when a sidecar names
    another tokenizer or another text than the current ones, or cannot be read, STAMP is rewritten, so the token files are
    rebuilt, and training after them. Otherwise STAMP is left alone, older than the token files."""
    paths = stage_paths(cfg)
    model, out = paths["tokenizer"] / "spm.model", paths["encoded"]
    model_sha256 = sha256_file(model) if model.exists() else None
    stale = []
    for split in ("train", "val"):
        try:
            meta = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # no token file yet: make builds it anyway
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):  # a damaged sidecar: make would call it up to date by its time
            stale.append(f"{split}.json (unreadable)")
            continue
        if model_sha256 and meta.get("tokenizer_sha256") != model_sha256:
            stale.append(f"{split}.npy (another tokenizer than {model})")
        source = paths["prepared"] / f"{split}.txt"
        if source.exists() and meta.get("source_sha256") != sha256_file(source):
            stale.append(f"{split}.npy (another text than {source})")
    if stale:
        print(f"encode: stale token files, re-encoding: {', '.join(stale)}", flush=True)
        write_text_atomic(stamp, "stale: " + ", ".join(stale) + "\n")
    elif not stamp.exists():
        write_text_atomic(stamp, "checked\n")
        os.utime(stamp, (0, 0))  # older than any token file: nothing is rebuilt for it


def encode_split(sp, text: str, bos: int, eos: int, dtype=np.int64, batch_lines: int = 50_000) -> np.ndarray:
    """<s> ids of each document's lines </s>, all documents concatenated.

    Lines are encoded in batches (one SentencePiece call each, spread over its threads)
    and each batch becomes a compact array at once: a Python int per token for the
    whole corpus would take 2.3 GB on a 100 MB corpus.
    """
    parts, lines, shape = [], [], []  # shape: per document, its number of lines

    def flush():
        ids = sp.encode(lines)
        flat, i = [], 0
        for n in shape:
            flat.append(bos)
            for piece_ids in ids[i:i + n]:
                flat.extend(piece_ids)
            flat.append(eos)
            i += n
        parts.append(np.array(flat, dtype=dtype))
        lines.clear()
        shape.clear()

    for doc in text.split("\n\n"):
        if not doc.strip():
            continue
        doc_lines = doc.split("\n")
        lines.extend(doc_lines)
        shape.append(len(doc_lines))
        if len(lines) >= batch_lines:
            flush()
    if lines:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def main(cfg):
    if cfg["check_tokenizer"]:
        return check_tokenizer(cfg, Path(cfg["check_tokenizer"]))
    import sentencepiece as spm

    log_config(cfg)
    paths = stage_paths(cfg)
    tok_dir, out = paths["tokenizer"], paths["encoded"]
    meta = read_json(tok_dir / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer` first")
    model_file = tok_dir / "spm.model"
    tokenizer_sha = sha256_file(model_file)
    if tokenizer_sha != meta["model_sha256"]:
        raise PipelineError(f"{model_file} does not match its sidecar {tok_dir / 'tokenizer.json'} (checksum differs)",
                            "retrain it: `make tokenizer`", "checkpoint-and-tokenizer-mismatch")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as exc:
        raise PipelineError(f"cannot load tokenizer {model_file}: {exc}", "retrain it: `make tokenizer`",
                            "tokenizer-failures") from None
    vocab = sp.get_piece_size()
    dtype = np.uint16 if vocab < 2 ** 16 else np.uint32

    for split in ("train", "val"):
        start = time.perf_counter()
        src = paths["prepared"] / f"{split}.txt"
        if not src.exists():
            raise PipelineError(f"{src} is missing", "run `make prepare` first", "empty-or-corrupted-corpus")
        text = src.read_text(encoding="utf-8")
        tokens = encode_split(sp, text, sp.bos_id(), sp.eos_id(), dtype)
        npy = out / f"{split}.npy"
        with atomic_path(npy, tokens.nbytes) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, tokens)
        source_bytes = len(text.encode("utf-8"))
        sidecar = {
            "split": split,
            "file": npy.name,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "tokens": int(tokens.size),
            "source_bytes": source_bytes,
            "source_sha256": sha256_file(src),
            "tokenizer_sha256": tokenizer_sha,
            "file_sha256": sha256_file(npy),
            "bytes_per_token": round(source_bytes / max(1, tokens.size), 3),
        }
        write_json_atomic(out / f"{split}.json", sidecar)
        log(f"{split}: {human_bytes(source_bytes)} -> {tokens.size:,} tokens ({sidecar['bytes_per_token']} bytes/token, "
            f"{sidecar['dtype']}) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    config = resolve_config(build_parser(), "encode")
    run_stage(main, config, report_time=not config["check_tokenizer"],
              log_file=None if config["check_tokenizer"] else stage_log(config, "encode"))
