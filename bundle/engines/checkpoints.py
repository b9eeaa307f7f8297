"""Checkpoint loading with clear errors, and resuming an interrupted training run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["load_checkpoint", "latest_checkpoint", "ResumeFromLatest", "load_weights", "network_state_dict"]


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` a checkpoint (``weights_only=True``) into a dict, or raise a clear error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable PyTorch checkpoint holding a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or set ckpt_path).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}).") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a state dict.")
    return dict(ckpt)


def network_state_dict(path: str | os.PathLike) -> dict:
    """The plain network state dict of a checkpoint: plain, or under ``"network"``/``"model"``, DDP's ``module.``
    prefix removed, the best-model saver's ``"checkpointer"`` record dropped.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint`.
    """
    ckpt = load_checkpoint(path)
    state = next((ckpt[k] for k in ("network", "model") if isinstance(ckpt.get(k), Mapping)), ckpt)
    # "checkpointer": the best-model saver's record (CheckpointSaver key_metric_save_state), not weights
    return {k.removeprefix("module."): v for k, v in state.items() if k != "checkpointer"}  # "module.": DDP


def load_weights(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a state dict (plain, or under a ``"network"``/``"model"`` key) into ``network``; returns it.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint`; also a state dict that does not fit.
    """
    state = network_state_dict(path)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the network: {e}") from e
    return network


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> Path | None:
    """Newest ``<prefix>*.pt`` in ``ckpt_dir`` (by modification time), or ``None``."""
    folder = Path(ckpt_dir)
    candidates = sorted(folder.glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return candidates[-1] if candidates else None


class ResumeFromLatest:
    """On ``STARTED``, restore the newest interval checkpoint of ``ckpt_dir`` (if any) with MONAI's loader.

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
