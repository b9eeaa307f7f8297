"""MONAI bundle for deep-learning deformable registration with joint brain-tumour segmentation."""

from . import configs, engines, errors, io, losses, metrics, networks, spatial, transforms

__version__ = "0.1.0"
