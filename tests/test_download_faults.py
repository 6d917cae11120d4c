"""Real download faults: an endless stream, a huge Content-Length, a full disk (a tmpfs) mid-stream,
a server that trickles, and a partial file that belongs to another URL or to an older copy of the file. The server is a real
HTTP server on 127.0.0.1; every request loop is bounded in bytes and time."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from conftest import assert_clean_failure, make_corpus_text
from faults_helpers import resize, small_disk

FAST_RETRY = {"DOWNLOAD_BACKOFF_S": "0.05"}
MB = 1_000_000


class FaultServer(http.server.ThreadingHTTPServer):
    """/endless: 64 KB blocks without Content-Length until the client leaves (at most 300 MB or 60 s).
    /huge: announces 50 GB, then sends nothing. /file: `body` with `etag`, honouring Range (and, when
    `honour_if_range`, If-Range); `plan` of 'drop' sends half and closes; without `length` the body is
    close-delimited; with `trickle_s`, one byte every `trickle_s` seconds (for 60 s at most)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.body, self.etag, self.plan, self.length, self.honour_if_range = b"", "v1", [], True, True
        self.trickle_s = 0.0
        self.requests: list[dict] = []

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: FaultServer = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")})
        try:
            if self.path == "/endless":
                self.send_response(200)
                self.end_headers()
                block, deadline = b"the endless stream\n" * 3449, time.time() + 60
                for _ in range(300 * MB // len(block)):
                    if time.time() > deadline:
                        break
                    self.wfile.write(block)
            elif self.path == "/huge":
                self.send_response(200)
                self.send_header("Content-Length", str(50 * 10 ** 9))
                self.end_headers()
                self.wfile.flush()
                time.sleep(5)
            else:
                self.serve_file(srv)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def serve_file(self, srv):
        start, rng = 0, self.headers.get("Range")
        fresh = srv.honour_if_range and self.headers.get("If-Range") not in (None, srv.etag)
        if rng and not fresh:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        part = srv.body[start:]
        self.send_header("ETag", srv.etag)
        if srv.length:
            self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if srv.plan and srv.plan.pop(0) == "drop":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if srv.trickle_s:
            deadline = time.time() + 60
            for i in range(len(part)):
                if time.time() > deadline:
                    break
                self.wfile.write(part[i:i + 1])
                self.wfile.flush()
                time.sleep(srv.trickle_s)
            return
        for i in range(0, len(part), 1 << 16):
            self.wfile.write(part[i:i + (1 << 16)])


@pytest.fixture
def fault_server():
    srv = FaultServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def raw_files(ws):
    return sorted(p.name for p in (ws.data / "raw").iterdir()) if (ws.data / "raw").exists() else []


def test_endless_download_stops_at_the_size_limit_and_logs_progress(workspace, fault_server):
    started = time.time()
    result = workspace.run("download.py", "--corpus-url", fault_server.url("/endless"), "--max-download-mb", "30",
                           check=False, timeout=120)
    assert_clean_failure(result, "larger than the download limit of 30 MB", "MAX_DOWNLOAD_MB")
    assert time.time() - started < 60
    assert "downloaded 10.0" in result.stdout and "downloaded 20.0" in result.stdout  # a log shows progress
    assert raw_files(workspace) == [], "nothing of the endless stream is kept"


def test_huge_content_length_is_refused_before_streaming(workspace, fault_server):
    url = fault_server.url("/huge")
    started = time.time()
    over_limit = workspace.run("download.py", "--corpus-url", url, check=False)
    assert_clean_failure(over_limit, "larger than the download limit of 1024 MB", "announces 50.00 GB", "MAX_DOWNLOAD_MB")
    with small_disk(workspace.data, "20m"):
        no_room = workspace.run("download.py", "--corpus-url", url, "--max-download-mb", "100000", check=False)
        assert_clean_failure(no_room, "not enough disk space in", "MB free", "50.00 GB more are needed")
        assert not (workspace.data / "raw" / "corpus.txt.part").exists()
    assert time.time() - started < 20, "refused at once, not after streaming"


def test_disk_full_mid_download_is_explained_and_resumed_after_space_is_freed(workspace, fault_server):
    fault_server.body = (b"In the beginning was a long corpus line.\n" * 150_000)  # 6.2 MB
    fault_server.length = False  # the server does not say how large: only the write finds the disk full
    url = fault_server.url("/file")
    with small_disk(workspace.data, "3m"):
        full = workspace.run("download.py", "--corpus-url", url, check=False)
        assert_clean_failure(full, "not enough disk space in", "free", "the server did not say how large",
                     "resumed next time", "#disk-full")
        part = workspace.data / "raw" / "corpus.txt.part"
        assert part.exists() and part.stat().st_size > 2 * MB
        assert not (workspace.data / "raw" / "corpus.txt").exists()
        resize(workspace.data, "30m")
        workspace.run("download.py", "--corpus-url", url)
        assert (workspace.data / "raw" / "corpus.txt").read_bytes() == fault_server.body
        assert fault_server.requests[-1]["range"].startswith("bytes="), "the second run continues the partial file"
        assert raw_files(workspace) == ["corpus.json", "corpus.txt", "download.log"]


def test_a_trickling_server_is_left_after_the_stall_timeout_and_the_rerun_resumes(workspace, fault_server):
    """One byte every 50 ms answers every read long before the 30 s read timeout: only the minimum rate
    over the stall window (2 s here, 300 s by default) ends it."""
    fault_server.body, fault_server.trickle_s = b"a line of the trickled corpus\n" * 2000, 0.05
    url = fault_server.url("/file")
    started = time.time()
    stalled = workspace.run("download.py", "--corpus-url", url, "--stall-timeout-s", "2", check=False, timeout=120)
    assert time.time() - started < 30, "left after about one stall window, not after the server's 60 s"
    assert_clean_failure(stalled, "stalled", "arrived in the last 2 s, less than 1.00 KB/s", "resumed next time",
                         "--stall-timeout-s", "#corpus-download-fails")
    kept = (workspace.data / "raw" / "corpus.txt.part").read_bytes()
    assert len(kept) >= 10 and fault_server.body.startswith(kept), "every byte that arrived is kept"
    assert f"the {len(kept)} B downloaded so far are kept" in stalled.stderr, "the message counts what arrived"
    assert len(fault_server.requests) == 1, "a stall is not retried"

    fault_server.trickle_s = 0.0
    workspace.run("download.py", "--corpus-url", url)
    assert fault_server.requests[-1]["range"] == f"bytes={len(kept)}-"
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == fault_server.body
    assert raw_files(workspace) == ["corpus.json", "corpus.txt", "download.log"]


def test_partial_download_of_another_url_is_not_spliced_in(workspace, fault_server):
    fault_server.body, fault_server.plan = b"first corpus line\n" * 20_000, ["drop"]
    first = workspace.run("download.py", "--corpus-url", fault_server.url("/file?a"), "--retries", "0",
                          check=False, env=FAST_RETRY)
    assert first.returncode == 1 and (workspace.data / "raw" / "corpus.txt.part").exists()
    fault_server.body = b"second corpus line\n" * 20_000
    out = workspace.run("download.py", "--corpus-url", fault_server.url("/file?b"), env=FAST_RETRY)
    assert "discarding the partial download" in out.stdout and "/file?a" in out.stdout
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == fault_server.body
    assert fault_server.requests[-1]["range"] is None


@pytest.mark.parametrize("honour_if_range", [True, False])
def test_partial_download_of_an_older_copy_starts_afresh(workspace, fault_server, honour_if_range):
    fault_server.honour_if_range = honour_if_range
    fault_server.body, fault_server.plan = b"old text of the file\n" * 20_000, ["drop"]
    url = fault_server.url("/file")
    workspace.run("download.py", "--corpus-url", url, "--retries", "0", check=False, env=FAST_RETRY)
    fault_server.body, fault_server.etag = b"NEW text of the file\n" * 20_000, "v2"
    workspace.run("download.py", "--corpus-url", url, env=FAST_RETRY)
    assert (workspace.data / "raw" / "corpus.txt").read_bytes() == fault_server.body
    assert fault_server.requests[1]["if_range"] == "v1", "the resume names the copy it continues"


def test_an_endless_local_corpus_stops_at_the_size_limit_and_a_pipe_is_read(workspace):
    """--corpus-path names a device that never ends (/dev/zero): read up to the limit, then refused;
    a pipe of a finite text (process substitution, /dev/stdin) is a corpus like any file."""
    endless = workspace.run("download.py", "--corpus-path", "/dev/zero", "--max-download-mb", "5", check=False, timeout=120)
    assert_clean_failure(endless, "/dev/zero is larger than the limit of 5.00 MB", "MAX_DOWNLOAD_MB",
                         "#empty-or-corrupted-corpus")
    assert not (workspace.data / "raw" / "corpus.txt").exists()

    text = make_corpus_text(documents=20)
    workspace.run("download.py", "--corpus-path", "/dev/stdin", input=text)
    assert (workspace.data / "raw" / "corpus.txt").read_text(encoding="utf-8") == text
