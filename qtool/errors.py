"""The exceptions qtool turns into a one-line message and an exit code.

Every error a user can cause or fix derives from :class:`QToolError`. The CLI (``qtool.cli.app``)
catches these, prints ``error: <message>`` on stderr and exits with ``exit_code``; any other
exception is a bug and exits 1 with a short note (``QTOOL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure: a full disk, a failed download, a numeric failure
EXIT_BAD_INPUT = 2  # bad usage or bad input: a missing path, a corrupt file, impossible options


class QToolError(Exception):
    """An error with a message meant for the user: what is wrong, and how to fix it."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInputError(QToolError):
    """The user's input is wrong: options, paths, files. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class SourceNotFoundError(BadInputError):
    """SRC is neither a local folder/file nor a reachable Hub repository."""


class CorruptFileError(BadInputError):
    """A checkpoint or GGUF file is truncated or malformed."""


class UnsupportedError(BadInputError):
    """An architecture, dtype, format or option combination qtool does not handle."""


class OutputError(QToolError):
    """The output cannot be written (read-only location, full disk). Exit code 1."""


class PeerError(QToolError):
    """Under torchrun: another rank stopped (died, failed or was stopped) while this one waited
    for it in a collective. Exit code 1."""
