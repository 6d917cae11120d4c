"""A corpus from a local file or folder: UTF-8 text as it is, HTML turned into text, never more than a size limit."""

from __future__ import annotations

from pathlib import Path

from lib.data.html_text import html_to_text
from lib.runtime.errors import PipelineError
from lib.runtime.files import human_bytes

HTML_SUFFIXES = (".html", ".htm")
CORPUS_SUFFIXES = (".txt", *HTML_SUFFIXES)  # what a CORPUS_PATH folder may hold


def folder_corpus_files(folder: Path) -> list[Path]:
    """The files of a CORPUS_PATH folder that are read, in order: CORPUS_SUFFIXES in any case; `is_file` follows
    links, so a broken link is skipped (check.py lists the same files for make)."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in CORPUS_SUFFIXES and f.is_file())


def read_local(path_arg: str, limit_bytes: int) -> bytes:
    """A UTF-8 text file, or a folder of .txt / .html files (each file ends a document;
    HTML is turned into text, with each h1-h3 section a document of its own), of at most limit_bytes."""
    path = Path(path_arg).expanduser()
    if path.is_dir():
        files = folder_corpus_files(path)
        if not files:
            raise PipelineError(f"folder {path} holds no .txt or .html files",
                                "point CORPUS_PATH at a .txt file or a folder of .txt / .html files",
                                "empty-or-corrupted-corpus")
        texts = []
        for f in files:
            data = read_limited(f, limit_bytes)
            if f.suffix.lower() in HTML_SUFFIXES:
                try:
                    html = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    # .txt files are checked by prepare; HTML must be checked before it becomes text
                    raise PipelineError(f"{f} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}",
                                        "convert it, e.g. `iconv -f latin1 -t utf-8 in.html > out.html`, and rerun",
                                        "empty-or-corrupted-corpus") from None
                data = html_to_text(html).encode("utf-8")
            texts.append(data.rstrip(b"\n"))
        # A blank line keeps files apart.
        return b"\n\n".join(t for t in texts if t.strip()) + b"\n"
    if not path.exists():
        raise PipelineError(f"corpus file {path} does not exist", "check CORPUS_PATH / --corpus-path",
                            "empty-or-corrupted-corpus")
    return read_limited(path, limit_bytes)


def read_limited(path: Path, limit_bytes: int) -> bytes:
    """The file's bytes, refused past the size limit: a device or a pipe (/dev/zero, a process
    that never ends) would otherwise be read until memory runs out."""
    data = bytearray()
    with open(path, "rb") as f:
        while block := f.read(min(1 << 20, limit_bytes + 1 - len(data))):
            data += block
            if len(data) > limit_bytes:
                raise PipelineError(
                    f"corpus {path} is larger than the limit of {human_bytes(limit_bytes)} (stopped reading there); "
                    f"nothing was written",
                    "raise the limit if the corpus is meant to be that large: MAX_DOWNLOAD_MB=N "
                    "(or --max-download-mb N); check CORPUS_PATH if it is not", "empty-or-corrupted-corpus")
    return bytes(data)
