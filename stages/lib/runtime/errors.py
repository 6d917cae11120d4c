"""What a stage can fail with: PipelineError (one clear message: what is wrong, the fix, the
troubleshooting section) and the exit codes every stage uses."""

from __future__ import annotations

TROUBLESHOOTING = "docs/troubleshooting.md"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE = 0, 1, 2, 130, 143, 141


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (BaseException: not caught by `except Exception`)."""


class PipelineError(Exception):
    """An expected failure: printed as one clear message, never as a traceback.

    `section` names the matching part of docs/troubleshooting.md.
    """

    def __init__(self, message: str, fix: str = "", section: str = "", exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.message, self.fix, self.section, self.exit_code = message, fix, section, exit_code

    def __str__(self) -> str:
        text = f"error: {self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        if self.section:
            text += f"\n  see: {TROUBLESHOOTING}#{self.section}"
        return text
