"""The regularisation weight λ of a conditioned network chosen by hypergradient on validation pairs (bilevel upper level).

The lower level (the registration given λ) is the trained conditioned network itself (HyperMorph's amortisation), so
the upper level's gradient d(validation objective)/d(log λ) is one backward pass through the network: the
validation Dice of the moving labels warped linearly (soft, differentiable), minus, while the folded voxels exceed the
limit, a penalty on how far det J goes below zero (zero gradient from it otherwise: a smooth count of folded voxels
would also count merely compressed voxels and hold λ back when nothing folds). The grid search of ``benchmarks/choose_regularisation.py`` is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from monai.networks.blocks import Warp

from bundle.networks.outputs import split_ddf
from bundle.spatial import jacobian_determinant

__all__ = ["folding_excess", "hypergradient_search", "soft_dice"]


def soft_dice(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean Dice over the foreground classes present in ``fixed`` (one-hot ``(B, C, *spatial)``, class 0 =
    background), with ``warped`` soft (linearly warped one-hot maps)."""
    dims = tuple(range(2, fixed.ndim))
    inter = (warped * fixed).sum(dims)
    total = warped.sum(dims) + fixed.sum(dims)
    present = fixed.sum(dims) > 0
    present[:, 0] = False
    dice = (2 * inter + eps) / (total + eps)
    return (dice * present).sum() / present.sum().clamp_min(1)


def folding_excess(ddf: torch.Tensor) -> torch.Tensor:
    """``100 * mean(relu(-det J))``: how far the field folds (differentiable; exactly zero where nothing folds)."""
    return 100 * torch.relu(-jacobian_determinant(ddf)).mean()


def hypergradient_search(
    network: torch.nn.Module,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    weight_range: Sequence[float],
    start: float = 0.3,
    steps: int = 20,
    learning_rate: float = 0.2,
    max_folding: float = 0.05,
    penalty: float = 10.0,
    spatial_dims: int = 3,
    progress: Callable[[str], None] | None = print,
) -> list[dict]:
    """Gradient ascent on ``s = log λ`` of the mean validation objective over ``pairs``.

    Args:
        network: conditioned registration network: input ``cat([moving, fixed, λ map])``, DDF first in its output.
        pairs: ``(moving, fixed, moving_onehot, fixed_onehot)`` on the network grid, batch 1 (kept in memory: the
            same pairs at every step).
        weight_range: ``(low, high)``: the λ range the network was trained over; λ is kept inside it.
        start: initial λ.
        steps: gradient steps (each one forward and backward pass per pair).
        learning_rate: first step on log λ (Rprop; later steps grow or halve).
        max_folding: % of voxels with det J <= 0 allowed per pair; above it, :func:`folding_excess` is penalised.
        penalty: weight of that penalty.
        spatial_dims: 2 or 3.
        progress: called with one line per step (``None``: silent).

    Returns:
        One dict per evaluated λ (``steps + 1``: the start and after each step): ``weight``, ``dice`` (soft, mean
        over pairs), ``folding_pct`` (% of voxels with det J <= 0, mean over pairs), ``objective``, ``admissible``.

    Raises:
        ValueError: no pairs, ``start`` outside ``weight_range``, ``steps < 0`` or ``learning_rate <= 0``.
    """
    pairs = list(pairs)
    low, high = (float(w) for w in weight_range)
    if not pairs:
        raise ValueError("no validation pairs.")
    if not low <= start <= high:
        raise ValueError(f"start λ {start} is outside the network's range [{low}, {high}].")
    if steps < 0 or learning_rate <= 0:
        raise ValueError(f"steps must be >= 0 and learning_rate > 0, got {steps} and {learning_rate}.")
    warp = Warp(mode="bilinear", padding_mode="border")
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    log_weight = torch.tensor(math.log(start), requires_grad=True)
    # Rprop: sign-based steps that grow while the sign holds and halve when it flips, so neither the penalty's kick at
    # the folding limit nor a small Dice gradient sets the step size (Adam's moments would carry λ far past the limit)
    optimiser = torch.optim.Rprop([log_weight], lr=learning_rate, step_sizes=(1e-3, 1.0))
    history = []
    for step in range(steps + 1):
        optimiser.zero_grad()
        dice_sum, excess_sum, fold_sum = 0.0, 0.0, 0.0
        objective_sum = 0.0
        for moving, fixed, moving_onehot, fixed_onehot in pairs:
            weight = log_weight.exp()  # per pair: each pair's graph is freed by its own backward
            weight_map = weight.view(1, 1, *[1] * spatial_dims).expand(moving.shape[0], 1, *moving.shape[2:])
            ddf, _ = split_ddf(network(torch.cat([moving, fixed, weight_map], dim=1)), spatial_dims)
            dice = soft_dice(warp(moving_onehot, ddf), fixed_onehot)
            excess = folding_excess(ddf)
            with torch.no_grad():
                folded = float((jacobian_determinant(ddf) <= 0).float().mean()) * 100
            objective = (dice - (penalty * excess if folded > max_folding else 0.0)) / len(pairs)
            if step < steps:
                (-objective).backward()
            fold_sum += folded
            dice_sum += float(dice.detach())
            excess_sum += float(excess.detach())
            objective_sum += float(objective.detach())
        n = len(pairs)
        row = {"step": step, "weight": float(log_weight.detach().exp()), "dice": dice_sum / n, "folding_pct": fold_sum / n,
               "folding_excess": excess_sum / n, "objective": objective_sum, "admissible": fold_sum / n <= max_folding}
        history.append(row)
        if progress:
            progress(f"hypergradient step {step}/{steps}: λ {row['weight']:.4g}, validation Dice {row['dice']:.4f}, "
                     f"folding {row['folding_pct']:.4f} %")
        if step < steps:
            optimiser.step()
            with torch.no_grad():
                log_weight.clamp_(math.log(low), math.log(high))
    return history
