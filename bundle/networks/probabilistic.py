"""Probabilistic encoder features with a Gaussian prior (the bilevel feature-learning seed).

The seed learns features as the maximum a posteriori of ``p(f | I, phi) ~ p(I | f, phi) p(f)`` with a Gaussian
prior on ``f``, trained end to end with the image-domain loss plus the feature-domain term
``l_KL(mu, Sigma) = 1/2 (tr Sigma + ||mu||^2 - log det Sigma - m)`` (the KL divergence of ``N(mu, Sigma)`` from
``N(0, I)``; the seed's slide writes ``||mu||``, the divergence has its square). Here every encoder level of the
registration U-Net predicts a diagonal Gaussian per voxel (a 1x1 convolution gives ``mu`` and ``log sigma^2``);
training samples ``mu + sigma * eps`` (reparameterisation), evaluation uses ``mu``. The KL term of the last
forward pass is kept on the module for :class:`bundle.losses.FeatureKLLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registration_unet import VM2_CHANNELS, RegistrationUNet, check_pair_input

__all__ = ["GaussianFeatures", "ProbabilisticRegistrationUNet", "gaussian_kl"]


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``1/2 (tr Sigma + ||mu||^2 - log det Sigma - m)`` per sample, divided by the voxels: ``(B,)``.

    ``mu``, ``log_var``: ``(B, m, *spatial)``, a diagonal covariance per voxel over the ``m`` channels.
    """
    per_voxel = 0.5 * (log_var.exp() + mu * mu - log_var - 1).sum(dim=1)
    return per_voxel.flatten(1).mean(dim=1)


class GaussianFeatures(nn.Module):
    """``h -> (mu, log sigma^2)`` by a 1x1 convolution; returns a sample in training, ``mu`` otherwise.

    Initialised so that ``mu = h`` and ``sigma^2 = exp(-6)`` (about 0.05): the features start as the plain ones.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.mu = conv(channels, channels, kernel_size=1)
        self.log_var = conv(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.mu.weight.zero_()
            self.mu.weight[(slice(None), slice(None), *([0] * spatial_dims))] = torch.eye(channels)
            self.mu.bias.zero_()
            self.log_var.weight.zero_()
            self.log_var.bias.fill_(-6.0)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, kl)``: the sample (training) or the mean (evaluation), and the per-sample KL ``(B,)``."""
        mu, log_var = self.mu(h), self.log_var(h).clamp(-20.0, 10.0)
        kl = gaussian_kl(mu, log_var)
        if not self.training:
            return mu, kl
        return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu), kl


class ProbabilisticRegistrationUNet(RegistrationUNet):
    """:class:`RegistrationUNet` whose encoder features are Gaussian (:class:`GaussianFeatures` at every level).

    ``kl`` holds the mean over levels of the per-sample KL ``(B,)`` of the last forward pass.

    Args: as :class:`RegistrationUNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        channels: Sequence[Sequence[int]] = VM2_CHANNELS,
        integration_steps: int = 0,
        half_res: bool = False,
    ) -> None:
        super().__init__(spatial_dims, in_channels, channels, integration_steps, half_res)
        self.gaussians = nn.ModuleList(GaussianFeatures(spatial_dims, b.conv.out_channels) for b in self.encoder.blocks)
        self.kl: torch.Tensor | None = None

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        check_pair_input(x, self.spatial_dims, self.in_channels, self.size_divisor)
        kls = []

        def gaussian(i: int, h: torch.Tensor) -> torch.Tensor:
            sample, kl = self.gaussians[i](h)
            kls.append(kl)
            return sample

        features = self.encoder(x, modulate=gaussian)
        self.kl = torch.stack(kls).mean(dim=0)
        return self.head(self.decoder(features), x.shape[2:], inverse=inverse)
