"""Per-pair progress of inference, refinement and segmentation runs, and where the outputs went."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["PairProgressHandler"]


class PairProgressHandler:
    """One line per pair as it is done (``pair 3/12 <name>: 4.1 s -> <output_dir>/<name>``), then the output
    folder at the end.

    MONAI's ``StatsHandler`` logs metrics, not progress, and ignite's ``ProgressBar`` draws a bar that log lines
    break and that a log file or MONAI Label's server log shows as noise; this prints plain lines (our own for that
    reason). Under ``torchrun`` each process reports its own shard, prefixed with its rank.

    Args:
        output_dir: the run's output folder, printed when the run completes (``None``: not printed).
        name_key: item of each output dict holding the pair's (or image's) name.
        what: the word for one item (``"pair"``, ``"image"``).
        stream: where to print (default: standard output, read at print time).
    """

    def __init__(
        self, output_dir: str | os.PathLike | None = None, name_key: str = "name", what: str = "pair",
        stream: TextIO | None = None,
    ) -> None:
        self.output_dir, self.name_key, self.what, self.stream = output_dir, name_key, what, stream
        self._done, self._last = 0, 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _print(self, text: str) -> None:
        rank = f"[rank {dist.get_rank()}] " if dist.is_available() and dist.is_initialized() else ""
        print(f"{rank}{text}", file=self.stream or sys.stdout, flush=True)

    def _total(self, engine: Engine) -> int | None:
        loader = engine.state.dataloader
        try:
            sampler = getattr(loader, "sampler", None)
            return len(sampler) if sampler is not None else len(loader.dataset)  # a shard under torchrun
        except (AttributeError, TypeError):  # not a DataLoader: the number of items is not known
            return None

    def _started(self, engine: Engine) -> None:
        self._done, self._last = 0, time.monotonic()

    def _iteration_completed(self, engine: Engine) -> None:
        now = time.monotonic()
        names = _names(engine.state.output, self.name_key) or _names(engine.state.batch, self.name_key)
        total = self._total(engine)
        for name in names or ["?"]:
            self._done += 1
            count = f"{self._done}/{total}" if total else f"{self._done}"
            where = f" -> {Path(self.output_dir).resolve() / name}" if self.output_dir is not None and names else ""
            self._print(f"{self.what} {count} {name}: {(now - self._last) / max(1, len(names)):.1f} s{where}")
        self._last = now

    def _completed(self, engine: Engine) -> None:
        if self.output_dir is not None:
            self._print(f"{self._done} {self.what}(s) done; outputs in {Path(self.output_dir).resolve()}")


def _names(output, key: str) -> list[str]:
    """The names of a batch's items: post-processed outputs are a list of dicts (one per item); a collated batch
    is a dict holding a list of names."""
    if isinstance(output, dict):
        output = [output]
    if not isinstance(output, Sequence):
        return []
    names = []
    for item in output:
        value = item.get(key) if isinstance(item, dict) else None
        if isinstance(value, (list, tuple)):
            names.extend(str(v) for v in value)
        elif value is not None:
            names.append(str(value))
    return names
