"""One HTTP response body streamed into a partial file, within limits: a size limit, the free disk
space and a minimum rate, with a progress log that counts the bytes that really arrived."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

from lib.runtime.errors import PipelineError
from lib.runtime.files import human_bytes, write_json_atomic
from lib.runtime.stage import log

# Below this average rate over a whole stall window, a download counts as stalled (see StallWatch).
MIN_BYTES_PER_S = 1000
DISK_CHECK_BYTES = 4 << 20  # the disk may fill from elsewhere too: look again every few MB


class TooSlow(Exception):
    """The server sent less than MIN_BYTES_PER_S for a whole stall window: the download stops, not retried."""


class StallWatch:
    """Tells a stalled or trickling server from a slow one, across attempts. A read timeout alone cannot:
    a server that sends one byte every 10 s answers every read in time and holds a download for ever."""

    def __init__(self, window_s: float):
        self.window_s, self.arrived = window_s, 0
        self.samples = deque([(time.monotonic(), 0)])  # (when, bytes arrived by then), one per tenth of a window

    def add(self, n: int) -> None:
        self.arrived += n

    def recent(self) -> tuple[int, float]:
        """Bytes that arrived over the last window (or since the start), and the seconds that covers."""
        now = time.monotonic()
        if now - self.samples[-1][0] >= self.window_s / 10:
            self.samples.append((now, self.arrived))
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()  # the oldest sample kept is the newest one at least a window old
        since, arrived_then = self.samples[0]
        return self.arrived - arrived_then, now - since

    def stalled(self) -> bool:
        arrived, seconds = self.recent()
        return seconds >= self.window_s and arrived < MIN_BYTES_PER_S * seconds


class ProgressLog:
    """When output is not a terminal (a log file, CI), a line every 10% or 10 MB instead of tqdm's bar.
    It counts bytes as they came over the wire, the unit of Content-Length; a compressed body
    (Content-Encoding: gzip) also says how much text that decoded into."""

    def __init__(self, total: int | None, have: int, encoded: bool):
        self.total, self.encoded, self.enabled = total, encoded, not sys.stdout.isatty()
        self.step = max(1, total // 10) if total else 10 * 1000 * 1000
        self.next = (have // self.step + 1) * self.step

    def update(self, arrived: int, written: int) -> None:
        if self.enabled and arrived >= self.next:
            share = f" of {human_bytes(self.total)} ({100 * arrived / self.total:.0f}%)" if self.total else ""
            decoded = f", {human_bytes(written)} after decoding" if self.encoded else ""
            log(f"downloaded {human_bytes(arrived)}{share}{decoded}")
            self.next = (arrived // self.step + 1) * self.step


def too_large(url: str, limit_bytes: int, announced: int | None = None, streamed: int | None = None) -> PipelineError:
    what = f"the server announces {human_bytes(announced)}" if announced else f"stopped after {human_bytes(streamed)}"
    return PipelineError(
        f"{url} is larger than the download limit of {limit_bytes / 1e6:g} MB ({what}); nothing is kept",
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


def arriving_blocks(resp, block_bytes: int = 1 << 16):
    """The body, decoded, in the blocks it arrives in. iter_content waits until a whole block is there,
    which a trickling server never fills: the bytes it holds are neither counted nor kept. Errors are
    raised as requests' own, as iter_content would."""
    import urllib3
    from requests import exceptions

    try:
        while block := resp.raw.read1(block_bytes, decode_content=True):
            yield block
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise exceptions.ReadTimeout(exc) from None
    except urllib3.exceptions.DecodeError as exc:
        raise exceptions.ContentDecodingError(exc) from None
    except urllib3.exceptions.SSLError as exc:
        raise exceptions.SSLError(exc) from None
    except urllib3.exceptions.ProtocolError as exc:
        raise exceptions.ChunkedEncodingError(exc) from None


def check_room(folder: Path, needed: int | None, partial: Path) -> None:
    if shutil.disk_usage(folder).free < (needed if needed is not None else 1 << 20):
        raise no_room(folder, needed, partial)


def stream_into(resp, partial: Path, sidecar: Path, server: dict, limit_bytes: int, have: int,
                total: int | None, watch: StallWatch) -> int:
    """Write the response body after the `have` bytes already in `partial`, bound to `server` (its URL
    and version) by the sidecar; return the bytes that came over the wire. Refuse an announced size over
    the limit or the free space at once; stop at the limit (nothing kept), when the disk runs out of room
    or when the server stalls (what arrived is kept, for the next run to resume)."""
    from tqdm import tqdm

    if total is not None and total > limit_bytes:
        partial.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise too_large(server["url"], limit_bytes, announced=total)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if total is not None:
        check_room(partial.parent, total - have, partial)
    write_json_atomic(sidecar, server)
    progress = ProgressLog(total, have, encoded=bool(resp.headers.get("Content-Encoding")))
    written, wire, checked = have, 0, have
    try:
        with open(partial, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc="download", disable=None,
                file=sys.stdout) as bar:
            for block in arriving_blocks(resp):
                written += len(block)
                if written > limit_bytes:
                    out.close()
                    partial.unlink(missing_ok=True)
                    sidecar.unlink(missing_ok=True)
                    raise too_large(server["url"], limit_bytes, streamed=written)
                if written - checked >= DISK_CHECK_BYTES:
                    checked = written
                    out.flush()
                    check_room(partial.parent, total - have - wire if total else None, partial)
                out.write(block)
                arrived = resp.raw.tell() - wire  # on the wire: fewer than `block` when compressed
                wire += arrived
                watch.add(arrived)
                bar.update(arrived)
                progress.update(have + wire, written)
                if watch.stalled():
                    raise TooSlow()
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise no_room(partial.parent, total - partial.stat().st_size if total else None, partial) from None
    return wire
