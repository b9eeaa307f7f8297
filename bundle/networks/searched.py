"""A searched registration U-Net (AutoReg, the bilevel-optimisation seed): each convolution block picks its operation.

AutoReg searches, for every convolution block ("cell") of the VoxelMorph U-Net, one operation from
``1/3/5 conv, 3/5 separable conv, 3/5/7 dilated conv``, by differentiable architecture search (DARTS, Liu et al.
2019): during the search each block is a softmax(α)-weighted mixture of all operations; the network weights are
trained on training pairs and the architecture weights α on validation pairs, alternately (first-order DARTS); the
searched architecture keeps the operation of highest α per block and is then trained from scratch like VM-2.
MONAI has DiNTS (a topology search for segmentation) but no per-cell operation search for this U-Net, hence ours.

- :class:`SearchableRegistrationUNet`: the mixture network (``arch_parameters()`` α, ``weight_parameters()``
  the rest, ``genotype()`` the current choice per block).
- :class:`SearchedRegistrationUNet`: the U-Net built from a genotype (one operation name per block).

Block order (the genotype's order): encoder blocks (finest first), decoder blocks before each upsampling, then the
decoder's remaining blocks at the output resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registration_unet import VM2_CHANNELS, RegistrationUNet

__all__ = ["OPERATIONS", "make_operation", "MixedOperation", "SearchableRegistrationUNet", "SearchedRegistrationUNet",
           "block_count", "read_genotype"]

# name -> (kind, kernel size, dilation); "k×k×k dilated" is a k-kernel with dilation 2 (as DARTS' dil_conv)
OPERATIONS: dict[str, tuple[str, int, int]] = {
    "conv_1": ("conv", 1, 1),
    "conv_3": ("conv", 3, 1),
    "conv_5": ("conv", 5, 1),
    "sep_conv_3": ("separable", 3, 1),
    "sep_conv_5": ("separable", 5, 1),
    "dil_conv_3": ("conv", 3, 2),
    "dil_conv_5": ("conv", 5, 2),
    "dil_conv_7": ("conv", 7, 2),
}


def make_operation(name: str, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """One operation of :data:`OPERATIONS` followed by LeakyReLU(0.2) (VoxelMorph's activation), same-size padding
    (``stride`` 2 halves the size like the U-Net's encoder convolutions).

    Raises:
        ValueError: an unknown operation name.
    """
    if name not in OPERATIONS:
        raise ValueError(f"unknown operation {name!r}; known: {', '.join(OPERATIONS)}.")
    kind, kernel, dilation = OPERATIONS[name]
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    padding = dilation * (kernel - 1) // 2
    if kind == "conv":
        layers = [conv(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation)]
    else:  # depthwise k-kernel, then pointwise 1-kernel
        layers = [conv(in_channels, in_channels, kernel, stride=stride, padding=padding, groups=in_channels),
                  conv(in_channels, out_channels, 1)]
    return nn.Sequential(*layers, nn.LeakyReLU(0.2))


class MixedOperation(nn.Module):
    """``sum_i softmax(alpha)_i * op_i(x)`` over ``operations``; ``alpha`` (zeros: uniform at start) is the block's
    architecture parameter."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 operations: Sequence[str] = tuple(OPERATIONS)) -> None:
        super().__init__()
        self.names = list(operations)
        self.ops = nn.ModuleList(make_operation(n, spatial_dims, in_channels, out_channels, stride) for n in self.names)
        self.alpha = nn.Parameter(torch.zeros(len(self.names)))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.alpha, dim=0)
        return sum(w * op(x) for w, op in zip(weights, self.ops))

    def chosen(self) -> str:
        return self.names[int(torch.argmax(self.alpha))]


def block_count(net: RegistrationUNet) -> int:
    """The number of convolution blocks of the U-Net (the length of its genotype)."""
    return len(net.encoder.blocks) + len(net.decoder.up_blocks) + len(net.decoder.extra)


def _replace_blocks(net: RegistrationUNet, build: Callable[[int, int, int, int], nn.Module]) -> int:
    """Replace every convolution block of the U-Net by ``build(index, in_channels, out_channels, stride)``."""
    index = 0
    for blocks in (net.encoder.blocks, net.decoder.up_blocks, net.decoder.extra):
        for i, block in enumerate(blocks):
            conv = block.conv if hasattr(block, "conv") else block
            blocks[i] = build(index, conv.in_channels, conv.out_channels, int(conv.stride[0]))
            index += 1
    return index


class SearchableRegistrationUNet(RegistrationUNet):
    """The VoxelMorph U-Net (:class:`RegistrationUNet`) with every convolution block a :class:`MixedOperation`.

    Args:
        spatial_dims, in_channels, channels, integration_steps, half_res: as :class:`RegistrationUNet`.
        operations: the search space (names of :data:`OPERATIONS`).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, channels: Sequence[Sequence[int]] = VM2_CHANNELS,
                 integration_steps: int = 0, half_res: bool = False, operations: Sequence[str] = tuple(OPERATIONS)) -> None:
        super().__init__(spatial_dims, in_channels, channels, integration_steps, half_res)
        unknown = [n for n in operations if n not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(f"operations must be names from {tuple(OPERATIONS)}, got {list(operations)}.")
        self.num_blocks = _replace_blocks(self, lambda i, cin, cout, s: MixedOperation(spatial_dims, cin, cout, s, operations))

    def mixed_operations(self) -> list[MixedOperation]:
        return [m for m in self.modules() if isinstance(m, MixedOperation)]

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture weights α, one vector per block (the upper level of the search)."""
        return [m.alpha for m in self.mixed_operations()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (the lower level: trained on the training pairs)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def genotype(self) -> list[str]:
        """The operation of highest α per block, in block order."""
        return [m.chosen() for m in self.mixed_operations()]

    def operation_weights(self) -> list[dict[str, float]]:
        """softmax(α) per block, for the search log."""
        return [dict(zip(m.names, F.softmax(m.alpha.detach(), 0).tolist())) for m in self.mixed_operations()]


class SearchedRegistrationUNet(RegistrationUNet):
    """The VoxelMorph U-Net built from a genotype: block ``i`` is operation ``genotype[i]``.

    ``genotype = ["conv_3"] * n`` is the hand-designed network (All-3-Conv, the same layers as
    :class:`RegistrationUNet`). The genotype travels in the state dict (``_extra_state``): weights load only into a
    network of the same genotype (conv_3 and dil_conv_3 weights have the same shapes, so shapes cannot tell).

    Raises:
        ValueError: a genotype of the wrong length or with unknown operation names; on loading, weights of another
            genotype.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, channels: Sequence[Sequence[int]] = VM2_CHANNELS,
                 integration_steps: int = 0, half_res: bool = False, genotype: Sequence[str] = ()) -> None:
        super().__init__(spatial_dims, in_channels, channels, integration_steps, half_res)
        expected = block_count(self)
        if len(genotype) != expected or any(n not in OPERATIONS for n in genotype):
            raise ValueError(f"genotype must name {expected} operations from {tuple(OPERATIONS)} (one per block), "
                             f"got {list(genotype)}.")
        self.genotype = list(genotype)
        _replace_blocks(self, lambda i, cin, cout, s: make_operation(self.genotype[i], spatial_dims, cin, cout, s))

    def get_extra_state(self) -> dict:
        return {"genotype": list(self.genotype)}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("genotype") if isinstance(state, dict) else None
        if saved != self.genotype:
            raise ValueError(f"the weights were trained with genotype {saved}, the network was built with {self.genotype}.")


def read_genotype(path: str | os.PathLike) -> list[str]:
    """The genotype (one operation name per block) of a search's ``genotype.json`` (``ArchitectureSearchStep``'s
    record), of a plain JSON list of names, or of a :class:`SearchedRegistrationUNet` checkpoint (``.pt``/``.pth``:
    the genotype its weights were trained with, so trained weights alone rebuild their network).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not JSON (or not a checkpoint), or holds no list of known operation names.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no genotype file (an architecture search writes one: "
                                "benchmarks/campaign.py train --run autoreg_search).")
    if str(path).endswith((".pt", ".pth")):
        from bundle.engines.checkpoints import network_state_dict  # here: the engines import this package

        record = network_state_dict(path).get("_extra_state")
        if record is None:
            raise ValueError(f"{path}: this checkpoint holds no genotype (not a SearchedRegistrationUNet's weights).")
    else:
        try:
            with open(path) as fh:
                record = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON genotype file ({e}).") from e
    genotype = record.get("genotype") if isinstance(record, dict) else record
    if not isinstance(genotype, list) or not genotype or any(n not in OPERATIONS for n in genotype):
        raise ValueError(f"{path}: expected a non-empty list of operation names from {tuple(OPERATIONS)} "
                         f"(or a record with one under 'genotype'), got {genotype!r}.")
    return list(genotype)
