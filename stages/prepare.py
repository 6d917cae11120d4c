"""Stage 2: validate, clean and split the corpus -> data/prepared/{train,val}.txt + stats.json.

    make prepare
    python stages/prepare.py --val-fraction 0.1 --split-seed 1234

Reads data/raw/corpus.txt (documents separated by blank lines). Refuses a corpus
that is missing, empty, binary (NUL bytes) or not UTF-8 (naming the byte offset).
Cleans each line (Unicode NFC, control characters dropped, whitespace collapsed)
and splits lines longer than --max-line-bytes at whitespace, because SentencePiece
silently skips longer sentences: no text is dropped without being counted.
Then shuffles whole documents with a fixed seed and holds out --val-fraction of
them, so validation text is never seen in training.
"""

from __future__ import annotations

import random
import re
import time
import unicodedata
from pathlib import Path

from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage
from lib.runtime.files import human_bytes, write_json_atomic, write_text_atomic

CORPUS_SECTION = "empty-or-corrupted-corpus"


def build_parser():
    p = stage_parser("prepare", __doc__)
    p.add_argument("--val-fraction", type=float, default=None, help="share of documents held out for validation")
    p.add_argument("--split-seed", type=int, default=None, help="seed of the document shuffle")
    p.add_argument("--max-line-bytes", type=int, default=None, help="split longer lines at whitespace")
    return p


def validate(cfg):
    errors = []
    if not 0.0 < cfg["val_fraction"] < 1.0:
        errors.append(f"val_fraction (--val-fraction) must be within (0, 1), got {cfg['val_fraction']}")
    if not 16 <= cfg["max_line_bytes"] <= 4192:
        errors.append(f"max_line_bytes (--max-line-bytes) must be within [16, 4192] "
                      f"(SentencePiece's max_sentence_length), got {cfg['max_line_bytes']}")
    return errors


def decode_corpus(path: Path) -> str:
    """Read the raw corpus, refusing what cannot be text, with the place of the fault."""
    if not path.exists():
        raise PipelineError(f"corpus {path} does not exist", "run `make download` first (or give CORPUS_PATH=file.txt)",
                            CORPUS_SECTION)
    data = path.read_bytes()
    if not data.strip():
        raise PipelineError(f"corpus {path} is empty ({len(data)} bytes, no text)",
                            "give a UTF-8 text file with CORPUS_PATH=file.txt, or rerun `make download`", CORPUS_SECTION)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise PipelineError(f"corpus {path} looks binary: NUL byte at byte offset {nul}",
                            "give a plain UTF-8 text file (not a PDF, archive or UTF-16 file)", CORPUS_SECTION)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PipelineError(
            f"corpus {path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line})",
            "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`, and rerun", CORPUS_SECTION) from None
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u00ad\u200b\ufeff]")


def clean_line(line: str) -> str:
    line = unicodedata.normalize("NFC", line)
    line = _CONTROL.sub(" ", line)
    return " ".join(line.split())


def _cut_at_char_boundaries(encoded: bytes, max_bytes: int) -> list[str]:
    pieces, start = [], 0
    while start < len(encoded):
        end = min(start + max_bytes, len(encoded))
        while end < len(encoded) and (encoded[end] & 0xC0) == 0x80:  # inside a multi-byte character
            end -= 1
        pieces.append(encoded[start:end].decode("utf-8"))
        start = end
    return pieces


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Cut a line into pieces of at most max_bytes UTF-8 bytes, at spaces where possible."""
    pieces, current, size = [], [], 0
    for word in line.split(" "):
        encoded = word.encode("utf-8")
        if len(encoded) > max_bytes:  # one "word" longer than the limit: cut it between characters
            if current:
                pieces.append(" ".join(current))
                current, size = [], 0
            pieces.extend(_cut_at_char_boundaries(encoded, max_bytes))
            continue
        extra = len(encoded) + (1 if current else 0)
        if current and size + extra > max_bytes:
            pieces.append(" ".join(current))
            current, size, extra = [], 0, len(encoded)
        current.append(word)
        size += extra
    if current:
        pieces.append(" ".join(current))
    return pieces


def clean_documents(text: str, max_line_bytes: int) -> tuple[list[list[str]], int, int]:
    """The documents' cleaned lines, how many lines were too long, and how many pieces splitting them added."""
    documents: list[list[str]] = []
    lines_split = pieces_added = 0
    for block in re.split(r"\n\s*\n", text):
        lines = []
        for raw_line in block.split("\n"):
            line = clean_line(raw_line)
            if not line:
                continue
            if len(line.encode("utf-8")) > max_line_bytes:
                parts = split_long_line(line, max_line_bytes)
                lines_split += 1
                pieces_added += len(parts) - 1
                lines.extend(parts)
            else:
                lines.append(line)
        if lines:
            documents.append(lines)
    return documents, lines_split, pieces_added


def main(cfg):
    log_config(cfg)
    paths = stage_paths(cfg)
    raw, out = paths["raw"] / "corpus.txt", paths["prepared"]
    start = time.perf_counter()
    text = decode_corpus(raw)
    documents, lines_split, pieces_added = clean_documents(text, cfg["max_line_bytes"])

    if not documents:
        raise PipelineError(f"corpus {raw} holds no text after cleaning (only whitespace or control characters)",
                            "give a UTF-8 text file with CORPUS_PATH=file.txt", CORPUS_SECTION)
    if len(documents) < 2:
        raise PipelineError(
            f"corpus {raw} has {len(documents)} document; the train/validation split needs at least 2 "
            f"(documents are separated by blank lines)",
            "add blank lines between documents (chapters, articles, ...) or use a larger corpus", CORPUS_SECTION)

    order = list(range(len(documents)))
    random.Random(cfg["split_seed"]).shuffle(order)
    n_val = min(len(documents) - 1, max(1, round(len(documents) * cfg["val_fraction"])))
    val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])

    def render(ids):
        return "\n\n".join("\n".join(documents[i]) for i in ids) + "\n"

    splits = {"train": render(train_ids), "val": render(val_ids)}
    for name, body in splits.items():
        write_text_atomic(out / f"{name}.txt", body)
    stats = {
        "source_bytes": len(raw.read_bytes()),
        "documents": len(documents),
        "lines_split": lines_split,
        "pieces_added_by_split": pieces_added,
        "max_line_bytes": cfg["max_line_bytes"],
        "val_fraction": cfg["val_fraction"],
        "split_seed": cfg["split_seed"],
        **{f"{name}_documents": len(ids) for name, ids in (("train", train_ids), ("val", val_ids))},
        **{f"{name}_bytes": len(body.encode("utf-8")) for name, body in splits.items()},
        **{f"{name}_lines": body.count("\n") - body.count("\n\n") for name, body in splits.items()},
    }
    write_json_atomic(out / "stats.json", stats)  # last: means both splits are complete
    log(f"{stats['documents']} documents -> train {stats['train_documents']} ({human_bytes(stats['train_bytes'])}), "
        f"val {stats['val_documents']} ({human_bytes(stats['val_bytes'])}); "
        f"{lines_split} lines longer than {cfg['max_line_bytes']} bytes split into {lines_split + pieces_added} pieces; "
        f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    config = resolve_config(build_parser(), "prepare", validate=validate)
    run_stage(main, config, log_file=stage_log(config, "prepare"))
