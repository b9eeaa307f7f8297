"""Post-processing of the joint registration + segmentation network's packed output."""

from __future__ import annotations

from collections.abc import Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform

from bundle.networks.joint import logits_to_labels
from bundle.networks.outputs import split_joint_output

__all__ = ["SplitJointOutputd", "LogitsToLabelsd"]


class SplitJointOutputd(MapTransform):
    """Split ``JointRegSegNet``'s packed prediction ``(ndim + 2 * num_classes, *spatial)`` in place.

    The DDF stays under the key (so DDF post-processing works unchanged); the segmentation logits go to
    ``seg_moving`` and ``seg_fixed`` (names configurable), optionally as label maps (argmax).

    Args:
        keys: the packed prediction key (``pred``).
        spatial_dims: 2 or 3.
        num_classes: segmentation classes including background.
        names: output keys of the moving and fixed segmentations.
        argmax: store label maps ``(1, *spatial)`` instead of logits.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        spatial_dims: int = 3,
        num_classes: int = 2,
        names: tuple[str, str] = ("seg_moving", "seg_fixed"),
        argmax: bool = False,
    ) -> None:
        super().__init__(keys)
        self.spatial_dims, self.num_classes, self.names, self.argmax = spatial_dims, num_classes, names, argmax

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            parts = split_joint_output(d[key].unsqueeze(0), self.spatial_dims, self.num_classes)
            d[key] = parts["ddf"][0]
            for name, part in zip(self.names, ("seg_moving", "seg_fixed")):
                seg = parts[part][0]
                d[name] = logits_to_labels(seg, dim=0) if self.argmax else seg
        return d


class LogitsToLabelsd(MapTransform):
    """Channel-first logits ``(C, *spatial)`` -> label map ``(1, *spatial)`` (index of the largest logit).

    What MONAI's ``AsDiscreted(argmax=True)`` computes, ours because its ``torch.argmax`` takes seconds per
    native-resolution volume on CPU (see :func:`bundle.networks.logits_to_labels`). Metadata and dtype are kept.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = logits_to_labels(d[key], dim=0).to(d[key].dtype)  # float, as AsDiscreted returns
        return d
