"""Classical rigid / affine pre-alignment with ITK (mutual information, multi-resolution).

The result is a world-space **pull-back** matrix in RAS millimetres, like the bundle's DDFs: it maps a point
of the fixed image's world to the corresponding point of the moving image's world. ITK works in LPS; the
conversion is :mod:`bundle.spatial.world`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import itk
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.itk_torch_bridge import metatensor_to_itk_image

from bundle.spatial.world import ras_lps_conjugate

__all__ = ["TRANSFORMS", "to_itk_image", "itk_affine_register"]

TRANSFORMS = ("none", "rigid", "affine")


def to_itk_image(array: np.ndarray, affine_ras: np.ndarray) -> itk.Image:
    """A 3D float ITK image from an array indexed ``(i, j, k)`` and its voxel-to-world RAS affine
    (MONAI's ``metatensor_to_itk_image``, which does the RAS -> LPS conversion).

    Raises:
        ValueError: not a 3D array, or a 4x4 affine that is singular.
    """
    array = np.asarray(array, dtype=np.float32)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    if array.ndim != 3 or affine_ras.shape != (4, 4):
        raise ValueError(f"expected a 3D array and a 4x4 affine, got {array.shape} and {affine_ras.shape}.")
    if np.any(np.linalg.norm(affine_ras[:3, :3], axis=0) <= 0) or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-12:
        raise ValueError(f"singular voxel-to-world affine:\n{affine_ras}")
    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(affine_ras))  # space: RAS
    return metatensor_to_itk_image(image, channel_dim=0, dtype=np.float32)


def _matrix_of(transform) -> np.ndarray:
    """4x4 LPS matrix of an ITK matrix-offset transform (fixed physical point -> moving physical point)."""
    out = np.eye(4)
    out[:3, :3] = itk.array_from_matrix(transform.GetMatrix())
    out[:3, 3] = np.asarray(transform.GetOffset(), dtype=np.float64)
    return out


def _shrunk(image: itk.Image, spacing_mm: float | None) -> itk.Image:
    """``image`` bin-shrunk (block mean) by integer factors towards ``spacing_mm``."""
    if spacing_mm is None:
        return image
    size = image.GetLargestPossibleRegion().GetSize()
    # at most the image's size: ITK refuses a bin larger than the image (tiny voxels, e.g. 1e-4 mm)
    factors = [max(1, min(int(round(spacing_mm / s)), int(n))) for s, n in zip(image.GetSpacing(), size)]
    return image if factors == [1, 1, 1] else itk.bin_shrink_image_filter(image, shrink_factors=factors)


def _run_stage(fixed, moving, transform, shrink, sigmas, iterations, sampling, bins, seed):
    image_type = itk.Image[itk.F, 3]
    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New()
    metric.SetNumberOfHistogramBins(bins)
    metric.SetMaximumNumberOfWorkUnits(1)  # per-thread histograms summed in varying order: not reproducible
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    optimizer.SetLearningRate(1.0)
    optimizer.SetMinimumStepLength(1e-4)
    optimizer.SetRelaxationFactor(0.6)
    optimizer.SetNumberOfIterations(int(max(iterations)))
    optimizer.SetScalesEstimator(scales)
    optimizer.SetDoEstimateLearningRateOnce(True)
    method = itk.ImageRegistrationMethodv4[image_type, image_type].New()
    method.SetFixedImage(fixed)
    method.SetMovingImage(moving)
    method.SetMetric(metric)
    method.SetOptimizer(optimizer)
    method.SetInitialTransform(transform)
    method.InPlaceOn()
    method.SetNumberOfLevels(len(shrink))
    method.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    method.SetSmoothingSigmasPerLevel([float(s) for s in sigmas])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    method.SetMetricSamplingPercentage(float(sampling))
    method.MetricSamplingReinitializeSeed(int(seed))
    try:
        method.Update()
    except RuntimeError as e:  # ITK's exceptions: e.g. too few samples inside the moving image
        raise ValueError(f"ITK {transform.GetNameOfClass()} registration failed: {str(e).strip().splitlines()[-1]}") from e
    return transform


def itk_affine_register(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    transform: str = "affine",
    working_spacing_mm: float | None = 2.0,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (4.0, 2.0, 1.0),
    iterations: int = 100,
    sampling: float = 0.2,
    max_samples: int | None = 50_000,
    bins: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """Rigid or affine registration of ``moving`` to ``fixed`` by Mattes mutual information.

    Centre-of-mass (image moments) initialisation, then a rigid (versor) stage, then for ``"affine"`` a
    full affine stage initialised from it; each stage is multi-resolution (``shrink_factors`` with Gaussian
    smoothing ``smoothing_sigmas_mm``), regular-step gradient descent with physical-shift parameter scales,
    a random ``sampling`` fraction of the fixed voxels (seeded, and the metric runs on one thread: ITK's
    per-thread histograms are summed in a varying order, so the result is reproducible only that way).

    Args:
        moving, fixed: 3D intensity arrays indexed ``(i, j, k)`` (one channel).
        moving_affine, fixed_affine: their 4x4 voxel-to-world RAS affines (as MONAI / nibabel give them).
        transform: ``"none"`` (identity), ``"rigid"`` or ``"affine"``.
        working_spacing_mm: both images are first bin-shrunk (averaged) to about this spacing (cost; the
            transform is global, so finer voxels add little); ``None`` keeps the native grids.
        shrink_factors, smoothing_sigmas_mm: the resolution pyramid, coarse to fine.
        iterations: maximum optimiser iterations per level.
        sampling: fraction of fixed voxels sampled by the metric.
        max_samples: at most this many samples at the finest level (lowers ``sampling`` on large images,
            where the cost grows with the voxel count but the accuracy does not); ``None``: no cap.
        bins: histogram bins of the metric.
        seed: seed of the metric sampling.

    Returns:
        ``(4, 4)`` float64 pull-back matrix ``T`` in RAS mm: fixed world point ``p`` corresponds to moving
        world point ``T @ p``.

    Raises:
        ValueError: unknown ``transform``, mismatched pyramid settings, bad arrays or affines, a constant
            image, a single voxel along an axis, or an ITK failure (e.g. images that do not overlap after
            initialisation).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
    if len(shrink_factors) != len(smoothing_sigmas_mm):
        raise ValueError(f"shrink_factors {shrink_factors} and smoothing_sigmas_mm {smoothing_sigmas_mm} differ in length.")
    if not 0 < sampling <= 1:
        raise ValueError(f"sampling must be in (0, 1], got {sampling}.")
    if transform == "none":
        return np.eye(4)
    for name, array in (("moving", moving), ("fixed", fixed)):
        if not np.ptp(np.asarray(array)) > 0:
            raise ValueError(f"the {name} image is constant: nothing to align.")
        if min(np.shape(array)) < 2:  # ITK would see a 2D image (MONAI's bridge drops the axis)
            raise ValueError(f"the {name} image has shape {np.shape(array)}: {transform} pre-alignment needs 2 or "
                             "more voxels along each axis (use prealign 'none').")
    fixed_image = _shrunk(to_itk_image(fixed, fixed_affine), working_spacing_mm)
    moving_image = _shrunk(to_itk_image(moving, moving_affine), working_spacing_mm)
    if max_samples is not None:
        if max_samples < 1000:
            raise ValueError(f"max_samples must be >= 1000 (or None), got {max_samples}.")
        sampling = min(sampling, max_samples / np.prod(fixed_image.GetLargestPossibleRegion().GetSize()))
    pyramid = dict(shrink=shrink_factors, sigmas=smoothing_sigmas_mm, iterations=[iterations], sampling=sampling)

    rigid = itk.VersorRigid3DTransform[itk.D].New()
    initializer = itk.CenteredTransformInitializer[type(rigid), type(fixed_image), type(moving_image)].New(
        Transform=rigid, FixedImage=fixed_image, MovingImage=moving_image
    )
    initializer.MomentsOn()  # centre of mass: the images may not overlap at all in world space
    initializer.InitializeTransform()
    _run_stage(fixed_image, moving_image, rigid, bins=bins, seed=seed, **pyramid)
    if transform == "rigid":
        return ras_lps_conjugate(_matrix_of(rigid))

    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    _run_stage(fixed_image, moving_image, affine, bins=bins, seed=seed, **pyramid)
    return ras_lps_conjugate(_matrix_of(affine))
