"""The one owner of the networks' output layout.

Every network returns ONE tensor (what MONAI inferers, ``verify_net_in_out``, TorchScript and MONAI Label
run): the DDF first, ``(B, spatial_dims, *spatial)`` in voxel units of the network grid, then any further
channels. The registration networks return the DDF alone; :class:`bundle.networks.JointRegSegNet` returns
``cat([ddf, seg_moving_logits, seg_fixed_logits])``. Code that needs the parts (losses, post-transforms,
instance optimisation) splits with these functions, never by slicing channels itself.
"""

from __future__ import annotations

import torch

__all__ = ["JOINT_PARTS", "joint_output_channels", "pack_joint_output", "split_joint_output", "split_ddf", "join_ddf"]

JOINT_PARTS = ("ddf", "seg_moving", "seg_fixed")


def joint_output_channels(spatial_dims: int, num_classes: int) -> int:
    """Channels of the joint network's packed output: ``spatial_dims + 2 * num_classes``."""
    return spatial_dims + 2 * num_classes


def pack_joint_output(ddf: torch.Tensor, seg_moving: torch.Tensor, seg_fixed: torch.Tensor) -> torch.Tensor:
    """``cat([ddf, seg_moving_logits, seg_fixed_logits], dim=1)``, the joint network's single output."""
    return torch.cat([ddf, seg_moving, seg_fixed], dim=1)


def split_joint_output(packed: torch.Tensor, spatial_dims: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Split the joint network's packed output into ``{"ddf", "seg_moving", "seg_fixed"}`` (views).

    Raises:
        ValueError: the channel count is not ``spatial_dims + 2 * num_classes``.
    """
    expected = joint_output_channels(spatial_dims, num_classes)
    if packed.shape[1] != expected:
        raise ValueError(
            f"joint output must have spatial_dims + 2 * num_classes = {expected} channels, got {packed.shape[1]}."
        )
    n, c = spatial_dims, num_classes
    return {"ddf": packed[:, :n], "seg_moving": packed[:, n : n + c], "seg_fixed": packed[:, n + c :]}


def split_ddf(output: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ddf, extra)`` of any network output: the DDF channels and whatever follows (possibly no channel).

    Raises:
        ValueError: fewer than ``spatial_dims`` channels.
    """
    if output.shape[1] < spatial_dims:
        raise ValueError(f"a network output needs at least {spatial_dims} DDF channels, got {output.shape[1]}.")
    return output[:, :spatial_dims], output[:, spatial_dims:]


def join_ddf(ddf: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_ddf`."""
    return torch.cat([ddf, extra.to(ddf.dtype)], dim=1)
