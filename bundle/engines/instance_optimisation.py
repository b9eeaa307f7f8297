"""Instance-specific optimisation: refine the network's DDF on the pair itself (VoxelMorph TMI, sec. IV-E)."""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from torch.nn.modules.loss import _Loss

__all__ = ["InstanceOptimisationInferer"]


class InstanceOptimisationInferer(Inferer):
    """Run the network, then optimise its DDF for ``steps`` Adam steps on the registration loss of the pair.

    The DDF (the first ``spatial_dims`` output channels; for the joint model the segmentation channels that
    follow are kept as predicted) starts from the network's prediction and is optimised directly on the
    network grid, trading time for accuracy. With ``steps=0`` this is the plain forward pass. For a
    diffeomorphic model the refined field is a plain DDF (no longer the exponential of a velocity).

    Args:
        loss: called as ``loss(prediction, {"moving": ..., "fixed": ...})`` like the training loss, e.g.
            :class:`bundle.losses.RegistrationLoss` or :class:`bundle.losses.JointRegSegLoss` (whose
            tumour masks then come from the predicted segmentations).
        steps: optimisation steps (0 disables it).
        learning_rate: Adam step size, in voxels of the network grid.
        num_channels: channels of each image in the network input ``cat([moving, fixed])``.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self, loss: _Loss, steps: int = 0, learning_rate: float = 0.1, num_channels: int = 1, spatial_dims: int = 3
    ) -> None:
        super().__init__()
        if steps < 0 or learning_rate <= 0:
            raise ValueError(f"steps must be >= 0 and learning_rate > 0, got {steps} and {learning_rate}.")
        self.loss, self.steps, self.learning_rate = loss, int(steps), float(learning_rate)
        self.num_channels, self.spatial_dims = num_channels, spatial_dims

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        prediction = network(inputs, *args, **kwargs)
        if self.steps == 0:
            return prediction
        if inputs.shape[1] != 2 * self.num_channels:
            raise ValueError(f"inputs must be cat([moving, fixed]) with {2 * self.num_channels} channels, got {inputs.shape[1]}.")
        target = {"moving": inputs[:, : self.num_channels].detach(), "fixed": inputs[:, self.num_channels :].detach()}
        rest = prediction[:, self.spatial_dims :].detach()
        with torch.enable_grad():  # evaluators run under no_grad
            ddf = prediction[:, : self.spatial_dims].detach().clone().requires_grad_(True)
            optimiser = torch.optim.Adam([ddf], lr=self.learning_rate)
            for _ in range(self.steps):
                optimiser.zero_grad()
                self.loss(torch.cat([ddf, rest], dim=1), target).backward()
                optimiser.step()
        return torch.cat([ddf.detach(), rest], dim=1)
