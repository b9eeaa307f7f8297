"""Registration conditioned on the regularisation weight: one network for a range of smoothness weights.

HyperMorph (Hoopes et al. 2021) and conditional LapIRN (Mok & Chung 2021) train one registration network over a
range of regularisation weights λ, which then becomes an input: a user picks the accuracy / smoothness trade-off
at inference without retraining. We condition by FiLM (Perez et al. 2018; per-channel scale and shift of every
convolution block's features from an embedding of λ) rather than a hypernetwork that predicts all the weights:
FiLM adds about 7 % parameters to the VM-2 U-Net (21,184 at the default width), costs nothing at inference, and with its layers zero-initialised the
conditioned network starts as the plain one (so trained plain weights are a valid start). The joint registration +
tumour segmentation network (:class:`ConditionedJointRegSegNet`) gets FiLM on its registration decoder only, so λ
changes its deformation and never its segmentation.

Input convention (so that MONAI's engines, inferers and ``DownsampledNetwork`` see one tensor, as for the plain
network): ``cat([moving, fixed, weight_map])`` where ``weight_map`` is one channel filled with λ
(:class:`bundle.engines.RegistrationPrepareBatch` adds it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .joint import JointRegSegNet
from .registration_unet import VM2_CHANNELS, RegistrationUNet, check_pair_input

__all__ = ["FiLM", "ConditionedRegistrationUNet", "ConditionedJointRegSegNet", "regularisation_code"]


class FiLM(nn.Module):
    """``h * (1 + gamma(code)) + beta(code)`` per channel; zero-initialised, so the identity at start."""

    def __init__(self, code_channels: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(code_channels, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(code).chunk(2, dim=1)
        view = (*gamma.shape, *([1] * (h.ndim - 2)))
        return h * (1 + gamma.view(view)) + beta.view(view)


def regularisation_code(weight: torch.Tensor, weight_range: Sequence[float]) -> torch.Tensor:
    """``log(λ)`` mapped linearly so that ``weight_range`` spans [-1, 1]: ``(B,)`` -> ``(B, 1)``.

    Raises:
        ValueError: a weight that is not finite and > 0.
    """
    if not bool(torch.isfinite(weight).all()) or bool((weight <= 0).any()):
        raise ValueError(f"the regularisation weight must be finite and > 0, got {weight.flatten().tolist()}.")
    low, high = (math.log(float(w)) for w in weight_range)
    return (2 * (torch.log(weight) - low) / (high - low) - 1).view(-1, 1)


def checked_weight_range(weight_range: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats.

    Raises:
        ValueError: not ``0 < low < high``.
    """
    low, high = (float(w) for w in weight_range)
    if not 0 < low < high:
        raise ValueError(f"weight_range must be (low, high) with 0 < low < high, got {tuple(weight_range)}.")
    return low, high


def regularisation_embedding(code_channels: int) -> nn.Sequential:
    """The small MLP that embeds the λ code ``(B, 1)`` into ``(B, code_channels)`` for the FiLM layers."""
    return nn.Sequential(
        nn.Linear(1, code_channels), nn.LeakyReLU(0.2), nn.Linear(code_channels, code_channels), nn.LeakyReLU(0.2)
    )


def split_weight_channel(
    x: torch.Tensor, image_channels: int, spatial_dims: int, size_divisor: int, weight_range: Sequence[float],
    embed: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([images, weight_map])`` -> the images and the embedded λ code ``(B, code_channels)``.

    Raises:
        ValueError: the images alone (no λ channel: the prepare_batch was not told a weight), a bad shape, or a
            weight that is not finite and > 0.
    """
    if x.ndim >= 2 and x.shape[1] == image_channels:
        raise ValueError(f"the conditioned network needs the regularisation weight as an extra input channel "
                         f"(got {x.shape[1]} channels, the images alone): set the prepare_batch's "
                         "regularisation_weight (config id regularisation_weight).")
    check_pair_input(x, spatial_dims, image_channels + 1, size_divisor)
    images, weight_map = x[:, :-1], x[:, -1]
    return images, embed(regularisation_code(weight_map.flatten(1).mean(1), weight_range).to(x.dtype))


class ConditionedRegistrationUNet(RegistrationUNet):
    """The VoxelMorph U-Net (:class:`RegistrationUNet`) conditioned on the regularisation weight by FiLM.

    Args:
        spatial_dims, in_channels, channels, integration_steps, half_res: as :class:`RegistrationUNet`;
            ``in_channels`` counts the image channels only (the weight map is one more input channel).
        weight_range: ``(low, high)`` regularisation weights the network is trained over (log scale); weights
            outside are extrapolated (the docs' trade-off curves show how far that holds).
        code_channels: width of the λ embedding.

    Raises:
        ValueError: a weight range that is not ``0 < low < high``, or the arguments of :class:`RegistrationUNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        channels: Sequence[Sequence[int]] = VM2_CHANNELS,
        integration_steps: int = 0,
        half_res: bool = False,
        weight_range: Sequence[float] = (0.01, 10.0),
        code_channels: int = 32,
    ) -> None:
        super().__init__(spatial_dims, in_channels, channels, integration_steps, half_res)
        self.weight_range = checked_weight_range(weight_range)
        self.embed = regularisation_embedding(code_channels)
        self.film_encoder = nn.ModuleList(FiLM(code_channels, b.conv.out_channels) for b in self.encoder.blocks)
        self.film_decoder = nn.ModuleList(FiLM(code_channels, c) for c in self.decoder.block_channels)

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        """As :meth:`RegistrationUNet.fields` for ``x = cat([moving, fixed, weight_map], dim=1)``."""
        images, code = split_weight_channel(x, self.in_channels, self.spatial_dims, self.size_divisor, self.weight_range,
                                            self.embed)
        features = self.encoder(images, modulate=lambda i, h: self.film_encoder[i](h, code))
        decoded = self.decoder(features, modulate=lambda i, h: self.film_decoder[i](h, code))
        return self.head(decoded, x.shape[2:], inverse=inverse)


class ConditionedJointRegSegNet(JointRegSegNet):
    """The joint registration + tumour segmentation network (:class:`JointRegSegNet`) conditioned on the
    regularisation weight by FiLM on its registration decoder only.

    The shared encoder and the segmentation decoder are not modulated, so λ changes the deformation and never the
    segmentation (a user's choice of smoothness cannot move a tumour boundary). The FiLM layers start at zero:
    plain joint weights loaded with ``missing_ok=("embed.", "film_")`` give the plain network for every λ.

    Input: ``cat([moving, fixed, weight_map])`` (``2 * in_channels + 1`` channels, the prepare_batch's λ channel);
    output: the packed tensor of :class:`JointRegSegNet`.

    Args:
        spatial_dims, in_channels, num_classes, channels, merge, deformation, integration_steps, half_res: as
            :class:`JointRegSegNet` (``in_channels`` counts the channels of ONE image).
        weight_range: ``(low, high)`` regularisation weights the network is trained over (log scale).
        code_channels: width of the λ embedding.

    Raises:
        ValueError: a weight range that is not ``0 < low < high``, or the arguments of :class:`JointRegSegNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[Sequence[int]] = VM2_CHANNELS,
        merge: str = "subtract",
        deformation: str = "ddf",
        integration_steps: int = 7,
        half_res: bool = False,
        weight_range: Sequence[float] = (0.1, 10.0),
        code_channels: int = 32,
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, channels, merge, deformation, integration_steps, half_res)
        self.weight_range = checked_weight_range(weight_range)
        self.embed = regularisation_embedding(code_channels)
        self.film_decoder = nn.ModuleList(FiLM(code_channels, c) for c in self.reg_decoder.block_channels)

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        """As :meth:`JointRegSegNet.fields` for ``x = cat([moving, fixed, weight_map], dim=1)``."""
        images, code = split_weight_channel(x, 2 * self.in_channels, self.spatial_dims, self.size_divisor,
                                            self.weight_range, self.embed)
        return self.pair_fields(images, inverse=inverse, modulate=lambda i, h: self.film_decoder[i](h, code))
