"""VoxelMorph registration U-Net (Balakrishnan et al. CVPR 2018, TMI 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.warp import DVF2DDF
from torch import nn

__all__ = ["RegistrationUNet", "VM1_CHANNELS", "VM2_CHANNELS", "upsample_field"]

# (encoder, decoder) feature counts of the paper's two sizes.
VM1_CHANNELS = ((16, 32, 32, 32), (32, 32, 32, 32, 8, 8))
VM2_CHANNELS = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))


def _conv(spatial_dims: int, in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": 0.2}),
        norm=None,
    )


def upsample_field(field: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Resize a displacement or velocity field in voxel units to ``spatial_size``, rescaling its vectors.

    Args:
        field: (B, ndim, *spatial) field in voxel units of its own grid.
        spatial_size: target spatial size (same number of dims).

    Returns:
        (B, ndim, *spatial_size) field in voxel units of the target grid.
    """
    ndim = field.shape[1]
    mode = "bilinear" if ndim == 2 else "trilinear"
    scales = [t / s for t, s in zip(spatial_size, field.shape[2:])]
    resized = F.interpolate(field, size=tuple(spatial_size), mode=mode, align_corners=True)
    scale = torch.tensor(scales, dtype=field.dtype, device=field.device).view(1, ndim, *([1] * ndim))
    return resized * scale


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
        encoder, decoder = (tuple(int(c) for c in group) for group in channels)
        if len(decoder) < len(encoder):
            raise ValueError(f"channels: the decoder {decoder} needs at least as many entries as the encoder {encoder}.")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.half_res = half_res
        self.integration_steps = integration_steps
        self.levels = len(encoder)

        self.encoder = nn.ModuleList()
        prev = in_channels
        skip_channels = [in_channels]
        for c in encoder:
            self.encoder.append(_conv(spatial_dims, prev, c, strides=2))
            prev = c
            skip_channels.append(c)

        self.decoder = nn.ModuleList()
        upsamplings = self.levels - 1 if half_res else self.levels
        for i in range(upsamplings):
            self.decoder.append(_conv(spatial_dims, prev, decoder[i]))
            prev = decoder[i] + skip_channels[-2 - i]
        self.extra = nn.ModuleList()
        for c in decoder[upsamplings:]:
            self.extra.append(_conv(spatial_dims, prev, c))
            prev = c
        conv_type = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.flow = conv_type(prev, spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)
        self.integrate = DVF2DDF(num_steps=integration_steps) if integration_steps > 0 else None

    @property
    def size_divisor(self) -> int:
        """Each spatial size of the input must be a multiple of this."""
        return 2**self.levels

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, {self.in_channels}, *spatial) input with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (moving and fixed), got {x.shape[1]}.")
        bad = [s for s in x.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be a multiple of {self.size_divisor} on every axis "
                "(pad the images, e.g. with DivisiblePadd)."
            )

    def fields(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"ddf": ...}`` and, for the diffeomorphic model, ``{"svf": ...}`` at full resolution."""
        self._check_input(x)
        skips = [x]
        h = x
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        for i, block in enumerate(self.decoder):
            h = block(h)
            skip = skips[-2 - i]
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)
        for block in self.extra:
            h = block(h)
        field = self.flow(h)
        out = {}
        if self.integrate is not None:
            # integrate where the field was predicted (cheaper at half resolution), then upsample
            ddf = self.integrate(field)
            if self.half_res:
                field = upsample_field(field, x.shape[2:])
                ddf = upsample_field(ddf, x.shape[2:])
            out["svf"] = field
        else:
            ddf = upsample_field(field, x.shape[2:]) if self.half_res else field
        out["ddf"] = ddf
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the DDF (B, spatial_dims, *spatial) for ``x = cat([moving, fixed], dim=1)``."""
        return self.fields(x)["ddf"]
