"""Tumour segmentation of one image with the joint model's shared encoder and segmentation decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from monai.transforms import CastToTyped, SqueezeDimd

from ..bundle_config import AppSettings, read_config, read_metadata
from .base import BundleConfigInferTask

__all__ = ["TumourSegmentation"]


class TumourSegmentation(BundleConfigInferTask):
    """``bundle.networks.TumourSegmentationNet`` on the request's image; returns the tumour label map on its grid.

    Pre-processing, inferer and post-processing are those of ``configs/inference_segmentation.json`` (an overlay
    of ``configs/inference.json`` and the model's architecture overlays, see :meth:`AppSettings.segmentation_configs`; post-processing from
    ``configs/monailabel_infer.json``: logits resampled onto the image's native grid, argmax); the labels are the
    model's classes (:meth:`AppSettings.tumour_labels`: oedema 1 and tumour core 2 for the shipped tumour
    model, tumour 1 for a one-class model). The shipped tumour model takes T1c and FLAIR as one 2-channel (4-D)
    image.

    A brain mask is applied when :class:`main.BrainRegistrationApp` puts one under :attr:`brain_mask_key` (the
    request's ``brain_mask_tag``: a label of the datastore image); ``monailabel_infer.json`` turns the bundle's mask
    input off for MONAI Label's stock app, where a request could name any server file, and this task turns it on.
    """

    brain_mask_key = "brain_mask"  # the data key of inference_segmentation.json's brain-mask input

    def __init__(self, settings: AppSettings, **kwargs):
        metadata = read_metadata(settings.bundle_root)
        overrides = {**(settings.overrides or {}), "brain_mask_input": True}
        super().__init__(
            read_config(settings.bundle_root, settings.segmentation_configs(), overrides),
            settings.model_paths,
            labels=settings.tumour_labels(),
            description="Tumour segmentation with the joint registration/segmentation model's segmentation head",
            config={"brain_mask_tag": ""},  # a request option (3D Slicer shows it)
            **kwargs,
        )
        self.version = metadata.get("version")

    def info(self):
        return {**super().info(), "version": self.version}

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [
            *super().post_transforms(data),
            SqueezeDimd(keys="pred", dim=0),  # (1, *spatial) -> (*spatial): MONAI Label writes one label volume
            CastToTyped(keys="pred", dtype=np.uint8),
        ]
