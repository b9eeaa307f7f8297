"""Turn a batch of registration pairs into the network input and the loss targets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["RegistrationPrepareBatch"]


class RegistrationPrepareBatch(PrepareBatch):
    """``(inputs, targets)`` for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

    ``inputs`` is ``cat([moving, fixed], dim=1)`` (the network's single-tensor entry); ``targets`` is a dict
    holding the moving and fixed images and whichever label maps the batch has, for the loss.

    For a network conditioned on the regularisation weight λ (:class:`bundle.networks.ConditionedRegistrationUNet`)
    a third input channel filled with λ is appended and ``targets["regularisation_weight"]`` (one λ per pair)
    tells the loss which smoothness weight to use: a fixed ``regularisation_weight`` (inference, validation), or
    with ``regularisation_range`` a λ drawn per pair, log-uniformly (training; torch's global generator, so it
    follows the run's seeding).

    Args:
        moving_key, fixed_key: image keys of the batch.
        label_keys: optional label keys passed through to the targets when present.
        regularisation_weight: λ given to a conditioned network (``None``: a plain network, no λ channel).
        regularisation_range: ``(low, high)``: draw λ per pair instead (takes precedence).

    Raises:
        ValueError: a weight that is not > 0, or a range that is not ``0 < low <= high``.
    """

    def __init__(
        self,
        moving_key: str = "moving",
        fixed_key: str = "fixed",
        label_keys: Sequence[str] = ("moving_label", "fixed_label"),
        regularisation_weight: float | None = None,
        regularisation_range: Sequence[float] | None = None,
    ) -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.label_keys = tuple(label_keys)
        if regularisation_weight is not None and not float(regularisation_weight) > 0:
            raise ValueError(f"regularisation_weight must be > 0, got {regularisation_weight}.")
        if regularisation_range is not None:
            low, high = (float(w) for w in regularisation_range)
            if not 0 < low <= high:
                raise ValueError(f"regularisation_range must be (low, high) with 0 < low <= high, got {regularisation_range}.")
            regularisation_range = (low, high)
        self.regularisation_weight = None if regularisation_weight is None else float(regularisation_weight)
        self.regularisation_range = regularisation_range

    def weights(self, batch: int) -> torch.Tensor | None:
        """λ per pair ``(batch,)`` (float32, CPU), or ``None`` for a plain network."""
        if self.regularisation_range is not None:
            low, high = (math.log(w) for w in self.regularisation_range)
            return torch.exp(low + (high - low) * torch.rand(batch, dtype=torch.float64)).float()
        if self.regularisation_weight is not None:
            return torch.full((batch,), self.regularisation_weight)
        return None

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        for key in (self.moving_key, self.fixed_key):
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r} item; keys: {sorted(batchdata)}.")

        def to(key: str) -> torch.Tensor:
            value = convert_to_tensor(batchdata[key], track_meta=False)
            return value.to(device=device, non_blocking=non_blocking, **kwargs)

        moving, fixed = to(self.moving_key), to(self.fixed_key)
        targets = {"moving": moving, "fixed": fixed}
        for key in self.label_keys:
            if key in batchdata:
                targets[key] = to(key)
        weights = self.weights(moving.shape[0])
        if weights is None:
            return torch.cat([moving, fixed], dim=1), targets
        weights = weights.to(device=moving.device, dtype=moving.dtype)
        targets["regularisation_weight"] = weights
        weight_map = weights.view(-1, 1, *([1] * (moving.ndim - 2))).expand(-1, 1, *moving.shape[2:])
        return torch.cat([moving, fixed, weight_map], dim=1), targets
