"""Instance-specific optimisation: refine the network's DDF on the pair itself (VoxelMorph TMI, sec. IV-E)."""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from monai.networks.blocks.warp import DVF2DDF
from torch.nn.modules.loss import _Loss

from bundle.networks.outputs import join_ddf, split_ddf
from bundle.spatial import compose_ddf, resize_field

__all__ = ["InstanceOptimisationInferer", "RESIDUALS"]

RESIDUALS = ("ddf", "svf")


class InstanceOptimisationInferer(Inferer):
    """Run the network, then refine its DDF for ``steps`` Adam steps on the registration loss of the pair.

    The DDF (the first ``spatial_dims`` output channels; for the joint model the segmentation channels that
    follow are kept as predicted) is refined on the network grid, trading time for accuracy. With
    ``steps=0`` this is the plain forward pass. Two parameterisations of the refinement:

    - ``residual="ddf"``: the DDF itself is optimised voxel-wise, starting from the network's prediction
      (VoxelMorph TMI). Fast to converge, but nothing keeps the map invertible.
    - ``residual="svf"``: a stationary velocity field ``v`` (starting at zero) is optimised and the result
      is the network's map composed with its exponential, ``phi = phi_net o exp(v)``, i.e.
      ``ddf(x) = u_v(x) + ddf_net(x + u_v(x))`` with ``u_v`` integrated by scaling and squaring. ``exp(v)``
      is diffeomorphic, so the refinement adds no folding to the network's field. With
      ``integration_downsample=f > 1`` the velocity lives on a grid ``f`` times coarser and is integrated
      there, then upsampled (VoxelMorph's ``int_downsize``): the similarity is still computed on the full
      grid, at a fraction of the cost (scaling and squaring dominates the step otherwise).

    Args:
        loss: called as ``loss(prediction, {"moving": ..., "fixed": ...})`` like the training loss, e.g.
            :class:`bundle.losses.RegistrationLoss` or :class:`bundle.losses.JointRegSegLoss` (whose
            tumour masks then come from the predicted segmentations).
        steps: optimisation steps (0 disables it).
        learning_rate: Adam step size, in voxels of the network grid.
        num_channels: channels of each image in the network input ``cat([moving, fixed])``.
        spatial_dims: 2 or 3.
        residual: ``"ddf"`` or ``"svf"`` (see above).
        integration_steps: scaling-and-squaring steps of ``exp(v)`` for ``residual="svf"``.
        integration_downsample: the velocity's grid is this many times coarser (``residual="svf"`` only).
        progress_every: print ``refinement step k/steps: loss L`` every this many steps (0: silent).

    Raises:
        ValueError: negative ``steps``, non-positive ``learning_rate``, unknown ``residual``,
            ``integration_downsample`` < 1 or used with ``residual="ddf"``.
    """

    def __init__(
        self,
        loss: _Loss,
        steps: int = 0,
        learning_rate: float = 0.1,
        num_channels: int = 1,
        spatial_dims: int = 3,
        residual: str = "ddf",
        integration_steps: int = 7,
        integration_downsample: int = 1,
        progress_every: int = 0,
    ) -> None:
        super().__init__()
        self.progress_every = max(0, int(progress_every))
        if steps < 0 or learning_rate <= 0:
            raise ValueError(f"steps must be >= 0 and learning_rate > 0, got {steps} and {learning_rate}.")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}.")
        if int(integration_downsample) != integration_downsample or integration_downsample < 1:
            raise ValueError(f"integration_downsample must be an integer >= 1, got {integration_downsample}.")
        if integration_downsample > 1 and residual != "svf":
            raise ValueError("integration_downsample > 1 needs residual='svf'.")
        self.integration_downsample = int(integration_downsample)
        self.loss, self.steps, self.learning_rate = loss, int(steps), float(learning_rate)
        self.num_channels, self.spatial_dims, self.residual = num_channels, spatial_dims, residual
        self.integrate = DVF2DDF(num_steps=integration_steps) if residual == "svf" else None

    def _refined(self, start: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
        """The DDF given the optimised parameter: the DDF itself, or ``start o exp(parameter)``."""
        if self.integrate is None:
            return parameter
        residual = self.integrate(parameter)
        if residual.shape[2:] != start.shape[2:]:
            residual = resize_field(residual, start.shape[2:])
        return compose_ddf(start, residual)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        prediction = network(inputs, *args, **kwargs)
        if self.steps == 0:
            return prediction
        if inputs.shape[1] not in (2 * self.num_channels, 2 * self.num_channels + 1):
            raise ValueError(f"inputs must be cat([moving, fixed]) with {2 * self.num_channels} channels (plus the "
                             f"regularisation weight map of a conditioned network), got {inputs.shape[1]}.")
        inputs = inputs[:, : 2 * self.num_channels]  # the images (a conditioned network's λ map is not refined)
        target = {"moving": inputs[:, : self.num_channels].detach(), "fixed": inputs[:, self.num_channels :].detach()}
        start, rest = split_ddf(torch.as_tensor(prediction).detach(), self.spatial_dims)
        start = start.clone()
        with torch.enable_grad():  # evaluators run under no_grad
            if self.integrate is None:
                parameter = start.clone()
            else:
                coarse = [-(-size // self.integration_downsample) for size in start.shape[2:]]  # ceil
                parameter = start.new_zeros(*start.shape[:2], *coarse)
            parameter.requires_grad_(True)
            optimiser = torch.optim.Adam([parameter], lr=self.learning_rate)
            for step in range(1, self.steps + 1):
                optimiser.zero_grad()
                loss = self.loss(join_ddf(self._refined(start, parameter), rest), target)
                loss.backward()
                optimiser.step()
                if self.progress_every and (step % self.progress_every == 0 or step == self.steps):
                    print(f"refinement step {step}/{self.steps}: loss {loss.item():.4f}", flush=True)
            ddf = self._refined(start, parameter).detach()
        return join_ddf(ddf.to(prediction.dtype), rest)
