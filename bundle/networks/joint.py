"""Joint registration and tumour segmentation network (Estienne et al., Front. Comput. Neurosci. 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.blocks import Warp
from torch import nn

from bundle.spatial import resize_field

from .blocks import ConvDecoder, ConvEncoder, DeformationHead
from .outputs import joint_output_channels, pack_joint_output, split_joint_output
from .registration_unet import VM2_CHANNELS, check_pair_input

__all__ = ["JointRegSegNet", "TumourSegmentationNet", "MERGES", "merge_features", "logits_to_labels"]

MERGES = ("subtract", "concat", "add")


def logits_to_labels(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Label map (index of the largest logit along ``dim``, kept as a size-1 dim), as ``argmax(dim, keepdim=True)``.

    ``torch.max`` is used because ``torch.argmax`` over a short leading dim is ~15x slower on CPU (torch 2.13:
    1.6 s vs 0.1 s for 2 x 256 x 128 x 256 logits).
    """
    return torch.max(torch.as_tensor(logits), dim=dim, keepdim=True).indices


def merge_features(moving: torch.Tensor, fixed: torch.Tensor, mode: str) -> torch.Tensor:
    """Merge two latent codes: ``moving - fixed`` (default in the paper), ``cat`` or ``moving + fixed``.

    Subtraction is zero for identical codes and antisymmetric (swapping the images negates it).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode == "subtract":
        return moving - fixed
    if mode == "concat":
        return torch.cat([moving, fixed], dim=1)
    if mode == "add":
        return moving + fixed
    raise ValueError(f"merge must be one of {MERGES}, got {mode!r}.")


class JointRegSegNet(nn.Module):
    """One shared encoder, a tumour segmentation decoder and a registration decoder on merged codes.

    The encoder (shared weights) encodes the moving and the fixed image separately (not their
    concatenation); the segmentation decoder (shared weights) segments the tumour in each; the codes of
    every level are merged (``merge``) and the registration decoder predicts the deformation (see
    :class:`DeformationHead` for ``"ddf"``, ``"svf"`` and the paper's ``"cumsum"``).

    Single-tensor entry: ``forward(cat([moving, fixed], dim=1))`` returns one packed tensor
    ``cat([ddf, seg_moving_logits, seg_fixed_logits], dim=1)`` (``spatial_dims + 2 * num_classes``
    channels) so that MONAI inferers, ``verify_net_in_out``, TorchScript and MONAI Label can run it;
    :meth:`unpack` splits it and :meth:`predict` returns the full dict (with the warped image and the
    warped moving segmentation).

    With ``half_res`` both decoders stop one level early (VoxelMorph's half-resolution flow, as
    :class:`RegistrationUNet`): the DDF or SVF is predicted (and integrated) at half resolution and upsampled
    with its vectors doubled, the segmentation logits are upsampled (linear interpolation); the outputs keep
    the input's size, so losses and writers are unchanged.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ONE image (e.g. 4 BraTS sequences or 1 for T1); the input has twice that.
        num_classes: segmentation classes including background (2 for tumour / no tumour).
        channels: ``(encoder, decoder)`` features; both decoders use the decoder list.
        merge: ``"subtract"`` (moving - fixed), ``"concat"`` or ``"add"``.
        deformation: ``"ddf"``, ``"svf"`` or ``"cumsum"``.
        integration_steps: scaling-and-squaring steps for ``"svf"``.
        half_res: decode at half resolution and upsample (not with ``"cumsum"``); ``False`` keeps the
            full-resolution modules (and checkpoints) of earlier versions.

    Raises:
        ValueError: bad options.
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
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}.")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}.")
        encoder, decoder = (tuple(int(c) for c in group) for group in channels)
        self.spatial_dims, self.in_channels, self.num_classes, self.merge = spatial_dims, in_channels, num_classes, merge
        self.encoder = ConvEncoder(spatial_dims, in_channels, encoder)
        self.seg_decoder = ConvDecoder(spatial_dims, self.encoder.out_channels, decoder, half_res=half_res)
        conv_type = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.seg_head = conv_type(self.seg_decoder.out_channels, num_classes, kernel_size=1)
        # start by predicting "no tumour" (prior 1 %): an untrained head must not mask the whole similarity
        with torch.no_grad():
            self.seg_head.bias.copy_(torch.log(torch.tensor([0.99] + [0.01 / (num_classes - 1)] * (num_classes - 1))))
        factor = 2 if merge == "concat" else 1
        merged_channels = [factor * c for c in self.encoder.out_channels]
        self.reg_decoder = ConvDecoder(spatial_dims, merged_channels, decoder, half_res=half_res)
        self.reg_head = DeformationHead(
            spatial_dims, self.reg_decoder.out_channels, deformation, integration_steps, half_res=half_res
        )
        self.size_divisor = 2 ** len(encoder)
        self.warp = Warp(mode="bilinear", padding_mode="border")

    @property
    def out_channels(self) -> int:
        return joint_output_channels(self.spatial_dims, self.num_classes)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features of every level of ONE image (the shared encoder)."""
        return self.encoder(image)

    def decode_segmentation(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits at the input size from the encoder features of ONE image (``features[0]`` is the
        image itself); with ``half_res`` the logits are decoded at half size and upsampled."""
        logits = self.seg_head(self.seg_decoder(features))
        return resize_field(logits, features[0].shape[2:], scale_vectors=False)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Tumour segmentation logits ``(B, num_classes, *spatial)`` of ONE image ``(B, in_channels, *spatial)``."""
        return self.decode_segmentation(self.encode(image))

    def fields(self, x: torch.Tensor, inverse: bool = False) -> dict[str, torch.Tensor]:
        """``ddf`` (plus ``svf``/``grid_gradient``), ``seg_moving`` and ``seg_fixed`` logits for ``cat([moving, fixed])``;
        with ``inverse=True`` also ``inverse_ddf`` (``"svf"`` deformation only, see :class:`DeformationHead`)."""
        check_pair_input(x, self.spatial_dims, 2 * self.in_channels, self.size_divisor)
        return self.pair_fields(x, inverse=inverse)

    def pair_fields(
        self, images: torch.Tensor, inverse: bool = False, modulate: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`fields` of checked ``images = cat([moving, fixed])``; ``modulate(i, h)``, when given, transforms
        the output of the registration decoder's block ``i`` (the λ conditioning of
        :class:`bundle.networks.ConditionedJointRegSegNet`), never the encoder or the segmentation decoder."""
        moving, fixed = images[:, : self.in_channels], images[:, self.in_channels : 2 * self.in_channels]
        code_moving, code_fixed = self.encode(moving), self.encode(fixed)
        merged = [merge_features(m, f, self.merge) for m, f in zip(code_moving, code_fixed)]
        out = self.reg_head(self.reg_decoder(merged, modulate=modulate), images.shape[2:], inverse=inverse)
        out["seg_moving"] = self.decode_segmentation(code_moving)  # codes reused: no second encoding
        out["seg_fixed"] = self.decode_segmentation(code_fixed)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``cat([ddf, seg_moving_logits, seg_fixed_logits], dim=1)``."""
        out = self.fields(x)
        return pack_joint_output(out["ddf"], out["seg_moving"], out["seg_fixed"])

    def forward_and_inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and inverse DDFs ``exp(svf)`` and ``exp(-svf)`` (``deformation="svf"``); see
        :meth:`RegistrationUNet.forward_and_inverse`.

        Raises:
            ValueError: the deformation is not ``"svf"``.
        """
        out = self.fields(x, inverse=True)
        return out["ddf"], out["inverse_ddf"]

    def unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split the packed output into ``ddf``, ``seg_moving`` and ``seg_fixed`` (logits)."""
        return split_joint_output(packed, self.spatial_dims, self.num_classes)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All outputs: ``ddf``, ``warped`` image, ``seg_moving``/``seg_fixed`` logits, ``warped_seg_moving`` probabilities."""
        out = self.fields(x)
        out["warped"] = self.warp(x[:, : self.in_channels], out["ddf"])
        out["warped_seg_moving"] = self.warp(torch.softmax(out["seg_moving"], dim=1), out["ddf"])
        return out


class TumourSegmentationNet(JointRegSegNet):
    """The joint model's segmentation path on ONE image: ``(B, in_channels, *spatial)`` -> tumour logits.

    Same modules and parameters as :class:`JointRegSegNet` built with the same options (its checkpoints load
    unchanged, ``half_res`` included); only ``forward`` differs, so single-image tools (MONAI Label,
    ``verify_net_in_out``) can run the segmentation alone.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pair_input(x, self.spatial_dims, self.in_channels, self.size_divisor)
        return self.segment(x)
