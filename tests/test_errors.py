"""``bundle.errors``: an input error's message is the last line printed, without tracebacks in between."""

from __future__ import annotations

import logging

import pytest

from bundle import errors


def _wrapped(inner: BaseException) -> RuntimeError:
    """``inner`` wrapped twice the way MONAI does (transform, then config expression)."""
    try:
        try:
            raise inner
        except Exception as e:
            raise RuntimeError("applying transform <CheckFinited>") from e
    except Exception as e:
        try:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
        except RuntimeError as outer:
            return outer


def test_input_error_is_the_outermost_file_or_value_error():
    ours = ValueError("moving (a.nii.gz): 2 NaN/Inf voxels")
    assert errors.input_error(_wrapped(ours)) is ours
    try:
        try:
            raise ValueError("Expecting value: line 1")  # a library error that ours wraps naming the file
        except ValueError as e:
            raise ValueError("datalist d.json is not valid JSON") from e
    except ValueError as e:
        assert str(errors.input_error(_wrapped(e))) == "datalist d.json is not valid JSON"
    assert errors.input_error(_wrapped(FileNotFoundError("checkpoint not found: m.pt"))).args == ("checkpoint not found: m.pt",)
    assert errors.input_error(_wrapped(KeyError("a bug"))) is None
    assert errors.input_error(None) is None


def test_hook_prints_one_line_for_input_errors_and_tracebacks_for_bugs(capsys, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    error = _wrapped(ValueError("moving (a.nii.gz): channel 0 is constant"))
    errors._hook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err == "error: moving (a.nii.gz): channel 0 is constant\n"
    bug = _wrapped(KeyError("pred"))
    errors._hook(type(bug), bug, bug.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'pred'" in err and "\nerror:" not in err
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    errors._hook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: moving (a.nii.gz): channel 0 is constant"


@pytest.fixture
def hooked(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    factory = logging.getLogRecordFactory()  # may already be ours: an in-process bundle run installed it
    monkeypatch.setattr(errors, "_record_factory", errors._record_factory)
    errors.install_error_hook()
    errors.install_error_hook()  # idempotent: the factory is wrapped once
    assert logging.getLogRecordFactory() is errors._quiet_record and errors._record_factory is not errors._quiet_record
    yield
    logging.setLogRecordFactory(factory)


def test_logged_input_errors_lose_their_traceback(hooked, caplog, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    logger = logging.getLogger("test_errors")
    for error, kept in ((_wrapped(ValueError("bad file x.nii.gz")), False), (_wrapped(KeyError("bug")), True)):
        try:
            raise error
        except RuntimeError:
            logger.exception("Exception: applying transform")
        assert (caplog.records[-1].exc_info is not None) == kept
