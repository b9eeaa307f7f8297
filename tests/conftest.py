"""Shared helpers for the end-to-end tests (``test_bundle_e2e.py`` and ``test_real_data.py``).

The bundle commands run as subprocesses (``python -m monai.bundle ...`` with ``sys.executable``) from the
repository root, writing only into pytest temporary folders. Independent commands run two at a time (the
CI machine has 2 cores) through one session-wide :class:`JobGraph`: at the start of the session each
selected module registers its commands with their dependencies (``register_jobs``), the jobs start at
once, and each test waits only for the results it checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if str(REPO_ROOT) not in sys.path:  # `import bundle` in the test process, whatever the cwd
    sys.path.insert(0, str(REPO_ROOT))

# Network grid used by every test run: 4 mm is several times cheaper than the 3 mm default.
PIXDIM = "[4.0,4.0,4.0]"
OUTPUT_FILES = ("warped.nii.gz", "ddf.nii.gz", "jacobian_det.nii.gz", "warped_label.nii.gz")


def config(*names: str) -> str:
    """Absolute path of one config file, or a ``"['a.json','b.json']"`` list for several (fire syntax)."""
    paths = [str(CONFIGS / n) for n in names]
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


def bundle_env(threads: int = 1, pythonpath: str | None = None) -> dict:
    """Environment of a bundle subprocess: CPU only, ``threads`` intra-op threads, no inherited PYTHONPATH.

    One thread per process: the jobs run two at a time on the 2-core CI machine, and 2 OpenMP threads per
    process then oversubscribe the cores (busy-waiting threads made training several times slower).
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        TQDM_DISABLE="1",
    )
    return env


@dataclass
class Result:
    """Outcome of one subprocess: its command, exit status, combined stdout+stderr and duration."""

    args: list
    returncode: int
    output: str
    seconds: float
    log: Path | None = None

    def tail(self, n: int = 4000) -> str:
        return self.output[-n:]

    def check(self) -> Result:
        """Assert success, showing the end of the log otherwise."""
        assert self.returncode == 0, f"command failed ({self.returncode}): {self.args}\n...{self.tail()}"
        return self

    def require(self) -> Result:
        """Like :meth:`check` but with ``pytest.fail``: for xfail tests, whose expected failure is elsewhere."""
        if self.returncode != 0:
            pytest.fail(f"command failed ({self.returncode}): {self.args}\n...{self.tail()}")
        return self

    def check_fails(self, *fragments: str) -> Result:
        """Assert failure with every fragment (plain text, case-sensitive) in the output."""
        assert self.returncode != 0, f"command should have failed: {self.args}\n...{self.tail()}"
        missing = [f for f in fragments if f not in self.output]
        assert not missing, f"error output lacks {missing}:\n...{self.tail(6000)}"
        return self


_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def run(
    args: Sequence,
    cwd: str | os.PathLike = REPO_ROOT,
    timeout: float = 300,
    threads: int = 1,
    pythonpath: str | None = None,
    log: str | os.PathLike | None = None,
    module: str = "monai.bundle",
) -> Result:
    """Run ``python -m <module> *args`` and return its :class:`Result` (the output is also written to ``log``).

    The process gets its own process group, so that it and its children (torchrun's workers) can be
    stopped on a timeout or at the end of the session.
    """
    cmd = [sys.executable, "-m", module, *[str(a) for a in args]]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=str(cwd),
        env=bundle_env(threads, pythonpath),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        _stop(proc)
        output, _ = proc.communicate()
        returncode, output = -9, f"{output}\nTIMEOUT after {timeout} s"
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    result = Result(cmd, returncode, output, time.monotonic() - start, Path(log) if log else None)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"$ {' '.join(cmd)}\n(cwd {cwd}, {result.seconds:.1f} s, rc {returncode})\n{output}")
    return result


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process group of a process started by :func:`run` (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class JobGraph:
    """Run named jobs on ``workers`` threads, each once its dependencies have finished.

    Among the jobs that are ready, the one with the highest ``priority`` starts first (ties: the first
    added). A job is a callable without arguments; a job whose dependency failed still runs (it sees the
    failure when it asks :meth:`result` for that dependency) so that every test gets a clear error.
    ``context`` holds what each test module registered (see :func:`job_graph`).
    """

    def __init__(self, workers: int = 2):
        self.workers = workers
        self.context: dict = {}
        self._jobs: dict[str, tuple[Callable, tuple[str, ...], float]] = {}
        self._futures: dict[str, Future] = {}
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def add(self, name: str, fn: Callable, deps: Iterable[str] = (), priority: float = 0) -> None:
        deps = tuple(deps)
        if name in self._jobs:
            raise ValueError(f"job {name!r} added twice.")
        unknown = [d for d in deps if d not in self._jobs]
        if unknown:
            raise ValueError(f"job {name!r} depends on unknown jobs {unknown} (add those first).")
        with self._cond:
            self._jobs[name] = (fn, deps, priority)
            self._futures[name] = Future()
            self._pending.append(name)
            self._cond.notify_all()

    def start(self) -> JobGraph:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._work, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _next(self) -> str | None:
        with self._cond:
            while True:
                if self._closed or not self._pending:
                    return None
                ready = [n for n in self._pending if all(self._futures[d].done() for d in self._jobs[n][1])]
                if ready:
                    name = max(ready, key=lambda n: self._jobs[n][2])  # first of the highest priority
                    self._pending.remove(name)
                    return name
                self._cond.wait()

    def _work(self) -> None:
        while (name := self._next()) is not None:
            future = self._futures[name]
            try:
                future.set_result(self._jobs[name][0]())
            except BaseException as e:  # reported to the tests that ask for this job
                future.set_exception(e)
            with self._cond:
                self._cond.notify_all()

    def result(self, name: str, timeout: float = 1200):
        """Wait for a job and return its value (re-raises its exception)."""
        return self._futures[name].result(timeout=timeout)

    def close(self) -> None:
        """Drop the jobs not yet started, stop the running commands and wait for the workers."""
        with self._cond:
            self._closed = True
            for name in self._pending:
                self._futures[name].set_exception(RuntimeError(f"job {name!r} cancelled"))
            self._pending.clear()
            self._cond.notify_all()
        with _RUNNING_LOCK:
            running = list(_RUNNING)
        for proc in running:
            _stop(proc)
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture(scope="session")
def job_graph(request, tmp_path_factory):
    """One scheduler for the whole session: every selected test module with a ``register_jobs(graph,
    tmp_path_factory)`` function adds its jobs at the start (its return value is stored in
    ``graph.context[module.__name__]``), so that the commands of both end-to-end modules share the 2 cores."""
    graph = JobGraph(workers=2)
    modules = []
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is not None and module not in modules and hasattr(module, "register_jobs"):
            modules.append(module)
    for module in modules:
        graph.context[module.__name__] = module.register_jobs(graph, tmp_path_factory)
    graph.start()
    yield graph
    graph.close()


def write_zero_checkpoint(
    path: str | os.PathLike, config_files: Sequence[str] = ("inference.json", "joint.json"), flow_bias=None
) -> Path:
    """Write the state dict of a fresh ``network_def`` of ``config_files`` (default: the joint model; its flow layer
    is zero-initialised).

    ``flow_bias`` (one value per spatial axis) sets the bias of the final, zero-weight flow convolution, and
    the network is checked to predict that constant displacement (network voxels) everywhere.

    Raises:
        LookupError: no such flow layer, or the network does not turn that bias into a constant DDF.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in config_files])
    network = parser.get_parsed_content("network_def", instantiate=True)
    state = network.state_dict()
    if flow_bias is not None:
        ndim = len(flow_bias)
        biases = [
            k for k, v in state.items()
            if k.endswith(".bias") and v.shape == (ndim,) and k.removesuffix("bias") + "weight" in state
            and state[k.removesuffix("bias") + "weight"].ndim == ndim + 2
            and torch.count_nonzero(state[k.removesuffix("bias") + "weight"]) == 0
        ]
        if len(biases) != 1:
            raise LookupError(f"no unique zero-initialised flow layer in {type(network).__name__}: {biases}")
        state[biases[0]] = torch.as_tensor(flow_bias, dtype=state[biases[0]].dtype)
        network.load_state_dict(state)
        channels = 2 * int(parser.get_parsed_content("num_channels"))  # a pair (not for the λ-conditioned network)
        size = 2 * getattr(network, "size_divisor", 16)
        with torch.no_grad():
            ddf = network.eval()(torch.rand(1, channels, *([size] * ndim)))[:, :ndim]
        expected = torch.as_tensor(flow_bias, dtype=ddf.dtype).view(1, ndim, *([1] * ndim)).expand_as(ddf)
        if not torch.allclose(ddf, expected, atol=1e-5):
            raise LookupError(f"{type(network).__name__} does not predict a constant DDF from its flow bias")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_random_registration_checkpoint(path: str | os.PathLike, std: float = 0.3, seed: int = 0) -> Path:
    """A plain 3D ``RegistrationUNet`` whose flow layer is random (a non-zero field), saved under ``network``."""
    import torch

    from bundle.networks import RegistrationUNet

    torch.manual_seed(seed)
    net = RegistrationUNet(3, 2)
    torch.nn.init.normal_(net.head.conv.weight, std=std)
    torch.save({"network": net.state_dict()}, path)
    return Path(path)


def write_datalist(path: str | os.PathLike, pairs: list[dict], sections=("testing",)) -> Path:
    """Write an explicit-pairing datalist with the same pairs in each section."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s: pairs for s in sections}, indent=2))
    return path


def save_nifti(array, affine, path: str | os.PathLike) -> str:
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return str(path)


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file; a trailing singleton 4th axis is dropped."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, image.affine


def check_outputs_on_grid(folder: str | os.PathLike, shape: Sequence[int], affine: np.ndarray) -> dict:
    """Assert the 4 inference outputs exist on the given grid; return their arrays."""
    folder = Path(folder)
    missing = [f for f in OUTPUT_FILES if not (folder / f).is_file()]
    assert not missing, f"{folder}: missing outputs {missing} (has {sorted(p.name for p in folder.glob('*'))})"
    arrays = {}
    for name in OUTPUT_FILES:
        image = nib.load(str(folder / name))
        key = name.removesuffix(".nii.gz")
        expected = tuple(shape) + ((1, len(shape)) if key == "ddf" else ())
        assert image.shape == expected, f"{folder / name}: shape {image.shape}, expected {expected}"
        np.testing.assert_allclose(image.affine, affine, atol=1e-4, err_msg=f"{folder / name}: affine != fixed's")
        arrays[key] = np.asarray(image.dataobj)
    return arrays


def dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int]) -> float:
    """Mean Dice of the given label values."""
    scores = []
    for k in labels:
        x, y = a == k, b == k
        denominator = x.sum() + y.sum()
        scores.append(2.0 * (x & y).sum() / denominator if denominator else 1.0)
    return float(np.mean(scores))


def nearest_resample(label: np.ndarray, src_affine, dst_affine, dst_shape, fill=0) -> np.ndarray:
    """Nearest-neighbour resampling of ``label`` onto a destination grid through physical coordinates."""
    mapping = np.linalg.solve(np.asarray(src_affine, float), np.asarray(dst_affine, float))
    idx = np.indices(dst_shape, dtype=np.float64).reshape(len(dst_shape), -1)
    src = mapping[:3, :3] @ idx + mapping[:3, 3:]
    src = np.rint(src).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.array(label.shape)[:, None]), axis=0)
    out = np.full(src.shape[1], fill, dtype=label.dtype)
    out[inside] = label[tuple(src[:, inside])]
    return out.reshape(dst_shape)


def raw_metric_rows(folder: str | os.PathLike, metric: str) -> dict[str, list[float]]:
    """``{item name: [value per class]}`` of a MONAI ``MetricsSaver`` ``<metric>_raw.csv`` (without its mean column)."""
    lines = (Path(folder) / f"{metric}_raw.csv").read_text().splitlines()
    header = re.split(r"[\t,]", lines[0])
    classes = [i for i, name in enumerate(header) if name.startswith("class")]
    rows = [re.split(r"[\t,]", line) for line in lines[1:] if line.strip()]
    return {row[0]: [float(row[i]) for i in classes] for row in rows}


def assert_summary_is_mean_of_pairs(folder: str | os.PathLike, metric: str) -> dict[str, list[float]]:
    """The metric in ``metrics.csv`` is the mean over items and classes (NaN skipped) of its per-item raw values:
    the summary and the per-pair file describe the same computation. Returns the raw rows."""
    import numpy as np

    rows = raw_metric_rows(folder, metric)
    summary = metric_lines(Path(folder) / "metrics.csv")[metric]
    values = np.array([v for row in rows.values() for v in row], dtype=float)
    assert np.isfinite(values).any(), f"{metric}: no finite per-pair value in {folder}"
    assert abs(np.nanmean(values) - summary) < 1e-5, f"{metric}: summary {summary} != mean of {rows}"
    return rows


def metric_lines(csv_path: str | os.PathLike) -> dict[str, float]:
    """``{name: value}`` of a MONAI ``MetricsSaver`` ``metrics.csv`` (one ``name<delim>value`` per line)."""
    values = {}
    for line in Path(csv_path).read_text().splitlines():
        parts = [p for p in re.split(r"[\t,]", line.strip()) if p]
        if len(parts) == 2:
            try:
                values[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return values
