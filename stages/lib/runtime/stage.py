"""How a stage reports: log lines, one clear error message instead of a traceback, exit codes.

Every stage script ends with `run_stage(main, config)`: an expected failure
(PipelineError) prints what is wrong, the fix and the troubleshooting section, and
exits non-zero; Ctrl+C and SIGTERM exit 130 and 143, output into a pipe whose reader left
(`... | head`) 141, each without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

from lib.runtime.errors import EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM, PipelineError, Terminated
from lib.runtime.files import disk_full_error, is_disk_full, write_text_atomic

@contextlib.contextmanager
def signals_held():
    """Ctrl+C and SIGTERM wait until the block is done, then take effect (a cleanup they must not cut short).

    Blocking them with pthread_sigmask is not enough: that holds them for the calling thread only, the
    kernel then hands them to another thread (torch's OpenMP workers), and Python still runs the handler,
    and raises, in the main thread. So the handlers themselves are swapped for ones that only take note.
    """
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # now handled as it would have been (or ignored, if it is ignored now)


# ----------------------------------------------------------------------------- logging

_STAGE = "pipeline"


def set_stage_name(stage: str) -> None:
    """The name every log line of this process starts with, e.g. `[train]`."""
    global _STAGE
    _STAGE = stage


_SILENT = False


def silence_log(stage: str) -> None:
    """Log lines off for this process (training ranks other than 0); its errors still print, under `stage`."""
    global _SILENT
    set_stage_name(stage)
    _SILENT = True


# What the interrupt message says was kept; a stage with something to resume sets its own.
_INTERRUPT_NOTE = "its outputs were not updated"


def set_interrupt_note(note: str) -> None:
    global _INTERRUPT_NOTE
    _INTERRUPT_NOTE = note


# Every line this process logged, for the stage's log file; training also appends each line as it
# comes to its run folder's train.log (kept across resumes, moved with the run).
_LINES: list[str] = []
_APPEND_TO = None


def log(message: str) -> None:
    if _SILENT:
        return
    line = f"[{_STAGE}] {message}"
    print(line, flush=True)
    _LINES.append(line)
    if _APPEND_TO is not None:
        _write_log_lines([line])


def keep_in_log(message: str) -> None:
    """A line for the stage's log file alone, for what the stage prints elsewhere (to stderr)."""
    if _APPEND_TO is not None and not _SILENT:
        _write_log_lines([f"[{_STAGE}] {message}"])


def append_log_to(path: Path) -> None:
    """From now on every log line is also appended to `path`, starting with the lines logged so far."""
    global _APPEND_TO
    try:
        _APPEND_TO = open(path, "a", encoding="utf-8")
    except OSError:
        return  # a log is a convenience: it never stops a stage
    _write_log_lines(_LINES)


def _write_log_lines(lines: list[str]) -> None:
    global _APPEND_TO
    try:
        _APPEND_TO.write("".join(line + "\n" for line in lines))
        _APPEND_TO.flush()
    except OSError:  # a full disk: the checkpoint saves report it; the log stops here
        _APPEND_TO = None


def save_log(path: Path) -> None:
    """The lines of this successful run, written whole (temp file + rename) beside the stage's outputs."""
    try:
        write_text_atomic(path, "".join(line + "\n" for line in _LINES))
    except OSError:
        pass  # the outputs are written; a log that cannot be is not worth failing for


# ----------------------------------------------------------------------------- running a stage


def run_stage(main, cfg: dict, report_time: bool = True, log_file: Path | None = None) -> None:
    """Run `main(cfg)`; turn expected failures into one message and an exit code.

    `log_file`: where a successful run's log lines are kept (e.g. data/raw/download.log).
    """
    # SIGTERM unwinds the stack like Ctrl+C, so that `finally` blocks and temp-file cleanup run. The first
    # one turns both off before it raises: a second Ctrl+C must not cut that cleanup, the message or the
    # exit code short, whichever frame it would land in.
    def _stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    start = time.perf_counter()
    try:
        main(cfg)
    except PipelineError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Terminated) as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # also when a stage's own handler raised it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\n{what}: stage '{_STAGE}' stopped before finishing; {_INTERRUPT_NOTE}. Rerun the same command.",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT)
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):
            raise
        # whoever read the output stopped reading (`... | head`): stop as a writer into a closed pipe does,
        # without a traceback; what is still buffered goes nowhere instead of failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_SIGPIPE)
    except OSError as exc:
        explained = explain_os_error(exc, cfg)
        if explained is None:
            raise
        print(str(explained), file=sys.stderr, flush=True)
        sys.exit(explained.exit_code)
    if report_time:
        log(f"done in {time.perf_counter() - start:.1f}s")
    if log_file is not None:
        save_log(log_file)


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


# The make target of each stage whose name differs from it.
MAKE_TARGETS = {"train_tokenizer": "tokenizer", "figures": "docs"}


def explain_os_error(exc: OSError, cfg=None) -> PipelineError | None:
    """A full disk, a read-only folder or a missing permission, said as what to do; None for anything else."""
    where = Path(exc.filename) if exc.filename else None
    if where is not None and (temp := re.fullmatch(r"\.(.+)\.tmp\d+", where.name)):
        where = where.with_name(temp.group(1))  # atomic_path's temp file: name the file being written
    if is_disk_full(exc):
        return disk_full_error(where or Path("a file"), kept=f"stage '{_STAGE}' stopped and its finished outputs are "
                                                             f"untouched")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the file system is read-only" if exc.errno == errno.EROFS else "permission denied"
        folder = where.parent if where else "the folder"
        return PipelineError(f"cannot write {where or 'a file'}: {why}; stage '{_STAGE}' stopped without changing its "
                             f"outputs", f"make {folder} writable and rerun, or work on a writable copy: "
                                         f"{_writable_copy_command(where, cfg)}",
                             "read-only-folder-or-permission-denied")
    return None


def _writable_copy_command(where: Path | None, cfg) -> str:
    """`cp -a ROOT/. /tmp/ROOT && make TARGET VAR=/tmp/ROOT`, ROOT the DATA_DIR or ARTIFACTS_DIR holding `where`."""
    values = cfg if isinstance(cfg, dict) else vars(cfg) if cfg is not None else {}
    target = MAKE_TARGETS.get(_STAGE, _STAGE)
    for variable, key in (("ARTIFACTS_DIR", "artifacts_dir"), ("DATA_DIR", "data_dir")):
        root = values.get(key)
        if root and where is not None and where.resolve().is_relative_to(Path(root).resolve()):
            copy = f"/tmp/{Path(root).resolve().name}"
            return f"`cp -a {root}/. {copy} && make {target} {variable}={copy}` (with the other variables you gave)"
    return (f"copy the folder somewhere writable and point DATA_DIR or ARTIFACTS_DIR there, e.g. "
            f"`cp -a artifacts/. /tmp/artifacts && make {target} ARTIFACTS_DIR=/tmp/artifacts`")
