"""MONAI Label infer tasks of the app: tumour segmentation and atlas (registration-based) segmentation."""

from .atlas_registration import AtlasRegistration
from .tumour_segmentation import TumourSegmentation

__all__ = ["AtlasRegistration", "TumourSegmentation"]
