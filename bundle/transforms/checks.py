"""Dict transforms that reject bad input early with an error naming the file and the problem."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform

__all__ = [
    "CheckChannelsd", "CheckFinited", "CheckLabeld", "CheckMemoryd", "CheckPaird", "InsufficientMemoryError", "MAX_LABEL", "available_memory_bytes", "estimate_memory_bytes",
    "source_name",
]

MAX_LABEL = 2**24  # the largest integer up to which float32 holds every integer


def source_name(data: Mapping, key: Hashable) -> str:
    """The file an item came from (MONAI ``filename_or_obj`` meta), else its key."""
    meta = getattr(data[key], "meta", {}) or {}
    name = meta.get("filename_or_obj")
    return f"{key} ({name})" if name else str(key)


class CheckFinited(MapTransform):
    """Raise ``ValueError`` when an image holds NaN or Inf voxels, has no voxel, or is constant in a channel
    (an empty or blank image: nothing to register or segment, whatever the pre-alignment), or when its
    voxel-to-world affine (a MetaTensor's) is not finite or singular (a zero voxel size in the header).

    One exception: in a multi-channel image, an all-zero channel beside a channel that is not constant is a
    missing sequence (e.g. no FLAIR: the tumour recipe trains with sequences dropped to zero) and is accepted."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key])
            if not torch.isfinite(values).all():
                bad = int((~torch.isfinite(values)).sum())
                raise ValueError(f"{source_name(d, key)}: {bad} NaN/Inf voxels; fix or mask the image first.")
            if values.numel() == 0:
                raise ValueError(f"{source_name(d, key)}: the image has no voxels (shape {tuple(values.shape)}).")
            flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
            constant = [c for c in range(flat.shape[0]) if flat[c].min() == flat[c].max()]
            missing = [c for c in constant if float(flat[c, 0]) == 0.0] if len(constant) < flat.shape[0] else []
            constant = [c for c in constant if c not in missing]
            if constant:
                raise ValueError(f"{source_name(d, key)}: channel {constant[0]} is constant (every voxel "
                                 f"{float(flat[constant[0], 0]):g}); an empty or blank image cannot be registered.")
            affine = getattr(d[key], "affine", None)
            if affine is not None:
                affine = torch.as_tensor(affine, dtype=torch.float64)
                if 1 < values.ndim < affine.shape[0]:  # a 2-D image: MONAI's spatial transforms use the 2-D block
                    affine = to_affine_nd(values.ndim - 1, affine)
                linear = affine[:-1, :-1]
                if not torch.isfinite(affine).all() or torch.linalg.matrix_rank(linear) < linear.shape[0]:
                    raise ValueError(f"{source_name(d, key)}: the voxel-to-world affine {_rounded(affine)} is "
                                     "not finite or singular (a zero voxel size?); fix the header's sform/qform.")
        return d


def _rounded(matrix: torch.Tensor) -> list:
    return [[round(v, 4) for v in row] for row in matrix.tolist()]


class CheckLabeld(MapTransform):
    """Check that label maps hold non-negative integers (floats with integer values are cast).

    Label values must also be at most ``2**24``: the images are loaded and resampled in float32, which holds
    larger integers only approximately (a label id would silently turn into a neighbouring one).

    Args:
        keys: label keys.
        num_classes: if given, labels must also be ``< num_classes``.
        allow_missing_keys: skip absent keys (pairs without labels).

    Raises:
        ValueError: non-integer, negative or too large label values.
    """

    def __init__(self, keys: KeysCollection, num_classes: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            values = torch.as_tensor(label)
            if values.is_floating_point():
                if not torch.isfinite(values).all() or not torch.equal(values, values.round()):
                    raise ValueError(f"{source_name(d, key)}: label values must be integers, found fractional or NaN values.")
            if values.numel() and values.min() < 0:
                raise ValueError(f"{source_name(d, key)}: label values must be >= 0, found {values.min().item()}.")
            if values.numel() and float(values.max()) > MAX_LABEL:  # a Python number: a uint8 tensor would wrap 2**24 to 0
                raise ValueError(f"{source_name(d, key)}: label value {values.max().item():.0f} > 2**24, which float32 "
                                 "(the pipeline's resampling) does not hold exactly; renumber the labels.")
            if self.num_classes is not None and values.numel() and values.max() >= self.num_classes:
                raise ValueError(
                    f"{source_name(d, key)}: label value {int(values.max())} >= num_classes={self.num_classes}."
                )
            d[key] = label.to(torch.int64) if values.is_floating_point() else label
        return d


class CheckPaird(MapTransform):
    """Check that channel-first moving and fixed images (and their labels) have compatible dimensions.

    Moving and fixed must have the same number of spatial dims (both 2D or both 3D) and channels (``num_channels``
    when given: what the network takes, e.g. not the frames of a 4-D series); a label must have one channel and
    the spatial shape of its image.

    Args:
        keys: ``(moving, fixed)`` image keys.
        label_keys: ``(moving_label, fixed_label)`` keys, either may be absent from the data or ``None``
            (not checked, e.g. a label that the pipeline does not load).
        num_channels: the channels each image must have; ``None``: any, the same for both.
        channel_names: what those channels are (named in the error), e.g. ``["T1c", "FLAIR"]``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving", "fixed"),
        label_keys=("moving_label", "fixed_label"),
        num_channels: int | None = None,
        channel_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving, fixed), got {self.keys}.")
        self.label_keys = tuple(label_keys)
        self.num_channels = num_channels
        self.channel_names = channel_names

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        moving_key, fixed_key = self.keys
        moving, fixed = d[moving_key], d[fixed_key]
        if moving.ndim != fixed.ndim:
            raise ValueError(
                f"{source_name(d, moving_key)} is {moving.ndim - 1}D but {source_name(d, fixed_key)} is "
                f"{fixed.ndim - 1}D (shapes {tuple(moving.shape)} and {tuple(fixed.shape)}, channel first)."
            )
        if moving.ndim not in (3, 4):
            raise ValueError(f"{source_name(d, moving_key)}: expected a 2D or 3D image, got shape {tuple(moving.shape)}.")
        if moving.shape[0] != fixed.shape[0]:
            raise ValueError(
                f"{source_name(d, moving_key)} has {moving.shape[0]} channels but {source_name(d, fixed_key)} "
                f"has {fixed.shape[0]}."
            )
        if self.num_channels is not None and moving.shape[0] != self.num_channels:
            raise ValueError(
                f"{source_name(d, moving_key)} and {source_name(d, fixed_key)} have {moving.shape[0]} channels, "
                f"expected {_expected_channels(self.num_channels, self.channel_names)}."
            )
        for image_key, label_key in zip(self.keys, self.label_keys):
            if label_key is None or label_key not in d:
                continue
            label, image = d[label_key], d[image_key]
            if label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{source_name(d, label_key)} has shape {tuple(label.shape)}, expected (1, "
                    f"{', '.join(map(str, image.shape[1:]))}) like {source_name(d, image_key)}."
                )
        return d


def _expected_channels(num_channels: int, names: Sequence[str] | None) -> str:
    what = f" ({', '.join(names)}: a list of files, or one 4-D image)" if names else " (a 4-D image is read as channels)"
    return f"{num_channels}{what}, num_channels"


class CheckChannelsd(MapTransform):
    """Check that each channel-first image has the ``num_channels`` channels the network takes (a clear error naming
    the file, instead of a convolution's shape error).

    Args:
        keys: images to check.
        num_channels: the channels each must have.
        channel_names: what those channels are (named in the error), e.g. ``["T1c", "FLAIR"]``.
    """

    def __init__(self, keys: KeysCollection, num_channels: int, channel_names: Sequence[str] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels, self.channel_names = int(num_channels), channel_names

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] != self.num_channels:
                raise ValueError(f"{source_name(d, key)} has {d[key].shape[0]} channel(s), expected "
                                 f"{_expected_channels(self.num_channels, self.channel_names)}.")
        return d


# Peak host memory of `configs/inference.json` (forward pass, no refinement) measured by
# `benchmarks/memory_peak.py` (docs/results/memory_peak_cpu.csv): a fixed cost plus bytes per native voxel of each
# input image (resampling, warping, Jacobian and writers on the fixed grid) plus bytes per network-grid voxel.
MEMORY_BASE_BYTES = 0.8e9
MEMORY_BYTES_PER_INPUT_VOXEL = 60.0
MEMORY_BYTES_PER_NETWORK_VOXEL = 70.0
# Refinement (instance optimisation: autograd through the warp, LNCC and the velocity integration on the network
# grid), on top of the above; from `benchmarks/memory_peak.py --refine` (same CSV, rows with refine True).
MEMORY_BYTES_PER_REFINED_VOXEL = 520.0  # the largest per-voxel excess measured (2 mm grid, 3 sizes): never under
# Refinement on the fixed native grid (`RefineNatived`, residual "svf"), per fixed native voxel (counted over the whole
# fixed grid: the foreground box can be all of it): the largest excess over the run without it measured by
# `benchmarks/memory_peak.py --refine-native` (rows with native_refinement True: 127, 187 and 165 B at 3 sizes).
MEMORY_BYTES_PER_NATIVE_REFINED_VOXEL = 190.0


class InsufficientMemoryError(MemoryError, ValueError):
    """A pair too large for this machine's memory: a ``MemoryError`` that is also an input error (a ``ValueError``:
    reported as one line naming the files, like any bad input)."""


def available_memory_bytes() -> float | None:
    """Memory the system can still give this process (``MemAvailable`` of ``/proc/meminfo``, else psutil's), or
    ``None`` where neither is available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return None


def estimate_memory_bytes(input_voxels: float, network_voxels: float, refinement: bool = False,
                          native_refined_voxels: float = 0.0) -> float:
    """Peak host memory of one inference pair, with or without refinement on the network grid and on the native grid
    (``native_refined_voxels``: the fixed image's voxels, channels included, when it is refined; see the constants)."""
    per_network_voxel = MEMORY_BYTES_PER_NETWORK_VOXEL + (MEMORY_BYTES_PER_REFINED_VOXEL if refinement else 0.0)
    return (MEMORY_BASE_BYTES + MEMORY_BYTES_PER_INPUT_VOXEL * input_voxels + per_network_voxel * network_voxels
            + MEMORY_BYTES_PER_NATIVE_REFINED_VOXEL * native_refined_voxels)


class CheckMemoryd(MapTransform):
    """Refuse, before any computation, a pair whose estimated peak memory exceeds what the machine has, naming the
    files, the estimate and the options that would fit (a coarser network grid, images resampled to coarser voxels),
    instead of being killed by the system half-way.

    Args:
        keys: image keys (each image's voxels count, channels included).
        pixdim: network grid spacing in mm (its voxels are counted over the fixed image's field of view).
        fixed_key: the image that defines the output grid and the field of view.
        enabled: ``False`` skips the check (``memory_check`` config id).
        available: bytes available (default: :func:`available_memory_bytes` at each call).
        refinement: the pair's field is refined (instance optimisation) on the network grid: counted too.
        native_refinement: the transform is refined on the fixed image's native grid (``RefineNatived``): counted too.
    """

    def __init__(self, keys: KeysCollection, pixdim, fixed_key: str = "fixed", enabled: bool = True,
                 available: float | None = None, refinement: bool = False, native_refinement: bool = False) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.refinement, self.native_refinement = bool(refinement), bool(native_refinement)
        self.pixdim = [float(p) for p in pixdim]
        self.fixed_key, self.enabled, self.available = fixed_key, bool(enabled), available

    def network_voxels(self, image, pixdim) -> float:
        affine = torch.as_tensor(getattr(image, "affine", torch.eye(4)), dtype=torch.float64)
        spatial = image.shape[1:]
        spacing = torch.linalg.norm(affine[: len(spatial), : len(spatial)], dim=0).tolist()
        voxels = 1.0
        for n, s, p in zip(spatial, spacing, pixdim):
            voxels *= max(1.0, n * s / p)
        return voxels

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        available = self.available if self.available is not None else available_memory_bytes()
        if not self.enabled or available is None or self.fixed_key not in d:
            return d
        inputs = sum(float(torch.as_tensor(d[k]).numel()) for k in self.key_iterator(d))
        channels = d[self.fixed_key].shape[0]
        network = self.network_voxels(d[self.fixed_key], self.pixdim) * channels
        native = float(torch.as_tensor(d[self.fixed_key]).numel()) if self.native_refinement else 0.0
        need = estimate_memory_bytes(inputs, network, self.refinement, native)
        if need <= available:
            return d
        gib = 2.0**30
        options = []
        coarser = [2 * p for p in self.pixdim]
        if estimate_memory_bytes(inputs, self.network_voxels(d[self.fixed_key], coarser) * channels, self.refinement,
                                 native) <= available:
            options.append(f"a coarser network grid (--pixdim {coarser})")
        spare = available - MEMORY_BASE_BYTES
        if spare > 0:
            factor = ((need - MEMORY_BASE_BYTES) / spare) ** (1 / 3)
            options.append(f"the images resampled to voxels about {factor * 1.05:.1f}x larger along each axis")
        if self.refinement:
            options.append("no refinement (instance_optimisation_steps 0, or brainreg register without --refine)")
        if self.native_refinement:
            options.append("no refinement on the native grid (native_refinement_levels [])")
        options.append("a machine with more memory, or memory_check False to try anyway")
        files = ", ".join(source_name(d, k) for k in self.key_iterator(d))
        raise InsufficientMemoryError(f"{files}: this pair needs about {need / gib:.1f} GiB of memory, {available / gib:.1f} GiB "
                          f"are available; options: {'; '.join(options)}.")
