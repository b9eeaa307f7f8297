"""The feature-domain term of the bilevel feature-learning seed: a loss plus the KL term of Gaussian features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

__all__ = ["FeatureKLLoss"]


class FeatureKLLoss(_Loss):
    """``loss(pred, target) + kl_weight * KL``, the KL of the network's last forward pass
    (:class:`bundle.networks.ProbabilisticRegistrationUNet`'s ``kl``, one value per pair).

    Ours: MONAI's trainer gives a loss only the prediction and the target, so the term the network computed is read
    from the network itself (the same module instance the trainer runs; a DDP or compile wrapper's ``module`` is
    followed). The reduction over the batch is the wrapped loss's (``"none"``: one value per pair).

    Args:
        loss: the image-domain loss (e.g. :class:`bundle.losses.RegistrationLoss`).
        network: the probabilistic network.
        kl_weight: weight of the KL term (>= 0).

    Raises:
        ValueError: a negative weight, or a network without a ``kl`` attribute.
    """

    def __init__(self, loss: nn.Module, network: nn.Module, kl_weight: float = 0.01) -> None:
        super().__init__(reduction=getattr(loss, "reduction", "mean"))
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        inner = getattr(network, "module", network)
        if not hasattr(inner, "kl"):
            raise ValueError(f"{type(inner).__name__} has no 'kl' term: use a probabilistic network "
                             "(bundle.networks.ProbabilisticRegistrationUNet).")
        self.loss, self.kl_weight = loss, float(kl_weight)
        self._network = (inner,)  # a reference, not a submodule: the network's weights are not the loss's

    @property
    def last_terms(self) -> dict:
        """The wrapped loss's unweighted terms (the training log's columns)."""
        return getattr(self.loss, "last_terms", {})

    def forward(self, pred: torch.Tensor, target) -> torch.Tensor:
        base = self.loss(pred, target)
        kl = self._network[0].kl
        if kl is None:
            raise RuntimeError("the network has not run a forward pass: no KL term to add.")
        if base.ndim:  # one value per pair
            return base + self.kl_weight * kl.to(base)
        return base + self.kl_weight * (kl.sum() if self.reduction == "sum" else kl.mean()).to(base)
