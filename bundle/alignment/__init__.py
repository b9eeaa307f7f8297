"""Pre-alignment of a pair before the deformable network: classical ITK rigid / affine (mutual information), or a
fast torch version (normalised cross-correlation for same-contrast pairs, or mutual information)."""

from bundle.alignment.itk_affine import TRANSFORMS, itk_affine_register, to_itk_image
from bundle.alignment.torch_affine import MI_LEVELS, TORCH_LEVELS, torch_affine_register

METHODS = {"itk": itk_affine_register, "torch": torch_affine_register}

__all__ = ["TRANSFORMS", "METHODS", "MI_LEVELS", "TORCH_LEVELS", "itk_affine_register", "torch_affine_register", "to_itk_image"]
