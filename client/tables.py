"""What the CLIs print: aligned tables for people, JSON under --json, errors, the version."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from moduleserve.client.errors import ModuleServeError, unreachable_sentence
from moduleserve.client.version import package_version, version_text  # noqa: F401  (re-exported)

# What a shell reports for a process stopped by SIGPIPE: `| head` closed the pipe early.
EXIT_BROKEN_PIPE = 141


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def to_json(value: Any) -> str:
    """Pretty JSON; datetimes and other objects become strings."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def human_bytes(size: int) -> str:
    """1536 → "1.5 KiB"."""
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def print_error(message: str, code: str, *, as_json: bool) -> None:
    """One error on stderr: `error: <sentence>`, or under --json the object
    {"error": {"code": <gRPC status name>, "message": <sentence>}} on one line."""
    if as_json:
        text = json.dumps({"error": {"code": code, "message": message}}, sort_keys=True)
    else:
        text = f"error: {message}"
    print(text, file=sys.stderr)


def os_error_code(exc: OSError) -> str:
    """The status name of a local file problem, for JSON error objects."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "NOT_FOUND"
    if isinstance(exc, PermissionError):
        return "PERMISSION_DENIED"
    return "UNKNOWN"


def report_error(exc: Exception, args: argparse.Namespace) -> int:
    """Print an expected failure of a `moduleserve` command as one sentence; returns 1.

    A server that could not be reached is named by the --target given; --debug adds the
    traceback. A closed stdout is not a failure to report: it goes on to `run_main`.
    """
    if isinstance(exc, BrokenPipeError):
        raise exc
    if getattr(args, "debug", False):
        traceback.print_exc()
    code, message = "INVALID_ARGUMENT", str(exc)
    if isinstance(exc, ModuleServeError):
        code = exc.code.name
        target = getattr(args, "target", None)
        if target and code == "UNAVAILABLE":
            message = unreachable_sentence(target, exc.details) or message
    elif isinstance(exc, OSError):
        code = os_error_code(exc)
    print_error(message, code, as_json=getattr(args, "json", False))
    return 1


def run_main(body: Callable[[], int]) -> int:
    """Run a CLI's body; a reader that went away (`| head`) ends it quietly with 141."""
    try:
        try:
            return body()
        finally:
            # Output to a pipe is block-buffered: flush here, where a closed pipe can be
            # caught, instead of at interpreter exit, where Python prints a traceback.
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (in-process tests)
        pass


class ToDict:
    """Mixin for the client's frozen dataclasses: `to_dict()` for JSON output."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data, ready for JSON."""
        data: dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]  # mixin
        return data
