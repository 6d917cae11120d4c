"""The corpus sources, in the pytest process: HTML turned into text (lib/data/html_text.py), and a URL
downloaded from a real HTTP server on 127.0.0.1 in a thread (lib/data/http_download.py, http_stream.py):
resume with Range / If-Range, retries, the size limit, a trickling server, the progress of a gzip body."""

from __future__ import annotations

import gzip
import http.server
import random
import re
import threading
import time

import pytest

from lib.data import http_stream
from lib.data.html_text import html_to_text
from lib.data.http_download import DownloadLimits, download_url
from lib.data.http_stream import StallWatch
from lib.runtime.errors import PipelineError
from lib.runtime.files import human_bytes

# ----------------------------------------------------------------------------- HTML to text


def test_html_blocks_become_lines_and_h1_to_h3_start_documents():
    html = """<html><head><title>Repeated title</title><style>p {color: red}</style></head><body>
      <h1>Genesis</h1><p>In the   beginning
      God created.</p><p>And the earth &amp; the sea&nbsp;were <b>void</b>.</p>
      <h2>Exodus</h2><ul><li>first item</li><li>second<br>line</li></ul><h4>a minor heading</h4><p>more</p>
      <script>var hidden = "never shown";</script></body></html>"""
    assert html_to_text(html) == ("Genesis\nIn the beginning God created.\nAnd the earth & the sea were void."
                                  "\n\nExodus\nfirst item\nsecond\nline\na minor heading\nmore")


def test_html_page_furniture_is_dropped_even_when_nested():
    html = """<body><nav><ul><li>Home</li><li><nav>inner nav</nav>still nav</li></ul></nav>
      <div class="toc"><div><div>1. Chapter one</div></div>2. Chapter two</div>
      <div id="sidebar">links</div><div role="navigation">more links</div>
      <div class="list-of-tables">Table 1</div><div class="content main"><p>The prose itself.</p></div>
      <p class="tocky">a class that only starts like toc is kept</p></body>"""
    assert html_to_text(html) == "The prose itself.\na class that only starts like toc is kept"


def test_html_pre_keeps_its_line_breaks_and_an_unclosed_head_ends_at_body():
    html = "<head><title>never closed<body><p>visible</p><pre>line one\n  line two\n\nline four</pre><p>after</p>"
    assert html_to_text(html) == "visible\nline one\nline two\nline four\nafter"


def test_html_without_blocks_is_one_line_and_an_empty_page_is_empty():
    assert html_to_text("plain <i>text</i> &lt;kept&gt;") == "plain text <kept>"
    assert html_to_text("<html><head><title>t</title></head><body></body></html>") == ""


# ----------------------------------------------------------------------------- a real server in a thread


class FileServer(http.server.ThreadingHTTPServer):
    """Serves `body` (version `etag`) at any path, honouring Range and If-Range. `plan` scripts successive
    requests: 'ok', 'drop' (half the body, then close), '500', 'trickle' (a byte every 50 ms, for 10 s at
    most), 'gzip' (compressed, Content-Encoding: gzip), 'unsized' (no Content-Length). Each request's
    Range, If-Range and Accept-Encoding are noted in `requests`."""

    daemon_threads = True

    def __init__(self, body: bytes):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.body, self.etag, self.plan, self.requests = body, '"v1"', [], []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/corpus.txt"


class FileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the connection closes after each response, so a body may end by closing

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: FileServer = self.server
        srv.requests.append((self.headers.get("Range"), self.headers.get("If-Range"), self.headers.get("Accept-Encoding")))
        action = srv.plan.pop(0) if srv.plan else "ok"
        if action == "500":
            self.send_error(500)
            return
        start, rng = 0, self.headers.get("Range")
        if rng and self.headers.get("If-Range") in (None, srv.etag):
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        part = gzip.compress(srv.body) if action == "gzip" else srv.body[start:]
        self.send_header("ETag", srv.etag)
        if action == "gzip":
            self.send_header("Content-Encoding", "gzip")
        if action != "unsized":
            self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        try:
            self.send_body(action, part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left

    def send_body(self, action: str, part: bytes):
        if action == "drop":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
        elif action == "trickle":
            deadline = time.monotonic() + 10
            for i in range(len(part)):
                if time.monotonic() > deadline:
                    break
                self.wfile.write(part[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self.wfile.write(part)


def corpus_bytes(n_words: int = 30_000, seed: int = 0) -> bytes:
    """Text that compresses about as well as prose does (3 to 4 times), not to nothing."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    return " ".join(rng.choice(words) for _ in range(n_words)).encode() + b"\n"


@pytest.fixture
def server():
    srv = FileServer(corpus_bytes())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def limits(**changes) -> DownloadLimits:
    settings = dict(timeout_s=5.0, retries=2, max_bytes=10 ** 8, stall_timeout_s=30.0, backoff_s=0.01)
    return DownloadLimits(**{**settings, **changes})


def names(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- resume, retries, limits


def test_a_dropped_connection_is_resumed_with_range_and_if_range(server, tmp_path):
    server.plan = ["drop"]
    download_url(server.url, tmp_path / "corpus.txt", limits())
    assert (tmp_path / "corpus.txt").read_bytes() == server.body
    assert server.requests[0][:2] == (None, None)
    # the resume asks for the bytes after the half it has, of the same version, uncompressed
    assert server.requests[1] == (f"bytes={len(server.body) // 2}-", server.etag, "identity")
    assert names(tmp_path) == ["corpus.txt"]


def test_a_partial_file_of_an_older_version_starts_afresh(server, tmp_path):
    server.plan = ["drop"]
    with pytest.raises(PipelineError, match="failed after 1 attempts"):
        download_url(server.url, tmp_path / "corpus.txt", limits(retries=0))
    assert (tmp_path / "corpus.txt.part").stat().st_size == len(server.body) // 2
    server.body, server.etag = corpus_bytes(seed=1), '"v2"'
    download_url(server.url, tmp_path / "corpus.txt", limits())
    assert server.requests[-1][1] == '"v1"', "If-Range names the version the partial file holds"
    assert (tmp_path / "corpus.txt").read_bytes() == server.body  # the server's 200 replaced it, nothing spliced


def test_server_errors_are_retried_a_bounded_number_of_times(server, tmp_path):
    server.plan = ["500", "500"]
    download_url(server.url, tmp_path / "corpus.txt", limits(retries=2))
    assert len(server.requests) == 3 and (tmp_path / "corpus.txt").read_bytes() == server.body

    server.plan, server.requests[:] = ["500"] * 5, []
    with pytest.raises(PipelineError, match="failed after 2 attempts: 500 Server Error"):
        download_url(server.url, tmp_path / "again.txt", limits(retries=1))
    assert len(server.requests) == 2


def test_a_file_over_the_limit_is_refused_when_announced_and_stopped_when_streamed(server, tmp_path):
    limit = len(server.body) // 3
    with pytest.raises(PipelineError, match=r"larger than the download limit .* \(the server announces"):
        download_url(server.url, tmp_path / "corpus.txt", limits(max_bytes=limit))
    assert names(tmp_path) == []

    server.plan = ["unsized"]
    with pytest.raises(PipelineError, match=r"larger than the download limit .* \(stopped after"):
        download_url(server.url, tmp_path / "corpus.txt", limits(max_bytes=limit))
    assert names(tmp_path) == [], "nothing of a file over the limit is kept"


def test_a_checksum_mismatch_discards_the_file(server, tmp_path):
    with pytest.raises(PipelineError, match="expected 0000.*discarded"):
        download_url(server.url, tmp_path / "corpus.txt", limits(), sha256="0" * 64)
    assert names(tmp_path) == []


def test_a_trickling_server_is_left_after_the_stall_timeout_and_the_rest_resumed(server, tmp_path):
    server.plan = ["trickle"]
    started = time.monotonic()
    with pytest.raises(PipelineError, match="stalled") as stopped:
        download_url(server.url, tmp_path / "corpus.txt", limits(stall_timeout_s=1.0))
    assert time.monotonic() - started < 5, "left after about one stall window, not after the server's 10 s"
    kept = (tmp_path / "corpus.txt.part").read_bytes()
    assert len(kept) >= 5 and server.body.startswith(kept), "every byte that arrived is counted and kept"
    assert f"the {human_bytes(len(kept))} downloaded so far are kept" in str(stopped.value)
    assert "--stall-timeout-s" in stopped.value.fix and len(server.requests) == 1  # a stall is not retried

    download_url(server.url, tmp_path / "corpus.txt", limits())
    assert server.requests[-1][0] == f"bytes={len(kept)}-"
    assert (tmp_path / "corpus.txt").read_bytes() == server.body


def test_the_progress_of_a_gzip_body_counts_bytes_on_the_wire(server, tmp_path, capsys):
    server.plan = ["gzip"]
    download_url(server.url, tmp_path / "corpus.txt", limits())
    assert (tmp_path / "corpus.txt").read_bytes() == server.body
    wire = len(gzip.compress(server.body))
    assert len(server.body) > 2 * wire, "the test needs a body that compresses"
    lines = re.findall(r"downloaded (.*) of (.*) \((\d+)%\), (.*) after decoding", capsys.readouterr().out)
    shares = [int(share) for _, _, share, _ in lines]
    assert len(shares) >= 2 and shares[-1] == 100 and shares == sorted(shares), lines  # not 1660% of the wire size
    assert lines[-1][:2] == (human_bytes(wire), human_bytes(wire)) and lines[-1][3] == human_bytes(len(server.body))


# ----------------------------------------------------------------------------- the stall watch, on a fake clock


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(http_stream.time, "monotonic", lambda: now[0])
    return now


def run_at_rate(watch: StallWatch, clock, bytes_per_s: float, seconds: float, step_s: float = 0.5) -> bool:
    """Feed the watch at a steady rate; True as soon as it says stalled."""
    for _ in range(int(seconds / step_s)):
        clock[0] += step_s
        watch.add(int(bytes_per_s * step_s))
        if watch.stalled():
            return True
    return False


def test_stall_watch_leaves_a_trickle_within_a_window_and_keeps_a_slow_steady_download(clock):
    assert not run_at_rate(StallWatch(60), clock, bytes_per_s=1500, seconds=600), "slow but steady is not stalled"
    assert not run_at_rate(StallWatch(60), clock, bytes_per_s=0, seconds=59), "no verdict before a whole window"

    fast_then_trickle = StallWatch(60)
    assert not run_at_rate(fast_then_trickle, clock, bytes_per_s=10 ** 6, seconds=120)
    started = clock[0]
    assert run_at_rate(fast_then_trickle, clock, bytes_per_s=0.1, seconds=600)
    assert 60 <= clock[0] - started <= 66 + 0.5, "a trickle after a fast start is left one window (+10%) later"
