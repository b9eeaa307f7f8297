"""Refinement of the whole transform on the fixed image's native grid, coarse to fine (after the network).

The network and :class:`~bundle.engines.InstanceOptimisationInferer` work on the network grid (2 or 4 mm);
the anatomy a user scores (cortex, small structures) is resolved at the native 1 mm. This refines the final
pull-back DDF (network and pre-alignment composed, on the fixed native grid) on a pyramid of that grid, the
last level at full resolution, as classical tools do at their finest level. It is ours because MONAI's
instance optimisation (``monai.apps.reconstruction`` has none for registration) only covers a network grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bundle.losses.fixed_target_lncc import FixedTargetLNCCLoss
from bundle.spatial.grid import affine_points
from bundle.spatial.sampling import grid_sample

__all__ = ["RESIDUALS", "check_options", "foreground_box", "refine_native", "robust_normalise"]

RESIDUALS = ("ddf", "svf")


def robust_normalise(image: torch.Tensor) -> torch.Tensor:
    """Each channel scaled to [0, 1] by its 0.5th and 99.5th percentiles (scanner-independent, outliers clipped)."""
    out = torch.empty_like(image, dtype=torch.float32)
    for c, channel in enumerate(image.float()):
        sample = channel.flatten()[:: max(1, channel.numel() // 1_000_000)]  # quantile() has an input size limit
        lo, hi = torch.quantile(sample, torch.tensor([0.005, 0.995]))
        out[c] = ((channel - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return out


def foreground_box(image: torch.Tensor, margin: int, threshold: float = 0.05) -> tuple[slice, ...]:
    """Bounding box of the voxels above ``threshold`` (of a [0, 1] image, any channel), grown by ``margin``
    voxels and clipped to the grid; the whole grid when nothing is above it."""
    mask = (image > threshold).any(0)
    if not bool(mask.any()):
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis, n in enumerate(mask.shape):
        hits = torch.nonzero(mask.any(dim=[a for a in range(mask.ndim) if a != axis])).flatten()
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n)))
    return tuple(box)


def check_options(levels: Sequence[Sequence[int]], learning_rate: float, smoothness: float, residual: str,
                  kernel_size: int) -> list[tuple[int, int]]:
    """The refinement's options validated, ``levels`` as ``(factor, steps)`` integer pairs.

    Raises:
        ValueError: a level with ``factor < 1`` or ``steps < 0``, an unknown ``residual``, ``learning_rate <= 0``,
            ``smoothness < 0`` or an even or non-positive ``kernel_size``.
    """
    levels = [(int(f), int(s)) for f, s in levels]
    if any(f < 1 or s < 0 for f, s in levels):
        raise ValueError(f"levels must be [factor >= 1, steps >= 0] pairs, got {levels}.")
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}.")
    if learning_rate <= 0 or smoothness < 0 or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"need learning_rate > 0, smoothness >= 0 and an odd kernel_size >= 1, got {learning_rate}, "
                         f"{smoothness} and {kernel_size}.")
    return levels


def _level_shape(shape: Sequence[int], factor: int) -> list[int]:
    return [max(2, -(-int(n) // factor)) for n in shape]  # ceil, at least 2 samples per axis


def _taper(shape: Sequence[int], margin: int) -> torch.Tensor:
    """(1, 1, *shape) weights rising linearly from 0 on the faces of the grid to 1 at ``margin`` voxels inside, so
    that the refinement meets the untouched field outside the box without a jump (a jump would fold)."""
    weight = torch.ones(1, 1, *shape)
    for axis, n in enumerate(shape):
        index = torch.arange(n, dtype=torch.float32)
        ramp = (torch.minimum(index, n - 1 - index) / max(margin, 1)).clamp(0, 1)
        weight = weight * ramp.view(*[n if a == axis else 1 for a in range(len(shape))])
    return weight


def _smoothness(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference (diffusion regulariser), in the field's own units."""
    return sum((field.diff(dim=d) ** 2).mean() for d in range(2, field.ndim))


def refine_native(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    ddf: torch.Tensor,
    index_map: torch.Tensor,
    levels: Sequence[Sequence[int]] = ((2, 60), (1, 20)),
    learning_rate: float = 0.25,
    smoothness: float = 1.0,
    residual: str = "ddf",
    kernel_size: int = 5,
    margin: int = 4,
    integration_steps: int = 7,
    progress_every: int = 0,
) -> torch.Tensor:
    """Refine a pull-back DDF on the fixed native grid by local NCC, coarse to fine.

    Args:
        moving: ``(C, *moving_shape)`` moving image on its own grid (as loaded).
        fixed: ``(C, *fixed_shape)`` fixed image on the DDF's grid.
        ddf: ``(ndim, *fixed_shape)`` pull-back DDF in fixed voxels: ``warped(x) = moving(index_map (x + ddf(x)))``.
        index_map: ``(ndim+1, ndim+1)`` fixed voxel -> moving voxel (``moving_affine^-1 @ fixed_affine``).
        levels: ``(factor, steps)`` from coarse to fine; ``factor`` subsamples the fixed grid (1 = native).
        learning_rate: Adam step, in voxels of the level's grid.
        smoothness: weight of the diffusion regulariser on the refinement (not on the network's field, which
            the refinement should not undo).
        residual: ``"ddf"``: a displacement added to the DDF, optimised voxel-wise; ``"svf"``: a stationary
            velocity field on a grid twice coarser than the level's, the DDF composed with its exponential
            (``ddf o exp(v)``, diffeomorphic refinement: folds only from interpolation).
        kernel_size: local NCC window, in voxels of each level.
        margin: voxels kept around the fixed image's foreground box; outside the box the DDF is left as it is, and
            the refinement fades to zero over these voxels at the box's faces.
        integration_steps: scaling-and-squaring steps (``residual="svf"``).
        progress_every: print the loss every this many steps of each level (0: silent).

    Returns:
        The refined DDF, shape and dtype of ``ddf``.

    Raises:
        ValueError: bad ``levels``, ``residual``, ``learning_rate``, ``smoothness`` or ``kernel_size``, or images
            that do not match the DDF.
    """
    ndim = ddf.shape[0]
    levels = check_options(levels, learning_rate, smoothness, residual, kernel_size)
    if tuple(fixed.shape[1:]) != tuple(ddf.shape[1:]) or moving.shape[0] != fixed.shape[0] or moving.ndim != ndim + 1:
        raise ValueError(f"fixed {tuple(fixed.shape)} must be on the DDF's grid {tuple(ddf.shape)} and have the moving "
                         f"image's {moving.shape[0]} channel(s).")
    if sum(s for _, s in levels) == 0:
        return ddf
    moving, fixed = robust_normalise(moving), robust_normalise(fixed)
    box = foreground_box(fixed, margin)
    start = ddf[(slice(None), *box)].float()[None]
    fixed_crop = fixed[(slice(None), *box)][None]
    index_map = torch.as_tensor(index_map, dtype=torch.float64)
    linear = index_map[:ndim, :ndim].float()  # fixed-voxel displacements -> moving-voxel displacements
    offset = [b.start for b in box]
    crop_map = index_map.clone()  # crop voxel -> moving voxel
    crop_map[:ndim, ndim] = index_map[:ndim, ndim] + index_map[:ndim, :ndim] @ torch.tensor(offset, dtype=torch.float64)
    refined = torch.zeros_like(start)  # the refinement, in native (crop) voxels, on the crop grid
    crop_shape = list(start.shape[2:])
    taper = _taper(crop_shape, margin)
    for factor, steps in levels:
        shape = _level_shape(crop_shape, factor)
        scale = [(n - 1) / max(m - 1, 1) for n, m in zip(crop_shape, shape)]  # native voxels per level voxel
        level_map = crop_map @ torch.diag(torch.tensor([*scale, 1.0], dtype=torch.float64))  # level voxel -> moving voxel
        moving_grid = _MovingGrid(level_map, shape, moving.shape[1:], linear)
        level_fixed = fixed_crop if factor == 1 else F.interpolate(fixed_crop, size=shape, mode="trilinear" if ndim == 3
                                                                  else "bilinear", align_corners=True)
        level_start = (start + refined) if factor == 1 else _resize(start + refined, shape)
        vectors = torch.tensor(scale, dtype=torch.float32).view(1, ndim, *[1] * ndim)
        level_taper = taper if factor == 1 else _resize(taper, shape)
        similarity = FixedTargetLNCCLoss(level_fixed, kernel_size)

        if residual == "ddf":
            parameter, integrate = torch.zeros(1, ndim, *shape), None
        else:
            parameter = torch.zeros(1, ndim, *_level_shape(shape, 2))
            integrate = _Exponential(parameter.shape[2:], shape, integration_steps)
        parameter.requires_grad_(True)
        optimiser = torch.optim.Adam([parameter], lr=learning_rate)
        step_grid = _StepGrid(moving_grid, level_start, level_taper, vectors, integrate)
        with torch.enable_grad():
            for step in range(1, steps + 1):
                optimiser.zero_grad()
                warped = grid_sample(moving[None], step_grid(parameter), mode="bilinear", padding_mode="zeros")
                loss = similarity(warped) + smoothness * _smoothness(parameter)
                loss.backward()
                optimiser.step()
                if progress_every and (step % progress_every == 0 or step == steps):
                    print(f"native refinement level {factor}: step {step}/{steps}: loss {loss.item():.4f}", flush=True)
        with torch.no_grad():
            field = _moved(parameter, level_start, level_taper, vectors, integrate)
            increment = field - level_start  # native voxels, on the level's grid
            refined = refined + (increment if factor == 1 else _resize(increment, crop_shape))
    out = ddf.clone()
    out[(slice(None), *box)] = (start + refined)[0].to(ddf.dtype)
    return out


def _moved(parameter: torch.Tensor, start: torch.Tensor, taper: torch.Tensor, vectors: torch.Tensor,
           integrate: _Exponential | None) -> torch.Tensor:
    """The field of a level (native voxels on the level's grid) given its parameter: ``start`` plus the tapered
    residual (``residual="ddf"``), or ``start o exp(v)`` minus ``start``, tapered, plus ``start`` (``"svf"``)."""
    if integrate is None:
        return start + taper * parameter * vectors
    velocity = integrate(parameter)  # level voxels, on the level's grid
    composed = velocity + integrate.level_warp(start / vectors, velocity, padding_mode="border")  # start o exp(v)
    return start + taper * (composed * vectors - start)


class _StepGrid:
    """The moving image's sampling grid of one optimisation step, ``moving_grid(_moved(parameter, ...))`` with every
    term that does not change between a level's steps computed once (``start`` in level voxels, its share of the
    grid; the ``vectors`` folded into the linear map), with less elementwise work per step
    (``benchmarks/refinement_speed.py``). The same arithmetic up to float rounding, but Adam's normalised steps amplify rounding where the
    similarity's gradient is nearly zero, so a refined field is not reproduced bit for bit across such changes."""

    def __init__(self, moving_grid: _MovingGrid, start: torch.Tensor, taper: torch.Tensor, vectors: torch.Tensor,
                 integrate: _Exponential | None) -> None:
        self.integrate, self.taper = integrate, taper
        self.start_level = start / vectors  # level voxels (what the velocity's exponential composes with)
        self.base = moving_grid(start)
        self.linear = moving_grid.linear * vectors.flatten()  # level-voxel residuals -> normalised moving grid

    def __call__(self, parameter: torch.Tensor) -> torch.Tensor:
        if self.integrate is None:
            residual = self.taper * parameter
        else:
            velocity = self.integrate(parameter)  # level voxels, on the level's grid
            composed = velocity + self.integrate.level_warp(self.start_level, velocity, padding_mode="border")
            residual = self.taper * (composed - self.start_level)  # start o exp(v) - start, tapered, level voxels
        return self.base + torch.einsum("kl,bl...->b...k", self.linear, residual)


class _SameGridWarp:
    """``grid_sample`` of a field on a grid at that grid's voxels displaced by a DDF in voxels (``field(x + ddf(x))``).

    Ours rather than MONAI's ``Warp``, which rebuilds, permutes, reindexes and normalises the identity grid on every
    call (a third of a 1 mm refinement step): the normalised identity grid is kept and the DDF scaled in one step."""

    def __init__(self, shape: Sequence[int]) -> None:
        ndim = len(shape)
        self.identity = F.affine_grid(torch.eye(ndim, ndim + 1)[None], [1, 1, *shape], align_corners=True)
        self.per_voxel = torch.tensor([2.0 / max(int(n) - 1, 1) for n in reversed(shape)])  # grid order: last axis first

    def __call__(self, field: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
        grid = self.identity + torch.movedim(ddf.flip(1), 1, -1) * self.per_voxel
        return grid_sample(field, grid, mode="bilinear", padding_mode=padding_mode)


class _Exponential:
    """Scaling and squaring of a velocity on its (coarser) grid, the result resized to the level's grid, vectors in
    level voxels (each axis scaled by its exact corner-aligned ratio)."""

    def __init__(self, velocity_shape: Sequence[int], level_shape: Sequence[int], steps: int) -> None:
        self.steps, self.level_shape = int(steps), list(level_shape)
        self.warp, self.level_warp = _SameGridWarp(velocity_shape), _SameGridWarp(level_shape)
        ratio = [(n - 1) / max(m - 1, 1) for n, m in zip(level_shape, velocity_shape)]  # level voxels per velocity voxel
        self.ratio = torch.tensor(ratio).view(1, -1, *[1] * len(level_shape))

    def __call__(self, velocity: torch.Tensor) -> torch.Tensor:
        ddf = velocity / 2**self.steps
        for _ in range(self.steps):
            ddf = ddf + self.warp(ddf, ddf)
        return _resize(ddf, self.level_shape) * self.ratio


class _MovingGrid:
    """``grid_sample``'s grid of the moving image for a level: where each level voxel ``i`` displaced by a field
    (native fixed voxels) sits, ``level_map @ i + linear @ field(i)``, normalised, kept but for the field's term."""

    def __init__(self, level_map: torch.Tensor, shape: Sequence[int], moving_shape: Sequence[int],
                 linear: torch.Tensor) -> None:
        ndim = len(shape)
        norm = torch.tensor([2.0 / max(int(n) - 1, 1) for n in moving_shape])
        base = affine_points(level_map, shape)
        self.base = torch.stack([base[k] * norm[k] - 1.0 for k in reversed(range(ndim))], dim=-1)[None]
        self.linear = (norm[:, None] * linear).flip(0)  # rows in grid order

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        return self.base + torch.einsum("kl,bl...->b...k", self.linear, field)


def _resize(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear resize of a (1, ndim, *spatial) field to ``shape``, corners aligned (values unchanged: the caller scales
    vectors). Not ``bundle.spatial.resize_field``: this pyramid puts level voxel i at native i * (n-1)/(m-1), corners
    aligned, so that each level's first and last voxels sit on the foreground box's faces."""
    return F.interpolate(field, size=list(shape), mode="trilinear" if len(shape) == 3 else "bilinear", align_corners=True)
