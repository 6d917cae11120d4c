"""Stage 3: train a SentencePiece unigram tokenizer -> artifacts/tokenizer/spm.{model,vocab} + tokenizer.json.

    make tokenizer VOCAB_SIZE=8000
    python stages/train_tokenizer.py --vocab-size 8000

Trained on the training split only (the validation text stays unseen). Unigram
language model, not BPE. Special ids: pad=0, unk=1, bos=2, eos=3. With byte
fallback, a character the corpus never showed is encoded as its UTF-8 bytes, so
any text round-trips instead of turning into <unk>. Normalisation is `identity`
(prepare.py already applied NFC), so decode(encode(line)) == line exactly.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import time
from pathlib import Path

from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage
from lib.runtime.files import sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def build_parser():
    p = stage_parser("train_tokenizer", __doc__)
    p.add_argument("--vocab-size", type=int, default=None, help="number of pieces, special and byte pieces included")
    p.add_argument("--character-coverage", type=float, default=None, help="share of characters kept as pieces")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="encode unseen characters as UTF-8 byte pieces")
    p.add_argument("--tokenizer-seed", type=int, default=None, help="seed of SentencePiece's input shuffling")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on at most this many lines of the training split (a random sample beyond it)")
    return p


def validate(cfg):
    errors = []
    minimum = len(SPECIAL_IDS) + (256 if cfg["byte_fallback"] else 0) + 1
    if cfg["vocab_size"] < minimum or cfg["vocab_size"] >= 65536:
        errors.append(f"vocab_size (--vocab-size / VOCAB_SIZE) must be within [{minimum}, 65535] "
                      f"(token files are uint16), got {cfg['vocab_size']}")
    if not 0.9 <= cfg["character_coverage"] <= 1.0:
        errors.append(f"character_coverage (--character-coverage) must be within [0.9, 1.0], got {cfg['character_coverage']}")
    return errors


def round_trip_check(sp, lines: list[str]) -> int:
    failures = [line for line in lines if sp.decode(sp.encode(line)) != line]
    for line in failures[:3]:
        log(f"round-trip FAILED: {line[:80]!r} -> {sp.decode(sp.encode(line))[:80]!r}")
    return len(failures)


def sample_lines(text: str) -> list[str]:
    """A few lines of each language (Spanish spotted by its letters) plus a line the corpus never showed."""
    lines = [line for line in text.splitlines() if line.strip()]
    spanish = [line for line in lines if re.search(r"[áéíóúñ¿¡]", line)]
    english = [line for line in lines if line.isascii()]
    return english[:50] + spanish[:50] + ["Ünïcödé ✓ text the corpus never showed: 東京 €5 — ¿sí? ¡ñandú!"]


def without_paths(model: bytes) -> bytes:
    """The model file with the training paths SentencePiece records in it blanked, so that the same
    text trains the same bytes in any folder (another ARTIFACTS_DIR must not look like another tokenizer)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = "spm"
    return proto.SerializeToString()


def train_model(cfg: dict, train_txt: Path) -> bytes:
    """The trained model file's bytes. SentencePiece hands them over instead of writing files itself: a full
    disk then fails in our writer, which says so, not in SentencePiece's, which wrote a cut-short model
    without a word (the load after it failed with "unk is not defined")."""
    import sentencepiece as spm

    spm.set_random_generator_seed(cfg["tokenizer_seed"])
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=str(train_txt), model_writer=model, model_type="unigram",
            vocab_size=cfg["vocab_size"], character_coverage=cfg["character_coverage"],
            byte_fallback=cfg["byte_fallback"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, max_sentence_length=4192,
            num_threads=os.cpu_count() or 1,
            # at most this many lines, drawn at random from a larger file: bounds memory
            input_sentence_size=cfg["max_sentences"], shuffle_input_sentence=True,
            minloglevel=2, **SPECIAL_IDS,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        )
    except RuntimeError as exc:
        raise training_error(str(exc)) from None
    return model.getvalue()


def training_error(message: str) -> PipelineError:
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message, re.S)
    if too_high:
        return PipelineError(
            f"vocab_size {too_high.group(1)} is larger than this corpus supports: "
            f"SentencePiece reports a maximum of {too_high.group(2)}; nothing was written",
            f"use VOCAB_SIZE={too_high.group(2)} or less (or a larger corpus)", "tokenizer-failures")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return PipelineError(
            f"vocab_size {too_low.group(1)} is too small: this corpus has {too_low.group(2)} distinct characters "
            f"and special pieces, each needing a piece of its own; nothing was written",
            f"use VOCAB_SIZE={too_low.group(2)} or more", "tokenizer-failures")
    return PipelineError(f"SentencePiece training failed: {message.strip()}; nothing was written",
                         "check the corpus and VOCAB_SIZE", "tokenizer-failures")


def vocab_text(model: bytes) -> str:
    """spm.vocab as SentencePiece writes it: each piece and its score (C++'s default float format, %g)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return "".join(f"{piece.piece}\t{piece.score:g}\n" for piece in proto.pieces)


def main(cfg):
    import sentencepiece as spm

    log_config(cfg)
    paths = stage_paths(cfg)
    train_txt, out = paths["prepared"] / "train.txt", paths["tokenizer"]
    if not train_txt.exists():
        raise PipelineError(f"training split {train_txt} is missing", "run `make prepare` first", "tokenizer-failures")
    text = train_txt.read_text(encoding="utf-8")

    start = time.perf_counter()
    model = without_paths(train_model(cfg, train_txt))
    seconds = time.perf_counter() - start
    sp = spm.SentencePieceProcessor(model_proto=model)
    checks = sample_lines(text)
    failures = round_trip_check(sp, checks)
    if failures:
        raise PipelineError(f"tokenizer round-trip failed on {failures} of {len(checks)} lines; nothing was written",
                            "check --byte-fallback and --character-coverage", "tokenizer-failures")
    write_bytes_atomic(out / "spm.model", model)
    write_text_atomic(out / "spm.vocab", vocab_text(model))

    meta = {
        "vocab_size": sp.get_piece_size(),
        "model_sha256": sha256_file(out / "spm.model"),
        "train_seconds": round(seconds, 2),
        "trained_on": str(train_txt),
        "trained_on_bytes": len(text.encode("utf-8")),
        "round_trip_lines_checked": len(checks),
        **SPECIAL_IDS,
        "config": {k: cfg[k] for k in ("vocab_size", "character_coverage", "byte_fallback", "tokenizer_seed",
                                       "max_sentences")},
    }
    write_json_atomic(out / "tokenizer.json", meta)  # last: the sidecar means "tokenizer complete"
    english = next((line for line in checks if line.isascii()), "")
    log(f"vocab {meta['vocab_size']} pieces, trained in {seconds:.1f}s; round-trip ok on {len(checks)} lines (en + es + unseen)")
    if english:
        log(f"example: {english[:60]!r} -> {sp.encode(english[:60], out_type=str)}")


if __name__ == "__main__":
    config = resolve_config(build_parser(), "tokenizer", validate=validate)
    run_stage(main, config, log_file=stage_log(config, "tokenizer"))
