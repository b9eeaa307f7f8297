"""Bad input ends in one clear last line, under ``brainreg`` and under ``python -m monai.bundle run``.

MONAI wraps the errors of transforms and config expressions in ``RuntimeError``s (``applying transform ...``,
``Failed to evaluate ConfigExpression``), so the message that names the file sits deep inside a long traceback.
:func:`input_error` finds it; :func:`install_error_hook` (called by the configs' ``initialize``) makes it the last
line printed. The full traceback is shown for anything else (a bug), or always with ``BRAINREG_TRACEBACK=1``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

__all__ = ["input_error", "install_error_hook", "one_line", "TRACEBACK_ENV"]

TRACEBACK_ENV = "BRAINREG_TRACEBACK"


def input_error(error: BaseException | None) -> BaseException | None:
    """The outermost ``FileNotFoundError`` / ``ValueError`` in ``error``'s chain (ours wrap library errors with the
    file named), or ``None`` when there is none. An error raised in a DataLoader worker process reaches the main
    process as text only (torch re-raises its type with the worker's formatted traceback, without the chain):
    the outermost such error is then rebuilt from that text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, ValueError)) and not _WORKER.match(str(error)):
            return error
        rebuilt = _from_worker(error)
        if rebuilt is not None:
            return rebuilt
        error = error.__cause__ or error.__context__
    return None


# torch's text for an error raised in a DataLoader worker: "Caught <type> in DataLoader worker process <n>."
_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")
_INPUT_LINE = re.compile(r"^(ValueError|FileNotFoundError): (.+)$", re.MULTILINE)


def _input_error_in_worker_text(text: str) -> BaseException | None:
    """The last (outermost) ``ValueError: ...`` / ``FileNotFoundError: ...`` line of a worker's traceback text."""
    if not _WORKER.search(text):
        return None
    found = _INPUT_LINE.findall(text)
    if not found:
        return None
    kind, message = found[-1]
    return {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}[kind](message)


def _from_worker(error: BaseException) -> BaseException | None:
    return _input_error_in_worker_text(str(error)) if _WORKER.match(str(error)) else None


def one_line(error: BaseException) -> str:
    """``"<type>: <line>"`` for a library error quoted inside ours, which must stay one line: the first line of
    its message that says ``error:`` (ITK and torch put one after a preamble), else its first line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    stated = [line for line in lines if "error:" in line.lower()]
    return f"{type(error).__name__}: {(stated or lines)[0]}" if lines else type(error).__name__


def _show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _hook(kind, value, tb) -> None:
    cause = input_error(value)
    if cause is None or _show_tracebacks():
        traceback.print_exception(kind, value, tb)
    if cause is not None:
        print(f"error: {cause}", file=sys.stderr)


_record_factory = None


def _quiet_record(*args, **kwargs) -> logging.LogRecord:
    """Log records of input errors without their traceback (MONAI's and Ignite's handlers log the exception
    before it propagates), unless ``BRAINREG_TRACEBACK`` is set."""
    record = _record_factory(*args, **kwargs)
    if _show_tracebacks():
        return record
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and input_error(error) is not None:
        record.exc_info, record.exc_text = None, None
    # a message that quotes a DataLoader worker's whole traceback (Ignite formats the exception into the text):
    # quote the input error instead
    try:
        message = record.getMessage()
    except Exception:  # a malformed log call: leave it to logging's own error report at emit time
        return record
    quoted = _WORKER.search(message)
    cause = _input_error_in_worker_text(message[quoted.start():]) if quoted else None
    if cause is not None:
        record.msg, record.args = message[: quoted.start()] + str(cause), ()
    return record


def install_error_hook() -> None:
    """Make an input error's message the last line an uncaught exception prints, without tracebacks in
    between (idempotent)."""
    global _record_factory
    sys.excepthook = _hook
    current = logging.getLogRecordFactory()
    if current is not _quiet_record:  # wrap whatever factory is in place, once
        _record_factory = current
        logging.setLogRecordFactory(_quiet_record)
