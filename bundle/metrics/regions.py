"""Registration quality inside a tumour, in a band around it and elsewhere (Estienne et al. 2020 evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms.utils import distance_transform_edt

from bundle.losses.masked_similarity import masked_mean
from bundle.losses.registration import make_similarity
from bundle.spatial import jacobian_determinant

__all__ = ["tumour_regions", "region_registration_metrics", "endpoint_error_by_region", "REGIONS"]

REGIONS = ("tumour", "band", "outside")


def tumour_regions(tumour: torch.Tensor, spacing: Sequence[float], band_mm: float = 10.0) -> dict[str, torch.Tensor]:
    """Split a grid into the tumour, a band of ``(0, band_mm]`` millimetres around it, and the rest.

    Args:
        tumour: ``(1, *spatial)`` mask (non-zero = tumour).
        spacing: voxel size in mm per spatial axis.
        band_mm: width of the band.

    Returns:
        ``{"tumour", "band", "outside"}`` boolean masks ``(1, *spatial)``; the band and tumour are empty
        when the mask is.
    """
    tumour = torch.as_tensor(tumour) > 0
    if not tumour.any():
        empty = torch.zeros_like(tumour)
        return {"tumour": empty, "band": empty, "outside": ~empty}
    distance = torch.as_tensor(distance_transform_edt((~tumour).to(torch.uint8), sampling=list(spacing)))
    band = (~tumour) & (distance <= band_mm)
    return {"tumour": tumour, "band": band, "outside": ~tumour & ~band}


def region_registration_metrics(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    ddf: torch.Tensor,
    tumour: torch.Tensor,
    spacing: Sequence[float],
    band_mm: float = 10.0,
    warped_label: torch.Tensor | None = None,
    fixed_label: torch.Tensor | None = None,
    num_classes: int | None = None,
    lncc_window: int = 9,
    brain_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-region registration metrics of one pair, all on the fixed grid.

    Regions from :func:`tumour_regions` of ``tumour`` (typically the fixed tumour united with the warped
    moving tumour). Per region: ``ncc_<region>`` (mean local NCC of warped and fixed, window ``lncc_window``;
    1 = identical), ``mse_<region>``, ``folding_pct_<region>`` (% of voxels with Jacobian determinant <= 0) and,
    with labels, ``dice_<region>`` (mean Dice over the foreground labels restricted to the region).
    Empty regions give NaN.

    Args:
        warped, fixed: ``(C, *spatial)`` images.
        ddf: ``(ndim, *spatial)`` DDF in voxel units.
        tumour: ``(1, *spatial)`` mask.
        spacing: voxel size in mm.
        warped_label, fixed_label: optional ``(1, *spatial)`` integer label maps.
        num_classes: label classes including background (needed with labels).
        brain_mask: ``(1, *spatial)``; when given, every region is restricted to it (skull-stripped images: the
            background outside the brain is not scored).
    """
    regions = tumour_regions(tumour, spacing, band_mm)
    if brain_mask is not None:
        inside = torch.as_tensor(brain_mask) > 0
        regions = {name: region & inside for name, region in regions.items()}
    ncc_map = -make_similarity("lncc", ddf.shape[0], reduction="none", kernel_size=lncc_window)(
        warped.unsqueeze(0).float(), fixed.unsqueeze(0).float()
    )[0].mean(0, keepdim=True)
    mse_map = ((warped.float() - fixed.float()) ** 2).mean(0, keepdim=True)
    folding = jacobian_determinant(ddf.unsqueeze(0).float())[0] <= 0
    out: dict[str, float] = {}
    for name, region in regions.items():
        count = int(region.sum())
        nan = float("nan")
        out[f"ncc_{name}"] = float(masked_mean(ncc_map[None], region[None], eps=0.0)) if count else nan
        out[f"mse_{name}"] = float(masked_mean(mse_map[None], region[None], eps=0.0)) if count else nan
        out[f"folding_pct_{name}"] = 100.0 * float(folding[region].float().mean()) if count else nan
        if warped_label is not None and fixed_label is not None:
            if num_classes is None:
                raise ValueError("num_classes is needed to compute Dice of labels.")
            if not count:
                out[f"dice_{name}"] = nan
                continue
            masked = [one_hot(torch.as_tensor(lab).long().unsqueeze(0), num_classes) * region for lab in (warped_label, fixed_label)]
            dice = DiceMetric(include_background=False, ignore_empty=True)(*masked)
            out[f"dice_{name}"] = float(torch.nanmean(dice))
    return out


def endpoint_error_by_region(
    pred_ddf: torch.Tensor,
    true_ddf: torch.Tensor,
    tumour: torch.Tensor,
    spacing: Sequence[float],
    brain_mask: torch.Tensor | None = None,
    band_mm: float = 10.0,
) -> dict[str, dict[str, float]]:
    """Endpoint error of a predicted DDF against the true one, and folding, per region of the fixed grid.

    The endpoint error of a voxel is ``|pred - true|`` in millimetres, each axis' voxel units scaled by the
    spacing along that axis. Regions are :func:`tumour_regions` of ``tumour`` (for a known-deformation pair the
    fixed tumour united with the non-corresponding region), each restricted to ``brain_mask`` when given, so
    the three regions partition the brain (the whole grid without one). Folding is the % of the region's voxels
    where the Jacobian determinant of ``pred_ddf`` (:func:`bundle.spatial.jacobian_determinant`) is <= 0.

    Args:
        pred_ddf, true_ddf: ``(ndim, *spatial)`` pull-back DDFs on the fixed grid, voxel units.
        tumour: ``(1, *spatial)`` mask.
        spacing: voxel size in mm per axis.
        brain_mask: optional ``(1, *spatial)`` mask.
        band_mm: width of the band around the tumour.

    Returns:
        ``{region: {"epe_mean_mm", "epe_median_mm", "folding_pct", "voxels"}}`` for ``tumour``, ``band`` and
        ``outside``; an empty region has NaN values and 0 voxels.

    Raises:
        ValueError: fields of different shapes, or masks / spacing that do not match them.
    """
    pred, true = torch.as_tensor(pred_ddf).float(), torch.as_tensor(true_ddf).float()
    ndim = pred.shape[0]
    if pred.shape != true.shape or pred.ndim != ndim + 1 or len(spacing) != ndim:
        raise ValueError(f"pred_ddf {tuple(pred.shape)} and true_ddf {tuple(true.shape)} must be the same (ndim, *spatial) "
                         f"with {ndim} spacings, got spacing {tuple(spacing)}.")
    masks = {"tumour": torch.as_tensor(tumour)} | ({} if brain_mask is None else {"brain_mask": torch.as_tensor(brain_mask)})
    for name, mask in masks.items():
        if tuple(mask.shape) != (1, *pred.shape[1:]):
            raise ValueError(f"{name} {tuple(mask.shape)} must be (1, *spatial) for fields {tuple(pred.shape)}.")
    scale = torch.as_tensor(spacing, dtype=torch.float32).view(ndim, *([1] * ndim))
    error = torch.sqrt((((pred - true) * scale) ** 2).sum(0)).numpy()
    folding = (jacobian_determinant(pred[None])[0, 0] <= 0).numpy()
    brain = None if brain_mask is None else torch.as_tensor(brain_mask)[0] > 0
    out = {}
    for name, region in tumour_regions(tumour, spacing, band_mm).items():
        region = region[0] if brain is None else region[0] & brain
        selected = region.numpy()
        count = int(selected.sum())
        nan = float("nan")
        out[name] = {
            "epe_mean_mm": float(error[selected].mean()) if count else nan,
            "epe_median_mm": float(np.median(error[selected])) if count else nan,
            "folding_pct": 100.0 * float(folding[selected].mean()) if count else nan,
            "voxels": count,
        }
    return out
