"""Training-loop pieces MONAI's engines lack: CPU autocast, gradient clipping, a resumable CSV training log, and
epochs that a resumed run repeats exactly (per-epoch seeds, early-stopping state in the checkpoint)."""

from __future__ import annotations

import csv
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.handlers import EarlyStopHandler
from monai.inferers import Inferer, SimpleInferer

__all__ = [
    "AutocastInferer", "GradientClipping", "NonFiniteLossGuard", "ReproducibleEpochs", "ResumableEarlyStopHandler",
    "TrainingLog", "freeze_parameters", "hardware_description", "read_training_log", "set_threads",
]


def hardware_description(device: torch.device | str | None = None) -> str:
    """One line naming the device the run computes on (GPU model, or CPU model and torch threads)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:  # the model name is only in /proc on Linux
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (``None`` or 0: leave torch's default); returns the number in use."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()


class AutocastInferer(Inferer):
    """Run an inferer under ``torch.autocast`` on the input's device; the output is cast back to float32.

    MONAI's engines autocast only on CUDA (their ``amp`` flag, float16 with a gradient scaler); this one also covers
    the CPU, so one config runs either way. Both default to bfloat16, which needs no gradient scaler. Measure
    before enabling it on a CPU: on the 2-core VM of docs/results/training_step_cpu.csv a bfloat16 training step
    took ~18x longer than a float32 one.

    Args:
        enabled: ``False`` makes this a plain pass-through of ``inferer``.
        cpu_dtype: autocast dtype on the CPU (``torch.bfloat16``).
        cuda_dtype: autocast dtype on CUDA (``torch.bfloat16``).
        inferer: the wrapped inferer (``SimpleInferer`` by default).
    """

    def __init__(
        self, enabled: bool = True, cpu_dtype: torch.dtype = torch.bfloat16, cuda_dtype: torch.dtype = torch.bfloat16,
        inferer: Inferer | None = None,
    ) -> None:
        super().__init__()
        self.enabled, self.cpu_dtype, self.cuda_dtype = bool(enabled), cpu_dtype, cuda_dtype
        self.inferer = inferer or SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        device_type = inputs.device.type
        dtype = self.cuda_dtype if device_type == "cuda" else self.cpu_dtype
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device_type, dtype=dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


class GradientClipping:
    """Clip the gradient norm of a trainer's network after each backward pass (before the optimiser step).

    Args:
        max_norm: largest total gradient norm (``torch.nn.utils.clip_grad_norm_``); ``None`` or 0 disables.
    """

    def __init__(self, max_norm: float | None = 1.0) -> None:
        if max_norm is not None and max_norm < 0:
            raise ValueError(f"max_norm must be >= 0 (0 or None: off), got {max_norm}.")
        self.max_norm = max_norm
        self.last_norm: float | None = None

    def attach(self, engine: Engine) -> None:
        if self.max_norm:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.last_norm = float(torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm))


def batch_description(batch) -> str:
    """The pair(s) of a training batch, by name and files, for error messages."""
    if not isinstance(batch, Mapping):
        return "an unnamed batch"
    parts = []
    for key in ("name", "moving", "fixed"):
        value = batch.get(key)
        meta = getattr(value, "meta", None)
        if meta is not None and "filename_or_obj" in meta:
            value = meta["filename_or_obj"]
        if value is not None and not torch.is_tensor(value):
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "an unnamed batch"


class NonFiniteLossGuard:
    """Stop, or skip the batch, when the training loss is NaN or infinite (checked before the backward pass).

    ``"raise"`` stops the run with an error naming the pair's files; the checkpoints on disk are the last good
    ones (they are written at epoch ends). ``"skip"`` replaces the loss by a constant zero and drops the
    gradients after the backward pass, so that this batch changes no weight (optimisers skip parameters without
    a gradient, momentum included), logs a warning naming the pair and counts it in ``skipped``.

    Args:
        mode: ``"raise"`` or ``"skip"``.
    """

    MODES = ("raise", "skip")

    def __init__(self, mode: str = "raise") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        self.skipped = 0
        self._skip_step = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._drop_gradients)

    def _drop_gradients(self, engine: Engine) -> None:
        if self._skip_step:
            for param in engine.network.parameters():
                param.grad = None
            self._skip_step = False

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output["loss"]
        if bool(torch.isfinite(loss).all()):
            return
        where = batch_description(engine.state.batch)
        message = f"non-finite training loss ({float(loss)}) at iteration {engine.state.iteration} on {where}"
        if self.mode == "raise":
            raise FloatingPointError(message + "; the last checkpoint on disk is the last good one.")
        self.skipped += 1
        self._skip_step = True
        engine.logger.warning(message + "; batch skipped.")
        engine.state.output["loss"] = torch.zeros((), device=loss.device, requires_grad=True)


class ReproducibleEpochs:
    """Make each training epoch a function of the seed, the epoch number and the checkpointed state, so that a run
    resumed from an epoch checkpoint continues exactly as the uninterrupted run.

    Without it, a resumed process replays the random streams of epoch 1: ``set_determinism`` seeds the global
    generators once per process, and MONAI's ``DataLoader`` seeds the dataset's random transforms once
    (``num_workers=0``). At each epoch start this handler seeds Python's, NumPy's and torch's generators and the
    random transforms of ``dataset`` from ``(seed, epoch)``, like ignite's ``DeterministicEngine``, and starts
    a new pass over the data, so that the shuffling and the workers' seeds come from that state too. The new
    pass also matters when ``epoch_length`` is not one pass over the data: ignite would carry a partly used
    iterator into the next epoch, which a resumed process cannot rebuild.

    Args:
        seed: base seed (per process in multi-process training).
        dataset: the training dataset whose random transforms run in the main process (``num_workers=0``;
            MONAI's worker init seeds workers from torch's generator).
    """

    def __init__(self, seed: int = 0, dataset=None) -> None:
        self.seed, self.dataset = int(seed), dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int) -> int:
        """The seed of ``epoch``: ``seed`` and ``epoch`` mixed (``seed + epoch`` would repeat across seeds)."""
        return int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])

    def __call__(self, engine: Engine) -> None:
        seed = self.epoch_seed(engine.state.epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # all devices
        if self.dataset is not None:
            set_rnd(self.dataset, seed)
        epoch_length = engine.state.epoch_length
        # a resumed run starts at an epoch boundary; mid-epoch (an iteration-level checkpoint) ignite keeps its count
        if engine.state.dataloader is not None and epoch_length and engine.state.iteration % epoch_length == 0:
            engine.set_data(engine.state.dataloader)


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` (same arguments) with ``state_dict``/``load_state_dict``, so that the counter of
    validations without improvement and the best score go into the training checkpoint and a resumed run stops
    where the uninterrupted one would (MONAI's handler restarts its patience on every resume).
    """

    def _stopping(self):
        if self._handler is None:
            raise RuntimeError("EarlyStopHandler has no trainer yet: call set_trainer() before saving or restoring it.")
        return self._handler

    def state_dict(self) -> dict:
        return dict(self._stopping().state_dict())

    def load_state_dict(self, state_dict: Mapping) -> None:
        self._stopping().load_state_dict(state_dict)


class TrainingLog:
    """Append training and validation records to a CSV that survives interruption and resumption.

    Every ``interval`` iterations it writes the mean of the loss (and of each unweighted term the loss
    function records in ``last_terms``) over those iterations, the learning rate, the gradient norm (when a
    :class:`GradientClipping` is given), the cumulative wall time and the hardware; after each validation, the
    evaluator's metrics. The cumulative wall time continues from the last row of an existing file, so a
    resumed run keeps one log. Rows are flushed as they are written.

    Args:
        path: the CSV file (created with its folder if absent).
        interval: iterations per training row.
        loss_function: the loss (its ``last_terms`` dict is read after each iteration, when present).
        clipping: the gradient-clipping handler, to log the pre-clipping norm.
        hardware: free text (default: :func:`hardware_description` of the trainer's device).
    """

    FIELDS = ("kind", "iteration", "epoch", "loss", "similarity", "smoothness", "label_dice", "segmentation",
              "grad_norm", "lr", "metrics", "wall_s", "hardware")

    def __init__(
        self, path: str | os.PathLike, interval: int = 10, loss_function=None, clipping: GradientClipping | None = None,
        hardware: str | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.path, self.interval = Path(path), int(interval)
        self.loss_function, self.clipping, self.hardware = loss_function, clipping, hardware
        self._sums: dict[str, float] = {}
        self._count = 0
        self._wall_offset = self._previous_wall_time()
        self._start = time.perf_counter()
        self._trainer: Engine | None = None

    def _previous_wall_time(self) -> float:
        if not self.path.is_file():
            return 0.0
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        try:
            return float(rows[-1]["wall_s"]) if rows else 0.0
        except (KeyError, ValueError) as e:
            raise ValueError(f"training log {self.path} is not a log this handler wrote (no wall_s column).") from e

    def wall_time(self) -> float:
        return self._wall_offset + time.perf_counter() - self._start

    def _write(self, row: Mapping) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in self.FIELDS})

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> None:
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        if evaluator is not None:
            evaluator.add_event_handler(Events.COMPLETED, self._validation)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        if self.hardware is None:
            self.hardware = hardware_description(getattr(engine.state, "device", None))

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
            output = output[0]  # decollated: every item carries the batch loss
        loss = output.get("loss") if isinstance(output, Mapping) else output
        values = {"loss": float(loss)} if loss is not None else {}
        values.update(getattr(self.loss_function, "last_terms", None) or {})
        if self.clipping is not None and self.clipping.last_norm is not None:
            values["grad_norm"] = self.clipping.last_norm
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if engine.state.iteration % self.interval == 0:
            row = {k: f"{v / self._count:.6g}" for k, v in self._sums.items()}
            row.update(kind="train", iteration=engine.state.iteration, epoch=engine.state.epoch,
                       lr=f"{engine.optimizer.param_groups[0]['lr']:.3g}", wall_s=f"{self.wall_time():.1f}",
                       hardware=self.hardware)
            self._write(row)
            self._sums, self._count = {}, 0

    def _validation(self, evaluator: Engine) -> None:
        metrics = {k: round(float(v), 6) for k, v in evaluator.state.metrics.items() if _is_number(v)}
        trainer = self._trainer
        self._write({
            "kind": "validation", "iteration": trainer.state.iteration if trainer else "",
            "epoch": trainer.state.epoch if trainer else "", "metrics": ";".join(f"{k}={v}" for k, v in metrics.items()),
            "wall_s": f"{self.wall_time():.1f}", "hardware": self.hardware,
        })


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def read_training_log(path: str | os.PathLike, latest: bool = False) -> tuple[list[dict], list[dict]]:
    """Training rows and validation rows (metrics parsed into a dict) of a :class:`TrainingLog` CSV.

    Args:
        path: the CSV file.
        latest: keep only the rows of the run that last reached each iteration. The log is append-only, so a run
            stopped between checkpoints leaves rows that its resumed run writes again (from the checkpoint's
            iteration on); with ``latest`` a row drops every earlier row past its iteration and the earlier row of
            its kind at its iteration, which leaves one row per iteration and kind, in iteration order.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if latest:
        kept: list[dict] = []
        for row in rows:
            it = int(row["iteration"])
            kept = [k for k in kept if int(k["iteration"]) < it or (int(k["iteration"]) == it and k["kind"] != row["kind"])]
            kept.append(row)
        rows = kept
    train = [r for r in rows if r["kind"] == "train"]
    val = []
    for r in rows:
        if r["kind"] == "validation":
            metrics = dict(item.split("=", 1) for item in r["metrics"].split(";") if item)
            val.append({**r, "metrics": {k: float(v) for k, v in metrics.items()}})
    return train, val


def freeze_parameters(network: torch.nn.Module, prefixes: Sequence[str]) -> list[torch.nn.Parameter]:
    """Stop training the parameters whose names start with ``prefixes`` (``requires_grad = False``) and return the
    others, for the optimiser (e.g. the segmentation path of a joint model while its λ conditioning is fine-tuned).

    Raises:
        ValueError: a prefix that names no parameter (a misspelling would silently train everything).
    """
    names = [name for name, _ in network.named_parameters()]
    unused = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unused:
        raise ValueError(f"no parameter of {type(network).__name__} starts with {unused}.")
    trainable = []
    for name, parameter in network.named_parameters():
        if name.startswith(tuple(prefixes)):
            parameter.requires_grad_(False)
        else:
            trainable.append(parameter)
    return trainable
