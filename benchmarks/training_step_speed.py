"""Time one training step (forward, loss, backward, Adam step) of the registration network on this machine.

    python benchmarks/training_step_speed.py [--model registration|joint|search] [--shape 80 96 80] [--threads 2] [--repeats 3] [--out CSV]

Compares the recipe's choices on a 2 mm brain-sized grid: VoxelMorph's full-resolution DDF vs the
half-resolution diffeomorphic flow (``half_res``, 7 scaling-and-squaring steps), float32 vs bfloat16 autocast
(``bundle.engines.AutocastInferer``), with the LNCC + diffusion + 57-class label Dice loss (full resolution or
``label_downsample=2``). Prints a table and writes a CSV row per configuration with the median seconds per
step, the hardware and the 1-minute load average at the start (another process on the machine slows it).

``--model joint``: the joint tumour model. ``--model search``: the architecture search's mixture network (every block a
softmax-weighted sum of the 8 operations), at VM-2's width and at the half width the search runs at, against the VM-2
network it searches over, same recipe loss; one search iteration is two such steps (weights on a training pair, α on a
validation pair). This sets the search's CPU budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.engines.training import AutocastInferer, hardware_description  # noqa: E402
from bundle.io.writers import write_csv  # noqa: E402
from bundle.losses import JointRegSegLoss, RegistrationLoss  # noqa: E402
from bundle.networks import (  # noqa: E402
    OPERATIONS,
    VM2_CHANNELS,
    JointRegSegNet,
    RegistrationUNet,
    SearchableRegistrationUNet,
)

CONFIGS = (  # name, half_res + svf, autocast, label_downsample
    ("full-res DDF, fp32, labels full", False, False, 1),
    ("half-res SVF, fp32, labels full", True, False, 1),
    ("half-res SVF, fp32, labels /2 (recipe)", True, False, 2),
    ("half-res SVF, bf16 autocast, labels /2", True, True, 2),
)

JOINT_CONFIGS = (  # name, half_res: the joint model on 2 channels (T1c + FLAIR), tumour CE + Dice, masked LNCC
    ("joint full-res DDF", False),
    ("joint half-res DDF (tumour recipe)", True),
)

# the search's proxy network, read from its campaign config (one source for the width)
HALF_WIDTH = json.loads((REPO / "configs" / "autoreg_search_campaign.json").read_text())["network_def#channels"]
SEARCH_CONFIGS = (  # name, mixture network, channels: the recipe's half-res SVF, fp32, labels /2
    ("VM-2 (All-3-Conv), recipe step", False, VM2_CHANNELS),
    ("search mixture network (8 operations per block), recipe step", True, VM2_CHANNELS),
    ("search mixture network, half width (the search's proxy), recipe step", True, HALF_WIDTH),
)


def _timed_steps(net, loss_fn, x, target, inferer, repeats: int) -> list[float]:
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    times = []
    for _ in range(repeats + 1):  # the first step warms up the allocator and kernels
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(inferer(x, net), target)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def joint_step_seconds(shape, half_res: bool, repeats: int) -> list[float]:
    torch.manual_seed(0)
    net = JointRegSegNet(in_channels=2, num_classes=2, half_res=half_res)
    moving, fixed = torch.rand(1, 2, *shape), torch.rand(1, 2, *shape)
    tumours = (torch.rand(2, 1, *shape) > 0.9).float()
    target = {"moving": moving, "fixed": fixed, "moving_tumour": tumours[:1], "fixed_tumour": tumours[1:]}
    loss_fn = JointRegSegLoss(num_classes=2, mask_source="label")
    return _timed_steps(net, loss_fn, torch.cat([moving, fixed], 1), target, AutocastInferer(enabled=False), repeats)


def step_seconds(shape, half_res: bool, autocast: bool, label_downsample: int, repeats: int,
                 mixture: bool = False, channels=VM2_CHANNELS) -> list[float]:
    torch.manual_seed(0)
    steps = 7 if half_res else 0
    if mixture:
        net = SearchableRegistrationUNet(3, 2, channels, steps, half_res, operations=tuple(OPERATIONS))
    else:
        net = RegistrationUNet(3, 2, channels, integration_steps=steps, half_res=half_res)
    loss_fn = RegistrationLoss(label_weight=1.0, num_classes=57, label_downsample=label_downsample)
    moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    labels = torch.randint(0, 57, (2, 1, *shape)).float()
    target = {"moving": moving, "fixed": fixed, "moving_label": labels[:1], "fixed_label": labels[1:]}
    return _timed_steps(net, loss_fn, torch.cat([moving, fixed], 1), target, AutocastInferer(enabled=autocast), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(80, 96, 80))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated substrings of configurations to skip")
    parser.add_argument("--model", choices=["registration", "joint", "search"], default="registration",
                        help="joint: the joint tumour model (2 channels) with full- and half-resolution decoders; "
                             "search: the architecture search's mixture network against VM-2")
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/results/training_step_cpu.csv (joint: training_step_joint_cpu.csv, "
                             "search: regularisation/search_step_cpu.csv)")
    a = parser.parse_args()
    divisor = 16  # every network timed here has 4 downsamplings (its size_divisor)
    if any(size % divisor for size in a.shape):
        parser.error(f"--shape {' '.join(map(str, a.shape))}: every axis must be a multiple of {divisor}")
    default_out = {"registration": "training_step_cpu.csv", "joint": "training_step_joint_cpu.csv",
                   "search": "regularisation/search_step_cpu.csv"}[a.model]
    out = a.out or REPO / "docs" / "results" / default_out
    configs = {"registration": CONFIGS, "joint": JOINT_CONFIGS, "search": SEARCH_CONFIGS}[a.model]
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    rows = []
    for name, *settings in configs:
        if any(s and s in name for s in a.skip.split(",")):
            continue
        if a.model == "registration":
            times = step_seconds(a.shape, *settings, a.repeats)
        elif a.model == "search":
            times = step_seconds(a.shape, True, False, 2, a.repeats, mixture=settings[0], channels=settings[1])
        else:
            times = joint_step_seconds(a.shape, *settings, a.repeats)
        row = {"configuration": name, "shape": "x".join(map(str, a.shape)), "median_s_per_step": round(statistics.median(times), 3),
               "steps": len(times), "threads": a.threads, "load_1min_at_start": round(load, 2),
               "hardware": hardware_description("cpu")}
        rows.append(row)
        print(f"{name:45s} {row['median_s_per_step']:8.3f} s/step", flush=True)
    write_csv(out, rows)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
