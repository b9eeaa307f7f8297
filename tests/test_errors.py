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


def test_an_input_error_raised_in_a_dataloader_worker_is_found_in_its_text():
    """torch re-raises a worker's error with the worker's traceback as text (no chain): the outermost input error
    is rebuilt from it; a worker's bug stays a bug."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Failing(Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise _wrapped(self.inner)

    for inner, expected in ((ValueError("moving (a.nii.gz): 2 NaN/Inf voxels"), ValueError),
                            (FileNotFoundError("image not found: b.nii.gz"), FileNotFoundError)):
        with pytest.raises(RuntimeError, match="DataLoader worker process") as caught:
            list(DataLoader(Failing(inner), num_workers=1))
        found = errors.input_error(caught.value)
        assert type(found) is expected and str(found) == str(inner)
    with pytest.raises(RuntimeError) as caught:
        list(DataLoader(Failing(KeyError("a bug")), num_workers=1))
    assert errors.input_error(caught.value) is None
    assert torch.utils.data.get_worker_info() is None


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


def test_a_logged_worker_error_quotes_the_input_error_not_the_workers_traceback(hooked, caplog, monkeypatch):
    from torch.utils.data import DataLoader, Dataset

    class Failing(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise _wrapped(ValueError("moving (a.nii.gz): 1 NaN/Inf voxels"))

    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    logger = logging.getLogger("test_errors")
    try:
        list(DataLoader(Failing(), num_workers=1))
    except RuntimeError as e:
        logger.error("Engine run is terminating due to exception: %s", e, exc_info=True)
        logger.error(f"Current run is terminating due to exception: {e}")  # Ignite's way: the text, no exc_info
        logger.error(f"Exception: {_wrapped(KeyError('a bug'))}")  # not a worker's input error: kept as it is
    first, second, third = caplog.records[-3:]
    assert first.exc_info is None
    assert first.getMessage() == "Engine run is terminating due to exception: moving (a.nii.gz): 1 NaN/Inf voxels"
    assert second.getMessage() == "Current run is terminating due to exception: moving (a.nii.gz): 1 NaN/Inf voxels"
    assert third.getMessage() == "Exception: Failed to evaluate ConfigExpression"


def test_a_malformed_log_call_is_left_to_logging(hooked, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    record = logging.getLogRecordFactory()("x", logging.ERROR, __file__, 1, "%d items", ("many",), None)
    assert record.msg == "%d items" and record.args == ("many",)  # not raised here: logging reports it when emitting
