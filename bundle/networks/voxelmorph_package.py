"""The ``voxelmorph`` package's own PyTorch model behind this bundle's network interface (a baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import optional_import
from torch import nn

from .registration_unet import check_pair_input

__all__ = ["VoxelMorphPackageNet", "VXM_PACKAGE_FEATURES"]

vxm, has_vxm = optional_import("voxelmorph")

# VoxelMorph-2 encoder / decoder widths in the package's nested form (its BasicUNet: one list per level).
VXM_PACKAGE_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32))


class VoxelMorphPackageNet(nn.Module):
    """``voxelmorph.nn.models.VxmPairwise`` taking ``x = cat([moving, fixed], dim=1)`` and returning its
    displacement (B, spatial_dims, *spatial) in voxel units, pull-back, channel order = array axes: the
    package's convention is MONAI ``Warp``'s, so the bundle's configs train, evaluate and run it like
    ``RegistrationUNet`` (same data, losses, pre-alignment and outputs) for a like-for-like comparison.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ``x`` (moving + fixed), even.
        nb_features: the package's ``nb_features`` (encoder and decoder widths per level).
        integration_steps: scaling-and-squaring steps (0: the field is the displacement).

    Raises:
        ModuleNotFoundError: ``voxelmorph`` is not installed (``pip install voxelmorph``).
        ValueError: odd ``in_channels``; at call time, a bad input shape.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        nb_features: Sequence = VXM_PACKAGE_FEATURES,
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if not has_vxm:
            raise ModuleNotFoundError("VoxelMorphPackageNet needs the voxelmorph package: pip install 'voxelmorph>=0.3.4'.")
        if in_channels % 2:
            raise ValueError(f"in_channels must be even (moving + fixed), got {in_channels}.")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        nb_features = [list(level) for level in nb_features]
        self.size_divisor = 2 ** len(nb_features[0])  # its BasicUNet pools once after every encoder level
        self.net = vxm.nn.models.VxmPairwise(
            spatial_dims, in_channels // 2, in_channels // 2, nb_features=nb_features, integration_steps=integration_steps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pair_input(x, self.spatial_dims, self.in_channels, self.size_divisor)
        half = self.in_channels // 2
        return self.net(x[:, :half], x[:, half:])
