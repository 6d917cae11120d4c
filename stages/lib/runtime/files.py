"""Files: atomic writes (temp file, fsync, rename), JSON reading with clear errors, sha256, sizes.

A crash at any point leaves the previous version of a file (or none), never a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from lib.runtime.errors import PipelineError


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- atomic writes


def disk_full_error(path: Path, needed: int | None = None,
                    kept: str = "the previous version of the file is untouched") -> PipelineError:
    """The one disk-full message: the file, the free space where it was going, what it needed, what is kept."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    need = f"; it needs about {human_bytes(needed)}" if needed else ""
    return PipelineError(
        f"disk full while writing {path} ({human_bytes(shutil.disk_usage(folder).free)} free in {folder}{need}); {kept}",
        f"free some disk space (`df -h {folder}` shows that disk), or point DATA_DIR / ARTIFACTS_DIR at a larger "
        f"disk, and rerun the same command",
        "disk-full",
    )


# numpy writes arrays with fwrite and, on a short write, raises an OSError without errno: "670064 requested
# and 251840 written". A file system only writes less than asked when it is full (or over quota).
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_disk_full(exc: OSError) -> bool:
    """ENOSPC, a full quota, or numpy's errno-less short write."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return exc.errno is None and bool(_SHORT_WRITE.match(str(exc)))


@contextlib.contextmanager
def atomic_path(path: Path, needed_bytes: int | None = None):
    """Yield a temp path beside `path`; on success fsync it and rename it into place.

    A crash or error at any point leaves the old file (or no file), never a
    half-written one under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-write
        with contextlib.suppress(OSError):
            if not _pid_alive(int(stale.name.rsplit("tmp", 1)[1])):
                stale.unlink()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path, needed_bytes) from None
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(tmp: Path) -> None:
    # on a read-only folder even removing a file that was never made fails (EROFS): that second error
    # must not hide the first, which names the real fault
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str, fix: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{what} {path} is missing", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{what} {path} is not valid JSON ({exc})", fix) from None


# ----------------------------------------------------------------------------- locks and file records


class FolderLock:
    """An exclusive flock on a lock file, held while a process works in a folder; the file goes with it."""

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    def close(self) -> None:
        if self.handle.closed:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody else can be holding this file
        self.handle.close()


def lock_folder(path: Path, busy) -> FolderLock:
    """Lock `path` (created if needed) or raise busy(pid of the holder), a PipelineError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise busy(holder) from None
        try:
            same_file = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the previous holder removed it between our open and our lock: try again
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return FolderLock(path, handle)


def file_records(folder: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file under `folder`: what a later check compares against."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damaged_files(folder: Path, records: dict) -> list[str]:
    """The recorded files under `folder` that are missing, or whose size or sha256 differ (size first: cheap)."""
    damaged = []
    for name, want in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            damaged.append(f"{name} (missing)")
        elif path.stat().st_size != want["bytes"]:
            damaged.append(f"{name} ({path.stat().st_size:,} bytes, {want['bytes']:,} when exported)")
        elif sha256_file(path) != want["sha256"]:
            damaged.append(f"{name} (content changed since the export)")
    return damaged
