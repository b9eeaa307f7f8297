"""Run a network on a coarser grid than its input (e.g. 4 mm weights inside a 2 mm pipeline)."""

from __future__ import annotations

import torch
from torch import nn

from bundle.spatial import pool_field, resize_field

__all__ = ["DownsampledNetwork"]


class DownsampledNetwork(nn.Module):
    """Average-pool ``cat([moving, fixed])`` by ``factor``, run ``network``, return its output on the input grid.

    The first ``spatial_dims`` output channels are a DDF in voxel units: they are upsampled and multiplied by
    ``factor`` (voxels of the input grid); any further channels (segmentation logits) are upsampled.
    Pooling and upsampling share one convention (coarse voxel ``i`` is centred on fine position
    ``factor * i + (factor - 1) / 2``, ``align_corners=False``), so a constant field is preserved, and a
    linear one away from the borders (where interpolation clamps).
    This lets weights trained at a coarse spacing feed a pipeline whose field, instance optimisation and
    resampling run on a finer grid. The wrapped network's state dict is unchanged (``.network``).

    Args:
        network: a registration network taking ``(B, C, *spatial)``; its ``size_divisor`` (if any) is
            multiplied by ``factor`` in this module's ``size_divisor``.
        factor: integer downsampling factor >= 1 (1 runs the network as is).
        spatial_dims: 2 or 3.

    Raises:
        ValueError: ``factor`` < 1 or not an integer; an input whose size is not a multiple of ``factor``.
    """

    def __init__(self, network: nn.Module, factor: int = 2, spatial_dims: int = 3) -> None:
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor}.")
        self.network, self.factor, self.spatial_dims = network, int(factor), spatial_dims
        self.size_divisor = getattr(network, "size_divisor", 1) * self.factor

    @classmethod
    def wrap(cls, network: nn.Module, factor: int = 1, spatial_dims: int = 3) -> nn.Module:
        """``network`` itself when ``factor == 1`` (state dict and behaviour untouched), else the wrapper."""
        return network if factor == 1 else cls(network, factor, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return self.network(x)
        if any(s % self.factor for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} must be a multiple of factor {self.factor}.")
        out = torch.as_tensor(self.network(pool_field(torch.as_tensor(x), self.factor, scale_vectors=False)))
        # the DDF channels (voxels of the coarse grid -> of the input grid) and the logits, one resizing rule
        return resize_field(out, x.shape[2:], scale_vectors=True)
