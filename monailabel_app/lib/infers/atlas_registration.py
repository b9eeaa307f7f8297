"""Registration-based segmentation: an atlas (image + label map) registered onto the image, its labels warped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import CastToTyped, Lambda, MapTransform, SqueezeDimd

from bundle.configs import checkpoint_overlays
from bundle.data.demo import build_demo_dataset
from bundle.engines.checkpoints import network_state_dict

from ..bundle_config import AppSettings, read_config
from .base import BundleConfigInferTask

__all__ = ["AtlasRegistration", "AtlasPaird", "DEMO_ATLAS", "DEMO_ATLAS_LABELS"]

logger = logging.getLogger(__name__)

# the embedded demo's first synthetic subject (MNI ICBM152 2009a under a random smooth deformation)
DEMO_ATLAS = ("subject_00.nii.gz", "subject_00_seg.nii.gz")
DEMO_ATLAS_LABELS = {"grey matter": 1, "white matter": 2}
# request key that MyApp.infer sets for an atlas chosen from the datastore (never taken from the client)
ATLAS_KEY = "_atlas"


class AtlasPaird(MapTransform):
    """Make a registration pair of the request: its ``image`` is the fixed image, the atlas the moving one.

    The atlas is ``d[ATLAS_KEY] = (image, label)`` when the request chose one, else ``default()``: ``(image, label)``
    or ``(image, label, brain_mask)``, the mask (if not None) becoming ``moving_brain_mask``.
    """

    def __init__(self, default: Callable[[], tuple[str, ...]], image_key: str = "image"):
        super().__init__(keys=[image_key])
        self.default, self.image_key = default, image_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        moving, moving_label, *brain_mask = d.get(ATLAS_KEY) or self.default()
        d.update(fixed=d[self.image_key], moving=moving, moving_label=moving_label)
        if brain_mask and brain_mask[0]:
            d["moving_brain_mask"] = brain_mask[0]
        d["result"] = {"atlas_image": str(moving), "atlas_label": str(moving_label)}
        for key in ("fixed_brain_mask", "moving_brain_mask"):  # from brain_mask_tag (the app) or atlas_brain_mask
            if d.get(key):
                d["result"][key] = str(d[key])
        return d


def _finish(d: dict) -> dict:
    """The atlas labels on the image's grid become MONAI Label's ``pred``; the result JSON gets the folding."""
    d = dict(d)
    d["pred"] = d["warped_label"]
    folding = float((torch.as_tensor(d["jacobian_det"]) <= 0).float().mean() * 100.0)
    d["result"] = {**d.get("result", {}), "folding_percent": folding}
    return d


class AtlasRegistration(BundleConfigInferTask):
    """Warp an atlas onto the request's image with the bundle's registration pipeline (``configs/inference.json``
    and its shipped registration model, or ``--conf atlas_model`` with the configs its parameters call for).

    The image is the **fixed** image and the atlas the **moving** one, so the displacement field lives on the
    image's grid and the atlas labels are pulled onto it (nearest neighbour) exactly as ``warped_label.nii.gz``
    of the bundle's ``inference`` command. The atlas is ``--conf atlas_image``/``atlas_label``, a labelled
    datastore image chosen with the request parameter ``atlas`` (its id; see ``main.py``), or the embedded
    demo's first subject (built on first use in the bundle's ``demo_dir``).

    Brain masks (``inference.json``'s ``fixed_brain_mask`` / ``moving_brain_mask``) are set by
    :class:`main.BrainRegistrationApp` from the request's ``brain_mask_tag``: the image's label of that tag, and the
    datastore atlas's label of that tag where it has one; a ``--conf`` atlas's mask is ``--conf atlas_brain_mask``,
    applied on every request. The result JSON names the masks applied.
    """

    brain_mask_key = "fixed_brain_mask"  # the request's image is the fixed image
    atlas_brain_mask_key = "moving_brain_mask"

    def __init__(self, settings: AppSettings, **kwargs):
        model = settings.atlas_model or settings.model
        configs = ("inference.json", *checkpoint_overlays(settings.bundle_root, ["inference.json"], network_state_dict(model), path=str(model)))
        parser = read_config(settings.bundle_root, configs, settings.overrides)
        self.demo_dir = Path(parser.get_parsed_content("demo_dir"))
        self.atlas = (settings.atlas_image, settings.atlas_label, settings.atlas_brain_mask) if settings.atlas_image else None
        self._atlas_lock = threading.Lock()  # MONAI Label may run requests in threads: build the demo once
        labels = settings.atlas_label_names or (
            _label_names(settings.atlas_label) if self.atlas else dict(DEMO_ATLAS_LABELS)
        )
        super().__init__(
            parser,
            [str(model)],
            labels=labels,
            description="Registration-based segmentation: the atlas labels warped onto the image by the registration model",
            config={"atlas": "", "brain_mask_tag": ""},  # request options (3D Slicer shows them)
            **kwargs,
        )
        self.prepare_batch = parser.get_parsed_content("prepare_batch", instantiate=True)

    def default_atlas(self) -> tuple[str, str, str | None]:
        """The configured atlas (image, label, brain mask or None), or the embedded demo's (built once in the
        bundle's ``demo_dir``; skull-stripped)."""
        with self._atlas_lock:
            if self.atlas is None:
                folder = Path(build_demo_dataset(str(self.demo_dir))).parent
                self.atlas = (*(str(folder / name) for name in DEMO_ATLAS), None)
            return self.atlas

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [AtlasPaird(self.default_atlas), *super().pre_transforms(data)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [
            *super().post_transforms(data),
            SqueezeDimd(keys="warped_label", dim=0),  # (1, *spatial) -> (*spatial): one label volume
            CastToTyped(keys="warped_label", dtype=np.int16),
            Lambda(_finish),
        ]

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        """The network input is built by the bundle's ``prepare_batch`` (``cat([moving, fixed])``)."""
        batch = {key: data[key][None] for key in ("moving", "fixed")}
        inputs, _ = self.prepare_batch(batch, torch.device(device))
        network = self._get_network(device, data)
        with torch.no_grad():
            data["pred"] = self.inferer(data)(inputs, network)[0]
        return data


def _label_names(label_path: str) -> dict[str, int]:
    """``{"label <v>": v}`` for the non-zero values of an atlas label map without configured names."""
    values = np.unique(np.asarray(nib.load(label_path).dataobj))
    return {f"label {int(v)}": int(v) for v in values if v != 0}
