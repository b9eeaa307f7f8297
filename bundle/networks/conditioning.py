"""Registration conditioned on the regularisation weight: one network for a range of smoothness weights.

HyperMorph (Hoopes et al. 2021) and conditional LapIRN (Mok & Chung 2021) train one registration network over a
range of regularisation weights λ, which then becomes an input: a user picks the accuracy / smoothness trade-off
at inference without retraining. We condition by FiLM (Perez et al. 2018; per-channel scale and shift of every
convolution block's features from an embedding of λ) rather than a hypernetwork that predicts all the weights:
FiLM adds about 7 % parameters to the VM-2 U-Net (21,184 at the default width), costs nothing at inference, and with its layers zero-initialised the
conditioned network starts as the plain one (so trained plain weights are a valid start).

Input convention (so that MONAI's engines, inferers and ``DownsampledNetwork`` see one tensor, as for the plain
network): ``cat([moving, fixed, weight_map])`` where ``weight_map`` is one channel filled with λ
(:class:`bundle.engines.RegistrationPrepareBatch` adds it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .registration_unet import VM2_CHANNELS, RegistrationUNet, check_pair_input

__all__ = ["FiLM", "ConditionedRegistrationUNet", "regularisation_code"]


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
        low, high = (float(w) for w in weight_range)
        if not 0 < low < high:
            raise ValueError(f"weight_range must be (low, high) with 0 < low < high, got {tuple(weight_range)}.")
        self.weight_range = (low, high)
        self.embed = nn.Sequential(
            nn.Linear(1, code_channels), nn.LeakyReLU(0.2), nn.Linear(code_channels, code_channels), nn.LeakyReLU(0.2)
        )
        self.film_encoder = nn.ModuleList(FiLM(code_channels, b.conv.out_channels) for b in self.encoder.blocks)
        self.film_decoder = nn.ModuleList(FiLM(code_channels, c) for c in self.decoder.block_channels)

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        """As :meth:`RegistrationUNet.fields` for ``x = cat([moving, fixed, weight_map], dim=1)``."""
        if x.ndim >= 2 and x.shape[1] == self.in_channels:
            raise ValueError(f"the conditioned network needs the regularisation weight as an extra input channel "
                             f"(got {x.shape[1]} channels, the images alone): set the prepare_batch's "
                             "regularisation_weight (config id regularisation_weight).")
        check_pair_input(x, self.spatial_dims, self.in_channels + 1, self.size_divisor)
        images, weight_map = x[:, :-1], x[:, -1]
        code = self.embed(regularisation_code(weight_map.flatten(1).mean(1), self.weight_range).to(x.dtype))
        features = self.encoder(images, modulate=lambda i, h: self.film_encoder[i](h, code))
        decoded = self.decoder(features, modulate=lambda i, h: self.film_decoder[i](h, code))
        return self.head(decoded, x.shape[2:], inverse=inverse)
