"""The upper level of the architecture search (AutoReg / first-order DARTS) as an Ignite handler on the trainer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch
from ignite.engine import Engine, Events

from bundle.io.writers import write_atomic

__all__ = ["ArchitectureSearchStep"]


class ArchitectureSearchStep:
    """After every ``every`` training iterations, one Adam step on the architecture weights α of a
    :class:`bundle.networks.SearchableRegistrationUNet`, on a pair from ``data_loader`` (the search's upper level,
    the validation pairs), with the trainer's own ``prepare_batch``, inferer and loss; the trainer's optimizer
    holds the other weights only (``network.weight_parameters()``), trained on the training pairs (the lower level).
    First-order DARTS (Liu et al. 2019): the α gradient does not differentiate through the weights' update. The
    trainer zeroes every gradient before its own step, so the weights' gradients of this step are not applied.

    At the end of every epoch the current genotype (the operation of highest α per block) and softmax(α) are written
    atomically to ``genotype_file``. ``state_dict``/``load_state_dict`` carry the α optimizer, so the search resumes
    from a checkpoint like the training (add this handler to the checkpoint's ``save_dict``/``load_dict``).

    Args:
        network: the searchable network (the instance the trainer runs).
        data_loader: the pairs of the upper level (cycled).
        learning_rate, weight_decay: Adam on α (DARTS: 3e-4 and 1e-3, betas (0.5, 0.999)).
        every: iterations between α steps.
        genotype_file: where the genotype is written (``None``: not written).
    """

    def __init__(self, network: torch.nn.Module, data_loader: Iterable, learning_rate: float = 3e-4,
                 weight_decay: float = 1e-3, every: int = 1, genotype_file: str | os.PathLike | None = None) -> None:
        if not hasattr(network, "arch_parameters"):
            raise ValueError(f"{type(network).__name__} has no architecture parameters: use "
                             "bundle.networks.SearchableRegistrationUNet.")
        if every < 1 or learning_rate <= 0:
            raise ValueError(f"every must be >= 1 and learning_rate > 0, got {every} and {learning_rate}.")
        self.network, self.data_loader, self.every = network, data_loader, int(every)
        self.optimizer = torch.optim.Adam(network.arch_parameters(), lr=learning_rate, betas=(0.5, 0.999),
                                          weight_decay=weight_decay)
        self.genotype_file = genotype_file
        self.last_loss: float | None = None
        self._batches: Iterator | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_genotype)

    def _next_batch(self):
        try:
            return next(self._batches) if self._batches is not None else next(self._restart())
        except StopIteration:
            return next(self._restart())

    def _restart(self) -> Iterator:
        self._batches = iter(self.data_loader)
        return self._batches

    def step(self, engine: Engine) -> None:
        inputs, targets = engine.prepare_batch(self._next_batch(), engine.state.device, engine.non_blocking)[:2]
        self.optimizer.zero_grad(set_to_none=True)
        # the loss keeps its last call's terms for the training log: that must stay the training step's, not this one's
        kept = vars(engine.loss_function).get("last_terms") if hasattr(engine.loss_function, "__dict__") else None
        loss = engine.loss_function(engine.inferer(inputs, engine.network), targets)
        if kept is not None:
            engine.loss_function.last_terms = kept
        loss.backward()
        self.optimizer.step()
        self.last_loss = float(loss.detach())

    def write_genotype(self, engine: Engine) -> None:
        if self.genotype_file is None:
            return
        record = {"iteration": engine.state.iteration, "genotype": self.network.genotype(),
                  "operation_weights": self.network.operation_weights(), "upper_level_loss": self.last_loss}
        def write(tmp: str) -> None:
            with open(tmp, "w") as fh:
                json.dump(record, fh, indent=1)

        write_atomic(self.genotype_file, ".json", write)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
