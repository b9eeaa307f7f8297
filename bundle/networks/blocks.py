"""Building blocks shared by the registration networks: U-Net encoder/decoder and deformation heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.warp import DVF2DDF
from torch import nn

from bundle.spatial import index_grid, resize_field

upsample_field = resize_field  # the former name, kept for code that imports it from here

__all__ = ["ConvEncoder", "ConvDecoder", "DeformationHead", "DEFORMATIONS", "upsample_field", "conv_block"]

DEFORMATIONS = ("ddf", "svf", "cumsum")


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    """3x3(x3) convolution + LeakyReLU(0.2), no normalisation (VoxelMorph)."""
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": 0.2}),
        norm=None,
    )


class ConvEncoder(nn.Module):
    """Stride-2 convolutional encoder; returns the input and the features of every level.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: features per level (each level halves the spatial size).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            conv_block(spatial_dims, c_in, c_out, strides=2) for c_in, c_out in zip(self.out_channels, channels)
        )

    def forward(self, x: torch.Tensor, modulate: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``[x, level 1, ..., level L]`` features, finest first; ``modulate(i, h)``, when given, transforms the
        output of block ``i`` (e.g. FiLM conditioning)."""
        features = [x]
        for i, block in enumerate(self.blocks):
            h = block(features[-1])
            features.append(h if modulate is None else modulate(i, h))
        return features


class ConvDecoder(nn.Module):
    """U-Net decoder: per level a convolution, upsampling and concatenation with the skip features, then the
    remaining convolutions at the finest level reached.

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the encoder features ``[input, level 1, ..., level L]``.
        channels: decoder features; the first ``L`` (``L - 1`` with ``half_res``) are used before each
            upsampling, the rest at the output resolution.
        half_res: stop at half the input resolution (skip the last upsampling).
    """

    def __init__(
        self, spatial_dims: int, skip_channels: Sequence[int], channels: Sequence[int], half_res: bool = False
    ) -> None:
        super().__init__()
        levels = len(skip_channels) - 1
        upsamplings = levels - 1 if half_res else levels
        if len(channels) < levels:
            raise ValueError(f"decoder channels {tuple(channels)} need at least {levels} entries (one per level).")
        self.up_blocks = nn.ModuleList()
        prev = skip_channels[-1]
        for i in range(upsamplings):
            self.up_blocks.append(conv_block(spatial_dims, prev, channels[i]))
            prev = channels[i] + skip_channels[-2 - i]
        self.extra = nn.ModuleList()
        for c in channels[upsamplings:]:
            self.extra.append(conv_block(spatial_dims, prev, c))
            prev = c
        self.out_channels = prev

    @property
    def block_channels(self) -> list[int]:
        """Output channels of every convolution block, in the order ``modulate`` sees them."""
        return [b.conv.out_channels for b in (*self.up_blocks, *self.extra)]

    def forward(
        self, features: Sequence[torch.Tensor], modulate: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Decode ``[input, level 1, ..., level L]`` features (as :class:`ConvEncoder` returns them);
        ``modulate(i, h)``, when given, transforms the output of convolution block ``i`` (up blocks, then the rest)."""
        h = features[-1]
        for i, block in enumerate(self.up_blocks):
            skip = features[-2 - i]
            out = block(h)
            out = out if modulate is None else modulate(i, out)
            h = F.interpolate(out, size=skip.shape[2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)
        for j, block in enumerate(self.extra):
            h = block(h)
            h = h if modulate is None else modulate(len(self.up_blocks) + j, h)
        return h


def _upsample_half_resolution(field: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """``resize_field`` of a half-resolution field to ``spatial_size``; when that is exactly twice its size (inputs
    padded to the size divisor), by a scale factor of 2 and vectors doubled: the same values, and a traced
    (TorchScript) network then follows its input's size instead of keeping the traced one."""
    if tuple(int(s) for s in spatial_size) != tuple(2 * int(s) for s in field.shape[2:]):
        return resize_field(field, spatial_size)
    ndim = field.ndim - 2
    mode = "bilinear" if ndim == 2 else "trilinear"
    return F.interpolate(field, scale_factor=2.0, mode=mode, align_corners=False) * 2.0


class DeformationHead(nn.Module):
    """Turn decoder features into a DDF on the input grid (voxel units, pull-back, MONAI ``Warp`` convention).

    Parameterisations:

    - ``"ddf"``: a zero-initialised convolution predicts the DDF (identity at start).
    - ``"svf"``: it predicts a stationary velocity field; the DDF is its exponential by scaling and squaring
      (``integration_steps``), so the map is diffeomorphic; its inverse is the exponential of ``-svf``.
    - ``"cumsum"`` (Christodoulidis et al. 2018, Estienne et al. 2020): it predicts spatial gradients
      ``phi = 2 * sigmoid(.)`` of the sampling grid along each axis (``1`` = identity, positive = no folding
      along that axis); the grid is their exclusive cumulative sum, so ``phi = 1`` gives exactly the identity
      (the authors' inclusive sum adds a one-voxel offset, which we do not reproduce). This parameterisation
      cannot translate the first voxel of each axis, so global translation must come from pre-alignment.

    Args:
        spatial_dims: 2 or 3.
        in_channels: decoder features.
        deformation: ``"ddf"``, ``"svf"`` or ``"cumsum"``.
        integration_steps: scaling-and-squaring steps for ``"svf"``.
        half_res: the features are at half the output resolution (the field is upsampled; an SVF is
            integrated before upsampling, which is cheaper).

    Raises:
        ValueError: unknown ``deformation`` or bad ``integration_steps``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        deformation: str = "ddf",
        integration_steps: int = 7,
        half_res: bool = False,
    ) -> None:
        super().__init__()
        if deformation not in DEFORMATIONS:
            raise ValueError(f"deformation must be one of {DEFORMATIONS}, got {deformation!r}.")
        if deformation == "svf" and integration_steps < 1:
            raise ValueError(f"deformation 'svf' needs integration_steps >= 1, got {integration_steps}.")
        if deformation == "cumsum" and half_res:
            raise ValueError("deformation 'cumsum' is defined at full resolution; set half_res=False.")
        self.deformation = deformation
        self.half_res = half_res
        conv_type = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv_type(in_channels, spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.integrate = DVF2DDF(num_steps=integration_steps) if deformation == "svf" else None
        self._grid: torch.Tensor | None = None  # identity sampling grid of the cumsum head, built once per size

    def _identity_grid(self, like: torch.Tensor) -> torch.Tensor:
        """``(1, ndim, *spatial)`` voxel indices matching ``like`` (cached)."""
        grid = self._grid
        if grid is None or grid.shape[2:] != like.shape[2:] or grid.device != like.device or grid.dtype != like.dtype:
            grid = index_grid(like.shape[2:], dtype=like.dtype, device=like.device).unsqueeze(0)
            self._grid = grid
        return grid

    def forward(
        self, features: torch.Tensor, spatial_size: Sequence[int], inverse: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"ddf"}`` plus ``{"svf"}`` or ``{"grid_gradient"}`` for those parameterisations, at ``spatial_size``.

        Args:
            features: decoder features.
            spatial_size: spatial size of the output fields.
            inverse: also return ``"inverse_ddf"``, the exponential of ``-svf`` (same grid, voxel units,
                integrated like the forward DDF); only for ``"svf"``.

        Raises:
            ValueError: ``inverse`` for a parameterisation without a closed-form inverse.
        """
        if inverse and self.integrate is None:
            raise ValueError(
                f"inverse=True needs deformation 'svf' (the inverse is the exponential of -svf), got {self.deformation!r}."
            )
        field = self.conv(features)
        if self.deformation == "cumsum":
            gradient = 2.0 * torch.sigmoid(field)
            ndim = gradient.shape[1]
            ddf = torch.stack(
                [torch.cumsum(gradient[:, k], dim=k + 1) - gradient[:, k] for k in range(ndim)], dim=1
            )
            ddf = ddf - self._identity_grid(ddf)
            return {"ddf": ddf, "grid_gradient": gradient}
        if self.integrate is not None:
            out = {"ddf": self.integrate(field), "svf": field}
            if inverse:
                out["inverse_ddf"] = self.integrate(-field)
            if self.half_res:  # integrated at half resolution (cheaper), then upsampled
                out = {key: _upsample_half_resolution(value, spatial_size) for key, value in out.items()}
            return out
        return {"ddf": _upsample_half_resolution(field, spatial_size) if self.half_res else field}

