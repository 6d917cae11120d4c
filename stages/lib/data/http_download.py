"""A file downloaded from an http(s) URL: retried with backoff, resumed from a partial file with
Range / If-Range, checked against its SHA-256, and stopped by the limits of http_stream.py."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lib.data.http_stream import MIN_BYTES_PER_S, StallWatch, TooSlow, stream_into
from lib.runtime.errors import PipelineError
from lib.runtime.files import atomic_path, human_bytes, sha256_file
from lib.runtime.stage import log


@dataclass(frozen=True)
class DownloadLimits:
    timeout_s: float        # to connect, and for each read
    retries: int            # attempts after the first
    max_bytes: int          # a larger file is refused (announced) or stopped (streamed)
    stall_timeout_s: float  # a server that sends less than MIN_BYTES_PER_S for this long is left
    backoff_s: float = 1.0  # the wait before the first retry, doubled before each next one


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


def resume_headers(have: int, bound: dict) -> dict:
    """Ask for the bytes after the `have` already kept. Range counts bytes of what the server sends, and
    the partial file holds decoded text: so a resume asks for the file as it is (identity), not compressed."""
    if not have:
        return {}
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"}
    validator = bound.get("etag") or bound.get("last_modified")
    if validator:
        headers["If-Range"] = validator  # the server answers 200 (the whole new file) if its copy changed
    return headers


def fetch_once(url: str, partial: Path, sidecar: Path, limits: DownloadLimits, watch: StallWatch) -> None:
    """One request: continue the partial file of this URL, or start it. A response that ends short of
    its announced length raises ChunkedEncodingError, which the caller retries."""
    import requests

    bound = reusable_partial(url, partial, sidecar)
    have = partial.stat().st_size if partial.exists() else 0
    with requests.get(url, stream=True, headers=resume_headers(have, bound),
                      timeout=(limits.timeout_s, limits.timeout_s)) as resp:
        if resp.status_code == 416 and have:
            log("server says the partial file is already complete")
            return
        if 400 <= resp.status_code < 500:
            raise PipelineError(f"GET {url} answered HTTP {resp.status_code} {resp.reason}",
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
        wire = stream_into(resp, partial, sidecar, server, limits.max_bytes, have, total, watch)
        if total is not None and have + wire < total:
            raise requests.exceptions.ChunkedEncodingError(f"connection closed at {have + wire} of {total} bytes")


def download_url(url: str, dest: Path, limits: DownloadLimits, sha256: str = "") -> None:
    """Stream `url` into `dest`; resume a partial file of the same URL with an HTTP Range request.

    Never fills the disk: a size limit, a free-space check before streaming when the server gives
    Content-Length and every few MB while streaming. Never waits for ever: a timeout per read, a
    bounded number of retries, and a minimum rate over a whole stall window across them.
    """
    import requests

    partial, sidecar = partial_download(dest)
    watch, attempts = StallWatch(limits.stall_timeout_s), limits.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            fetch_once(url, partial, sidecar, limits, watch)
            break
        except TooSlow:
            raise stalled(url, partial, watch) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError, requests.exceptions.HTTPError, RestartDownload) as exc:
            kept = human_bytes(partial.stat().st_size if partial.exists() else 0)
            if attempt == attempts:
                raise PipelineError(
                    f"download of {url} failed after {attempts} attempts: {exc}; {kept} kept in {partial} "
                    f"and resumed next time",
                    "check the network or the server, then rerun the same command (or raise --timeout-s / --retries)",
                    "corpus-download-fails") from None
            if watch.stalled():
                raise stalled(url, partial, watch) from None
            delay = limits.backoff_s * 2 ** (attempt - 1)
            log(f"attempt {attempt}/{attempts} failed ({type(exc).__name__}: {exc}); {kept} so far; "
                f"retrying in {delay:.1f}s")
            time.sleep(delay)
        except requests.exceptions.TooManyRedirects as exc:
            raise PipelineError(f"GET {url} redirects in a loop ({exc})",
                                "check the URL (CORPUS_URL / --corpus-url): its server keeps sending it elsewhere",
                                "corpus-download-fails") from None
        except requests.exceptions.RequestException as exc:  # what a retry cannot mend: a malformed response or URL
            raise PipelineError(f"download of {url} failed: {type(exc).__name__}: {exc}",
                                "check the URL and the server (CORPUS_URL / --corpus-url), then rerun",
                                "corpus-download-fails") from None
    keep_download(url, dest, partial, sidecar, sha256)


def stalled(url: str, partial: Path, watch: StallWatch) -> PipelineError:
    arrived, seconds = watch.recent()
    kept = partial.stat().st_size if partial.exists() else 0
    return PipelineError(
        f"download of {url} stalled: {human_bytes(arrived)} arrived in the last {seconds:.0f} s, less than "
        f"{human_bytes(MIN_BYTES_PER_S)}/s; stopped, the {human_bytes(kept)} downloaded so far are kept in "
        f"{partial} and resumed next time",
        "rerun the same command later, or use another server; to wait longer for a slow one, raise "
        "--stall-timeout-s", "corpus-download-fails")


def keep_download(url: str, dest: Path, partial: Path, sidecar: Path, sha256: str) -> None:
    """The complete partial file becomes `dest`, unless its SHA-256 is not the one expected (then it is discarded)."""
    actual = sha256_file(partial)
    if sha256 and actual != sha256.lower():
        discard_partial(partial, sidecar)
        raise PipelineError(
            f"{url} has sha256 {actual}, expected {sha256.lower()}; the downloaded file was discarded",
            "check CORPUS_SHA256 / --corpus-sha256, or the URL", "corpus-download-fails")
    with atomic_path(dest) as tmp:
        os.replace(partial, tmp)
    sidecar.unlink(missing_ok=True)
