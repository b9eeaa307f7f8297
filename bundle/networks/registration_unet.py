"""VoxelMorph registration U-Net (Balakrishnan et al. CVPR 2018, TMI 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvDecoder, ConvEncoder, DeformationHead, upsample_field

__all__ = ["RegistrationUNet", "VM1_CHANNELS", "VM2_CHANNELS", "upsample_field", "check_pair_input"]

# (encoder, decoder) feature counts of the paper's two sizes.
VM1_CHANNELS = ((16, 32, 32, 32), (32, 32, 32, 32, 8, 8))
VM2_CHANNELS = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))


def check_pair_input(x: torch.Tensor, spatial_dims: int, in_channels: int, size_divisor: int) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *spatial)`` with sizes multiple of ``size_divisor``."""
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"expected a (B, {in_channels}, *spatial) input with {spatial_dims} spatial dims, got shape {tuple(x.shape)}."
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {x.shape[1]}.")
    if any(s % size_divisor for s in x.shape[2:]):
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} must be a multiple of {size_divisor} on every axis "
            "(pad the images, e.g. with DivisiblePadd)."
        )


class RegistrationUNet(nn.Module):
    """VoxelMorph U-Net predicting a dense displacement field from a moving and a fixed image.

    The input is the channel-wise concatenation ``[moving, fixed]`` (single tensor, so MONAI's
    ``verify_net_in_out``, inferers and TorchScript work on it). The output is a DDF on the fixed grid,
    a pull-back ``warped(x) = moving(x + ddf(x))`` in voxel units with channel k along spatial axis k
    (MONAI ``Warp`` convention). We do not use ``monai.networks.nets.VoxelMorph`` because it returns the
    warped image (not a single field), initialises the flow layer randomly and has no half-resolution
    flow for the non-diffeomorphic model.

    Encoder: stride-2 3x3(x3) convolutions with LeakyReLU(0.2). Decoder: one convolution per level
    followed by upsampling and concatenation with the skip connection, then the remaining decoder
    convolutions at full resolution, then a zero-initialised flow convolution (identity at start).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated input (2 for one-channel moving and fixed images).
        channels: ``(encoder, decoder)`` feature counts; ``VM1_CHANNELS`` or ``VM2_CHANNELS`` (default).
        integration_steps: scaling-and-squaring steps; 0 predicts the DDF directly, > 0 predicts a
            stationary velocity field whose exponential is the DDF (diffeomorphic).
        half_res: predict the field at half resolution (the last upsampling and the full-resolution
            convolutions are skipped; the field is integrated there and upsampled).

    Raises:
        ValueError: bad ``spatial_dims``, ``channels`` or ``integration_steps``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        channels: Sequence[Sequence[int]] = VM2_CHANNELS,
        integration_steps: int = 0,
        half_res: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}.")
        encoder, decoder = (tuple(int(c) for c in group) for group in channels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.encoder = ConvEncoder(spatial_dims, in_channels, encoder)
        self.decoder = ConvDecoder(spatial_dims, self.encoder.out_channels, decoder, half_res=half_res)
        self.head = DeformationHead(
            spatial_dims,
            self.decoder.out_channels,
            deformation="svf" if integration_steps > 0 else "ddf",
            integration_steps=integration_steps,
            half_res=half_res,
        )
        self.size_divisor = 2 ** len(encoder)

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        """Return ``{"ddf": ...}`` and, for the diffeomorphic model, ``{"svf": ...}`` at full resolution
        (and ``{"inverse_ddf": ...}`` with ``inverse=True``; see :class:`DeformationHead`)."""
        check_pair_input(x, self.spatial_dims, self.in_channels, self.size_divisor)
        return self.head(self.decoder(self.encoder(x)), x.shape[2:], inverse=inverse)

    def forward_and_inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and inverse DDFs ``exp(svf)`` and ``exp(-svf)`` of the diffeomorphic model.

        Both are pull-backs on the input grid in voxel units: the forward one warps the moving image onto the
        fixed one, the inverse one warps the fixed image onto the moving one (composing them gives ~identity).

        Raises:
            ValueError: the model is not diffeomorphic (``integration_steps`` is 0).
        """
        out = self.fields(x, inverse=True)
        return out["ddf"], out["inverse_ddf"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the DDF (B, spatial_dims, *spatial) for ``x = cat([moving, fixed], dim=1)``."""
        return self.fields(x)["ddf"]
