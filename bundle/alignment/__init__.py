"""Pre-alignment of a pair before the deformable network (classical ITK rigid / affine)."""

from bundle.alignment.itk_affine import TRANSFORMS, itk_affine_register, to_itk_image

__all__ = ["TRANSFORMS", "itk_affine_register", "to_itk_image"]
