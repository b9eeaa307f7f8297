"""Turn a batch of registration pairs into the network input and the loss targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["RegistrationPrepareBatch"]


class RegistrationPrepareBatch(PrepareBatch):
    """``(inputs, targets)`` for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

    ``inputs`` is ``cat([moving, fixed], dim=1)`` (the network's single-tensor entry); ``targets`` is a dict
    holding the moving and fixed images and whichever label maps the batch has, for the loss.

    Args:
        moving_key, fixed_key: image keys of the batch.
        label_keys: optional label keys passed through to the targets when present.
    """

    def __init__(
        self,
        moving_key: str = "moving",
        fixed_key: str = "fixed",
        label_keys: Sequence[str] = ("moving_label", "fixed_label"),
    ) -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.label_keys = tuple(label_keys)

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
        return torch.cat([moving, fixed], dim=1), targets
