"""Checkpoint loading with clear errors, crash-safe checkpoint saving, and resuming an interrupted training run."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from bundle.errors import one_line
from bundle.io.readers import is_file
from bundle.io.writers import write_atomic

__all__ = [
    "AtomicCheckpointSaver", "AtomicDiskSaver", "load_checkpoint", "latest_checkpoint", "ResumeFromLatest",
    "load_weights", "network_state_dict",
]

# write_atomic's temporary files: ".<file name>.<random>.tmp" next to the checkpoint
_TEMP_SUFFIX = ".tmp"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` a checkpoint (``weights_only=True``) into a dict, or raise a clear error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable PyTorch checkpoint holding a dict.
    """
    path = Path(path)
    if not is_file(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or set ckpt_path).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint {path} is unreadable ({_load_failure(e)}).") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a state dict.")
    return dict(ckpt)


def _load_failure(error: Exception) -> str:
    """What went wrong, in one line: torch's weights-only refusal is reduced to its reason (its own text asks
    the reader to file an issue with torch and suggests ``weights_only=False``, neither of which applies here)."""
    text = str(error)
    if "Weights only load failed" in text:
        reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        reason = " ".join(reason.split()) if "WeightsUnpickler error:" in text else ""
        reason = reason or "unsupported content"
        return f"not a PyTorch checkpoint of tensors and plain containers; torch's safe loader says: {reason}"
    return one_line(error)


def network_state_dict(path: str | os.PathLike) -> dict:
    """The plain network state dict of a checkpoint: plain, or under ``"network"``/``"model"``, DDP's ``module.``
    prefix removed, the best-model saver's ``"checkpointer"`` record dropped.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint`; also keys that are not parameter names, and
            NaN/Inf weights (a diverged run's checkpoint would give NaN outputs without an error).
    """
    ckpt = load_checkpoint(path)
    state = next((ckpt[k] for k in ("network", "model") if isinstance(ckpt.get(k), Mapping)), ckpt)
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise ValueError(f"checkpoint {path} is not a state dict: key {names[0]!r} is not a parameter name.")
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if names:
        raise ValueError(f"checkpoint {path} holds NaN/Inf weights ({len(names)} tensors, e.g. {names[0]!r}); "
                         "a diverged training run? Use an earlier checkpoint.")
    # "checkpointer": the best-model saver's record (CheckpointSaver key_metric_save_state), not weights
    return {k.removeprefix("module."): v for k, v in state.items() if k != "checkpointer"}  # "module.": DDP


def load_weights(
    network: torch.nn.Module, path: str | os.PathLike, missing_ok: Sequence[str] = (), unexpected_ok: Sequence[str] = ()
) -> torch.nn.Module:
    """Load a state dict (plain, or under a ``"network"``/``"model"`` key) into ``network``; returns it.

    Args:
        missing_ok: key prefixes of ``network`` that the checkpoint may lack; they keep their initial values
            (e.g. the zero-initialised FiLM layers of :class:`bundle.networks.ConditionedRegistrationUNet` when it
            starts from a plain network's weights). Every other key must be present and fit.
        unexpected_ok: key prefixes of the checkpoint that ``network`` may lack; they are dropped (e.g. the λ
            conditioning of :class:`bundle.networks.ConditionedJointRegSegNet` when only its segmentation path,
            which λ never changes, is built). Every other checkpoint key must belong to ``network``.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint`; also a state dict that does not fit.
    """
    state = network_state_dict(path)
    dropped = tuple(unexpected_ok)
    if dropped:
        own = network.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(dropped)}
    prefixes = tuple(missing_ok)
    if prefixes:
        own = network.state_dict()
        state = {**{k: v for k, v in own.items() if k.startswith(prefixes) and k not in state}, **state}
    try:
        network.load_state_dict(state)
    # torch lists every missing, unexpected and mismatched key over many lines; ValueError: a module's extra state
    except (RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise ValueError(f"checkpoint {path} does not fit the network: {detail}") from e
    return network


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """Newest ``<prefix>*.pt`` in ``ckpt_dir`` (by modification time), or ``None``.

    Files written within one tick of the file system's clock share a modification time; among those the
    one whose name ends in the largest number (ignite's ``checkpoint_epoch=N.pt``) is the newest.
    """
    folder = Path(ckpt_dir)
    candidates = sorted(folder.glob(f"{prefix}*.pt"), key=_save_order) if folder.is_dir() else []
    return candidates[-1] if candidates else None


def _save_order(path: Path) -> tuple[int, int]:
    number = re.search(r"(\d+)\.pt$", path.name)
    return path.stat().st_mtime_ns, int(number.group(1)) if number else -1


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` that never leaves a truncated or a missing newest checkpoint when the process dies.

    Each file is written to a hidden temporary file in the same folder and renamed over its name, so a kill
    while saving leaves the previous file whole. Ignite's ``Checkpoint`` removes the file it replaces *before*
    writing the new one (with ``n_saved=1``, a kill in between would leave no checkpoint at all); here
    removals wait until the next file is on disk.

    Args:
        dirname: the checkpoint folder (created if absent).
        filename: a fixed file name for every save (MONAI's ``key_metric_filename``, e.g. ``model.pt``), or
            ``None`` for ignite's names (``checkpoint_epoch=N.pt``).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._stale: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        stale, self._stale = self._stale, []
        for name in stale:
            if name != filename and idist.get_rank() == self.save_on_rank:
                (self.dirname / name).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        write_atomic(path, _TEMP_SUFFIX, lambda tmp: func(checkpoint, tmp, **self.kwargs))

    def remove(self, filename: str) -> None:
        self._stale.append(self.filename or filename)  # deleted once the next checkpoint is written


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing through :class:`AtomicDiskSaver`.

    MONAI's saver writes in place (``atomic=False``) and, like ignite, deletes the previous checkpoint before
    writing the next: a kill at that moment left a truncated newest checkpoint, or none, for the next run to
    resume from.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)


class ResumeFromLatest:
    """On ``STARTED``, restore the newest interval checkpoint of ``ckpt_dir`` (if any) with MONAI's loader.

    Temporary files of a save that a kill interrupted (see :class:`AtomicDiskSaver`) are removed first.
    When resuming, the best-model saver's record of the best key metric is restored too (from the
    ``"checkpointer"`` entry that ``CheckpointSaver(key_metric_save_state=True)`` stores in the best model),
    so the resumed run does not overwrite the best model with a worse one.

    Args:
        ckpt_dir: folder where ``CheckpointSaver`` writes its interval checkpoints.
        load_dict: objects to restore, e.g. ``{"network": ..., "optimizer": ..., "trainer": ...}``.
        prefix: file name prefix of the interval checkpoints.
        enabled: set ``False`` to start from scratch even if checkpoints exist.
        best_checkpoint: the best-model file written by ``best_saver``.
        best_saver: the validation ``CheckpointSaver`` that keeps the best model.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        load_dict: dict,
        prefix: str = "checkpoint",
        enabled: bool = True,
        best_checkpoint: str | os.PathLike | None = None,
        best_saver: CheckpointSaver | None = None,
    ):
        self.ckpt_dir, self.load_dict, self.prefix, self.enabled = ckpt_dir, load_dict, prefix, enabled
        self.best_checkpoint, self.best_saver = best_checkpoint, best_saver

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # no save is in progress at STARTED: the savers write at epoch ends, on one process (rank 0)
        for tmp in Path(self.ckpt_dir).glob(f".*.pt.*{_TEMP_SUFFIX}"):
            engine.logger.info(f"removing {tmp}, left by an interrupted save")
            tmp.unlink(missing_ok=True)
        path = latest_checkpoint(self.ckpt_dir, self.prefix) if self.enabled else None
        if path is None:
            return
        stored = load_checkpoint(path)  # clear error for a corrupt file before ignite's own
        # objects a checkpoint of an earlier version does not hold (e.g. the LR scheduler) keep their fresh state
        missing = [k for k in self.load_dict if k not in stored and k != "network"]
        if missing:
            engine.logger.warning(f"{path} holds no {missing}: they start afresh.")
        load_dict = {k: v for k, v in self.load_dict.items() if k not in missing}
        engine.logger.info(f"resuming from {path}")
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location="cpu")(engine)
        if self.best_saver is not None and self.best_checkpoint is not None and Path(self.best_checkpoint).is_file():
            state = load_checkpoint(self.best_checkpoint).get("checkpointer")
            if state is not None:
                self.best_saver.load_state_dict(state)
