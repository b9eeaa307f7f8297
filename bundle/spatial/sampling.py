"""``grid_sample`` on all CPU threads for one image.

Ours because PyTorch's CPU kernel of 3-D ``grid_sample`` (forward and backward) splits its work over the batch only:
one volume runs on one thread however many are set (measured: the same 0.19 s at 1 and 2 threads for a 3-million-voxel
warp with its gradient; `benchmarks/refinement_speed.py`). Here the output points are cut into one slab per thread and the slabs go through the kernel
as a batch sharing the input: every output value is computed exactly as before (bit for bit), by
all threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grid_sample"]


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = True) -> torch.Tensor:
    """:func:`torch.nn.functional.grid_sample`, same arguments and result, with a single 3-D CPU volume spread over
    ``torch.get_num_threads()`` slabs of its output points (any output shape: a volume, a list of points). 2-D
    images (torch's own kernel is threaded there), batches, GPUs and one thread go straight to torch."""
    points = grid.shape[1:-1].numel() if grid.ndim == 5 else 0
    parts = min(torch.get_num_threads(), points)
    if parts < 2 or input.shape[0] != 1 or grid.shape[0] != 1 or grid.device.type != "cpu":
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    slab = -(-points // parts)
    flat = grid.reshape(1, points, 3)  # each output value depends on its own point only: any layout will do
    if points < slab * parts:  # pad with copies of the last point, dropped from the output
        flat = torch.cat([flat, flat[:, -1:].expand(1, slab * parts - points, 3)], dim=1)
    out = F.grid_sample(input.expand(parts, *input.shape[1:]), flat.view(parts, 1, 1, slab, 3), mode=mode,
                        padding_mode=padding_mode, align_corners=align_corners)  # (parts, C, 1, 1, slab)
    out = out.reshape(parts, input.shape[1], slab).transpose(0, 1).reshape(1, input.shape[1], slab * parts)
    return out[:, :, :points].reshape(1, input.shape[1], *grid.shape[1:-1])
