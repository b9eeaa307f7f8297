"""The hypergradient choice of λ for a conditioned network (bundle.engines.regularisation_search)."""

from __future__ import annotations

import math

import pytest
import torch

from bundle.engines.regularisation_search import (
    folding_excess,
    hypergradient_search,
    soft_dice,
)


class ToyConditioned(torch.nn.Module):
    """A stand-in for a conditioned network whose field depends on λ in a known way: a translation of
    ``4 / (1 + λ)`` voxels along axis 0, plus a wave along axis 0 of amplitude ``wave / λ`` (folds when it is large)."""

    def __init__(self, wave: float = 0.0) -> None:
        super().__init__()
        self.wave = wave
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        weight = x[:, 2:3].mean()
        shape = x.shape[2:]
        ddf = torch.zeros(x.shape[0], 3, *shape)
        i = torch.arange(shape[0], dtype=torch.float32).view(1, -1, 1, 1)
        ddf[:, 0] = 4.0 / (1.0 + weight) + (self.wave / weight) * torch.sin(2 * math.pi * i / 4.0)
        return ddf


def _pair(shift: int, size: int = 16):
    labels = torch.zeros(1, size, size, size, dtype=torch.long)
    labels[:, 3:9, 2:14, 2:14] = 1
    labels[:, 9:12, 2:14, 2:14] = 2
    fixed_onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    moving_onehot = torch.roll(fixed_onehot, shifts=shift, dims=2)  # moving(y) = fixed(y - shift)
    image = lambda onehot: (onehot * torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1, 1)).sum(1, keepdim=True)
    return image(moving_onehot), image(fixed_onehot), moving_onehot, fixed_onehot


def test_soft_dice_and_soft_folding():
    _, _, _, fixed = _pair(0)
    assert float(soft_dice(fixed, fixed)) == pytest.approx(1.0)
    assert float(soft_dice(torch.roll(fixed, 4, dims=2), fixed)) < 0.8
    identity = torch.zeros(1, 3, 8, 8, 8)
    squeezed = identity.clone()
    squeezed[:, 0] = -0.9 * torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)  # det J = 0.1: compressed, not folded
    assert float(folding_excess(identity)) == 0.0 and float(folding_excess(squeezed)) == 0.0
    folded = identity.clone()
    folded[:, 0] = -2.0 * torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)  # det J = -1 everywhere
    assert float(folding_excess(folded)) == pytest.approx(100.0)


def test_the_hypergradient_walks_to_the_weight_of_the_best_dice():
    """True shift 2 voxels: the toy's translation matches it at λ = 1; from λ = 0.1 the search gets there."""
    history = hypergradient_search(ToyConditioned(), [_pair(2)], (0.01, 10.0), start=0.1, steps=40, learning_rate=0.1,
                                   progress=None)
    assert len(history) == 41 and history[0]["weight"] == pytest.approx(0.1)
    assert history[-1]["dice"] > history[0]["dice"] + 0.1
    assert 0.9 < history[-1]["weight"] < 1.1, history[-1]


def test_the_folding_limit_holds_the_weight_back():
    """True shift 3 voxels (best Dice at λ = 1/3), but below λ = 0.6 the wave (amplitude 0.6 / λ, period 4 voxels)
    folds the field: the search settles at the limit, where the field does not fold, inside the network's range."""
    history = hypergradient_search(ToyConditioned(wave=0.6), [_pair(3)], (0.05, 10.0), start=2.0, steps=40,
                                   learning_rate=0.15, max_folding=0.05, penalty=10.0, progress=None)
    best = max((h for h in history if h["admissible"]), key=lambda h: h["dice"])
    assert 0.58 < best["weight"] < 0.65 and best["dice"] > history[0]["dice"] + 0.2, (history[0], best)
    assert not all(h["admissible"] for h in history), "the search must have reached the folding limit"
    assert 0.58 < history[-1]["weight"] < 0.65 and history[-1]["admissible"], history[-1]  # back at the limit
    assert all(0.05 - 1e-6 <= h["weight"] <= 10.0 + 1e-6 for h in history)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no validation pairs"):
        hypergradient_search(ToyConditioned(), [], (0.01, 10.0), progress=None)
    with pytest.raises(ValueError, match="outside"):
        hypergradient_search(ToyConditioned(), [_pair(1)], (0.01, 10.0), start=20.0, progress=None)
