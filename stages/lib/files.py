"""Files: atomic writes (temp file, fsync, rename), JSON reading with clear errors, sha256, sizes.

A crash at any point leaves the previous version of a file (or none), never a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from lib.errors import PipelineError


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


def _disk_full(path: Path, needed: int | None = None) -> PipelineError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    need = f"; it needs about {human_bytes(needed)}" if needed else ""
    return PipelineError(
        f"disk full while writing {path} ({human_bytes(free)} free{need}); the previous version of the file is untouched",
        "free some disk space (or point DATA_DIR / ARTIFACTS_DIR at a larger disk) and rerun the same command",
        "disk-full",
    )


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
        if os.environ.get("FAULT_KILL_BEFORE_RENAME") and os.environ["FAULT_KILL_BEFORE_RENAME"] in path.name:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a complete temp file not yet renamed
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(path, needed_bytes) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def inject_disk_full_fault(path: Path) -> None:
    """Fault hook for tests: FAULT_ENOSPC=<substring of a file name> fails that write."""
    target = os.environ.get("FAULT_ENOSPC")
    if target and target in Path(path).name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        inject_disk_full_fault(path)
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
