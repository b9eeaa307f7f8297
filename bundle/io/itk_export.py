"""Export DDFs to ITK (and ANTs) displacement fields and transform files, and read them back.

Our DDF (see :mod:`bundle.spatial`) is a pull-back ``warped(i) = moving(A (i + ddf(i)))`` on the fixed image's
grid, in **voxel units** of that grid, channel k along array axis k, with ``A`` the grid's voxel-to-world
affine in **RAS** millimetres (nibabel / MONAI). ITK describes the same map as a displacement field
transform ``T(x) = x + u(x)`` in **physical LPS millimetres**, ``u`` sampled on the fixed image's grid
(its origin, spacing and direction, in LPS), and resamples ``output(x) = moving(T(x))``: also a pull-back.
So, with ``M`` the linear part of ``A`` and ``F = diag(-1, -1, 1)`` the RAS <-> LPS flip::

    u(x) = F M ddf(i)        at  x = F A i        (and back: ddf(i) = M^-1 F u(x))

The RAS <-> LPS conversion itself is :mod:`bundle.spatial.world`; this module builds the ITK objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.io.writers import pair_folder, staging_folder, write_atomic
from bundle.spatial.world import affine_from_itk_direction, ddf_to_lps_mm, itk_grid_from_affine, lps_mm_to_ddf

__all__ = [
    "FIELD_SUFFIXES",
    "TRANSFORM_SUFFIXES",
    "itk_grid_from_affine",
    "affine_from_itk_grid",
    "ddf_to_itk_field",
    "itk_field_to_ddf",
    "ddf_to_itk_transform",
    "write_itk_displacement_field",
    "write_itk_transform",
    "read_itk_displacement_field",
    "read_ddf_nifti",
    "export_ddf_file",
    "SaveITKTransformd",
]

FIELD_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")  # single-file formats (one atomic rename)
TRANSFORM_SUFFIXES = (".h5", ".hdf5")


def _as_ddf(ddf) -> np.ndarray:
    """A ``(ndim, *spatial)`` float64 array of a 2D or 3D DDF (numpy or torch)."""
    array = ddf.detach().cpu().numpy() if isinstance(ddf, torch.Tensor) else np.asarray(ddf)
    ndim = array.shape[0] if array.ndim else 0
    if ndim not in (2, 3) or array.ndim != ndim + 1:
        raise ValueError(f"ddf must be (ndim, *spatial) with ndim 2 or 3, got shape {array.shape}.")
    return array.astype(np.float64)


def _as_affine(affine, ndim: int) -> np.ndarray:
    array = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    array = array.astype(np.float64)
    if array.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"affine must be {ndim + 1}x{ndim + 1} for a {ndim}D DDF, got shape {array.shape}.")
    return array


def affine_from_itk_grid(image) -> np.ndarray:
    """RAS voxel-to-world affine ``(ndim+1, ndim+1)`` of an ITK image's grid (the inverse of :func:`itk_grid_from_affine`)."""
    return affine_from_itk_direction(
        np.asarray(image.GetOrigin(), dtype=np.float64), np.asarray(image.GetSpacing(), dtype=np.float64),
        itk.array_from_matrix(image.GetDirection()).astype(np.float64),
    )


def _itk_field(values: np.ndarray, affine: np.ndarray, component) -> itk.Image:
    """An ``itk.Image[itk.Vector[component, ndim], ndim]`` on the grid of ``affine`` holding ``values``.

    ``values`` is ``(*spatial, ndim)`` indexed like our arrays (axis k = ITK index k); ITK's numpy view is
    in reversed axis order, hence the transpose.
    """
    ndim = values.shape[-1]
    origin, spacing, direction = itk_grid_from_affine(affine)
    image = itk.Image[itk.Vector[component, ndim], ndim].New()
    image.SetRegions([int(s) for s in values.shape[:ndim]])
    image.Allocate()
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    view = itk.array_view_from_image(image)
    view[...] = np.transpose(values, (*reversed(range(ndim)), ndim))
    return image


def ddf_to_itk_field(ddf, affine) -> itk.Image:
    """Our DDF as an ITK displacement field ``itk.Image[itk.Vector[itk.F, ndim], ndim]`` (physical LPS mm).

    Args:
        ddf: ``(ndim, *spatial)`` pull-back DDF in voxel units of the grid, channel k along array axis k.
        affine: ``(ndim+1, ndim+1)`` voxel-to-world affine of that grid (RAS mm), e.g. ``ddf.nii.gz``'s.

    Returns:
        the field on the same grid (ITK origin, spacing and direction in LPS), float32 vectors.

    Raises:
        ValueError: bad shapes, or a sheared affine.
    """
    ddf = _as_ddf(ddf)
    affine = _as_affine(affine, ddf.shape[0])
    return _itk_field(ddf_to_lps_mm(ddf, affine).astype(np.float32), affine, itk.F)


def itk_field_to_ddf(field) -> tuple[np.ndarray, np.ndarray]:
    """An ITK displacement field (physical LPS mm, on its own grid) in our convention.

    Args:
        field: ``itk.Image[itk.Vector[*, ndim], ndim]`` (or an ``itk.VectorImage`` with ``ndim`` components).

    Returns:
        ``(ddf, affine)``: ``(ndim, *spatial)`` float32 DDF in voxel units of the field's grid (channel k
        along array axis k) and that grid's RAS voxel-to-world affine.

    Raises:
        ValueError: the vectors do not have one component per image dimension.
    """
    ndim = field.GetImageDimension()
    values = itk.array_from_image(field).astype(np.float64)
    if values.ndim != ndim + 1 or values.shape[-1] != ndim:
        raise ValueError(
            f"a {ndim}D displacement field needs {ndim} components per voxel, got array shape {values.shape}."
        )
    values = np.transpose(values, (*reversed(range(ndim)), ndim))  # back to our axis order
    affine = affine_from_itk_grid(field)
    return lps_mm_to_ddf(values, affine).astype(np.float32), affine


def ddf_to_itk_transform(ddf, affine) -> itk.CompositeTransform:
    """Our DDF as an ``itk.CompositeTransform[itk.D, ndim]`` holding one ``itk.DisplacementFieldTransform``.

    Args:
        ddf, affine: as :func:`ddf_to_itk_field`.

    Returns:
        a transform mapping fixed physical points (LPS) to moving ones, for ``itk.resample_image_filter``.
    """
    ddf = _as_ddf(ddf)
    affine = _as_affine(affine, ddf.shape[0])
    ndim = ddf.shape[0]
    field = _itk_field(ddf_to_lps_mm(ddf, affine), affine, itk.D)
    displacement = itk.DisplacementFieldTransform[itk.D, ndim].New()
    displacement.SetDisplacementField(field)
    composite = itk.CompositeTransform[itk.D, ndim].New()
    composite.AddTransform(displacement)
    return composite


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    name = path.name.lower()
    for suffix in allowed:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{what} file {path} must end with one of {allowed}.")


def write_itk_displacement_field(ddf, affine, path: str | os.PathLike) -> Path:
    """Write our DDF as an ITK/ANTs displacement field image (physical LPS mm vectors), atomically.

    NIfTI output is ``(X, Y, Z, 1, 3)`` with the vector intent and, unlike our ``ddf.nii.gz``, millimetre
    LPS components: the layout ITK and ANTs (``antsApplyTransforms``) read as a displacement field.

    Args:
        ddf, affine: as :func:`ddf_to_itk_field`.
        path: ``.nii.gz``, ``.nii``, ``.mha`` or ``.nrrd`` file.

    Returns:
        ``path``.

    Raises:
        ValueError: unsupported suffix, bad shapes or a sheared affine.
    """
    path = Path(path)
    suffix = _suffix(path, FIELD_SUFFIXES, "displacement field")
    field = ddf_to_itk_field(ddf, affine)
    return write_atomic(path, suffix, lambda tmp: itk.imwrite(field, tmp, compression=suffix != ".nii"))


def write_itk_transform(ddf, affine, path: str | os.PathLike) -> Path:
    """Write our DDF as an ITK composite transform file (``.h5``) with one displacement field transform, atomically.

    Args:
        ddf, affine: as :func:`ddf_to_itk_field`.
        path: ``.h5`` or ``.hdf5`` file.

    Returns:
        ``path``.

    Raises:
        ValueError: unsupported suffix, bad shapes or a sheared affine.
    """
    path = Path(path)
    suffix = _suffix(path, TRANSFORM_SUFFIXES, "transform")
    transform = ddf_to_itk_transform(ddf, affine)
    return write_atomic(path, suffix, lambda tmp: itk.transformwrite([transform], tmp, compression=True))


def _field_of_transform(transform, path: Path) -> itk.Image:
    """The displacement field of a transform read from ``path``: a displacement field transform, or a
    composite transform holding exactly one."""
    name = transform.GetNameOfClass()
    ndim = transform.GetInputSpaceDimension()
    if name == "CompositeTransform":
        composite = itk.CompositeTransform[itk.D, ndim].cast(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise ValueError(
                f"{path}: composite transform of {composite.GetNumberOfTransforms()} transforms; only a single "
                "displacement field can be read back as a DDF."
            )
        transform = composite.GetNthTransform(0)
        name = transform.GetNameOfClass()
    if name != "DisplacementFieldTransform":
        raise ValueError(f"{path}: holds a {name}, not a displacement field transform.")
    return itk.DisplacementFieldTransform[itk.D, ndim].cast(transform).GetDisplacementField()


def read_itk_displacement_field(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field (image file, or ``.h5`` transform) into our convention.

    Args:
        path: a displacement field image (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``; physical LPS mm vectors),
            or an ``.h5``/``.hdf5`` transform file holding one displacement field transform.

    Returns:
        ``(ddf, affine)`` as :func:`itk_field_to_ddf`: float32 ``(ndim, *spatial)`` DDF in voxel units of the
        field's grid and that grid's RAS affine.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported suffix, or the file holds another kind of transform.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"displacement field not found: {path}")
    suffix = _suffix(path, FIELD_SUFFIXES + TRANSFORM_SUFFIXES, "displacement field")
    if suffix in TRANSFORM_SUFFIXES:
        transforms = itk.transformread(str(path))
        if len(transforms) != 1:
            raise ValueError(f"{path}: holds {len(transforms)} transforms, expected one.")
        return itk_field_to_ddf(_field_of_transform(transforms[0], path))
    return itk_field_to_ddf(_read_vector_image(path))


def _read_vector_image(path: Path) -> itk.Image:
    """A vector image as ``itk.Image[itk.Vector[itk.F, ndim], ndim]`` whatever its stored component type: ITK
    Python wraps no reader for double vectors, which ANTs writes (e.g. ``apply_transforms(compose=...)``)."""
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError(f"{path}: not an image file ITK can read.")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    ndim, components = io.GetNumberOfDimensions(), io.GetNumberOfComponents()
    if ndim not in (2, 3) or components != ndim:
        raise ValueError(f"{path}: a displacement field needs 2 or 3 dimensions with one component per dimension, "
                         f"got {ndim} dimensions and {components} components.")
    return itk.imread(str(path), itk.Vector[itk.F, ndim])


def read_ddf_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``ddf.nii.gz`` written by inference (``(*spatial, 1, ndim)``, voxel units of its own grid).

    Returns:
        ``(ddf, affine)``: float32 ``(ndim, *spatial)`` DDF and the RAS affine (``3x3`` for a 2D field).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a vector field of 2 or 3 components.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DDF file not found: {path}")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] not in (2, 3):
        raise ValueError(f"{path}: expected a (X, Y, Z, 1, ndim) vector field as inference writes, got {data.shape}.")
    ndim = data.shape[4]
    ddf = np.moveaxis(data[:, :, :, 0, :], -1, 0)
    affine = np.asarray(image.affine, dtype=np.float64)
    if ndim == 2:
        if ddf.shape[3] != 1:
            raise ValueError(f"{path}: a 2D field must have a singleton third axis, got {data.shape}.")
        ddf = ddf[..., 0]
        affine = np.block([[affine[:2, :2], affine[:2, 3:]], [np.zeros((1, 2)), np.ones((1, 1))]])
    return ddf, affine


def export_ddf_file(
    ddf_path: str | os.PathLike,
    field_path: str | os.PathLike | None = None,
    transform_path: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Convert an inference ``ddf.nii.gz`` into ITK files next to it (or where given).

    Args:
        ddf_path: the ``ddf.nii.gz`` of a registered pair.
        field_path: displacement field image to write (default ``itk_displacement.nii.gz`` beside ``ddf_path``).
        transform_path: composite transform to write (default ``itk_transform.h5`` beside ``ddf_path``).

    Returns:
        ``{"field": path, "transform": path}``.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_ddf_nifti` and the writers.
    """
    ddf_path = Path(ddf_path)
    field_path = Path(field_path) if field_path is not None else ddf_path.parent / "itk_displacement.nii.gz"
    transform_path = Path(transform_path) if transform_path is not None else ddf_path.parent / "itk_transform.h5"
    _suffix(field_path, FIELD_SUFFIXES, "displacement field")  # check both names before reading or writing
    _suffix(transform_path, TRANSFORM_SUFFIXES, "transform")
    ddf, affine = read_ddf_nifti(ddf_path)
    return {
        "field": write_itk_displacement_field(ddf, affine, field_path),
        "transform": write_itk_transform(ddf, affine, transform_path),
    }


class SaveITKTransformd(MapTransform):
    """Inference post-transform: write the in-memory DDF as ITK/ANTs files, ``<output_dir>/<name>/...``.

    The DDF under ``keys`` is the final one (on the fixed image's native grid, voxel units, its affine in
    the MetaTensor), converted once: ``itk_displacement.nii.gz`` (displacement field image, physical LPS mm)
    and ``itk_transform.h5`` (composite transform), both atomically. ITK's ``resample_image_filter`` with
    the transform reproduces our ``warped.nii.gz`` (tests/test_itk_export.py).

    Args:
        keys: the DDF key (``pred``).
        output_dir: root folder of the outputs (as :class:`bundle.io.SaveNiftid`).
        name_key: item holding the pair's name (a folder per pair).
        field_filename, transform_filename: file names; ``None`` skips that file.
        staged: write into the pair's staging folder (after a staged ``SaveNiftid``; see ``CommitOutputsd``).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = ".",
        name_key: str = "name",
        field_filename: str | None = "itk_displacement.nii.gz",
        transform_filename: str | None = "itk_transform.h5",
        allow_missing_keys: bool = False,
        staged: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.staged = staged
        if field_filename is not None:
            _suffix(Path(field_filename), FIELD_SUFFIXES, "displacement field")
        if transform_filename is not None:
            _suffix(Path(transform_filename), TRANSFORM_SUFFIXES, "transform")
        self.output_dir, self.name_key = Path(output_dir), name_key
        self.field_filename, self.transform_filename = field_filename, transform_filename

    def __call__(self, data) -> dict:
        d = dict(data)
        folder = pair_folder(self.output_dir, d, self.name_key)
        folder = staging_folder(folder) if self.staged else folder
        for key in self.key_iterator(d):
            ddf = d[key]
            if not isinstance(ddf, MetaTensor):
                raise ValueError(f"SaveITKTransformd: {key!r} must be a MetaTensor (its affine places the field).")
            ddf_array = _as_ddf(ddf)
            affine = _as_affine(ddf.affine, ddf_array.shape[0])
            if self.field_filename is not None:
                write_itk_displacement_field(ddf_array, affine, folder / self.field_filename)
            if self.transform_filename is not None:
                write_itk_transform(ddf_array, affine, folder / self.transform_filename)
        return d
