"""Reading, overriding and running the bundle's configs: the one plumbing the CLI, the MONAI Label app and the
benchmarks share.

Configs are named by file name (``"inference.json"``) and read from ``<bundle_root>/configs`` in order, later
files replacing the ids of earlier ones (MONAI's overlay rule). Runs go through ``monai.bundle``: in-process
(:func:`run_config`) or as a command line (:func:`bundle_command`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "config_paths",
    "config_file_arg",
    "read_config",
    "run_config",
    "bundle_command",
    "is_registration_only",
    "is_regularisation_conditioned",
    "is_probabilistic",
    "checkpoint_overlays",
    "TUMOUR_CONFIGS",
    "TUMOUR_SEGMENTATION_CONFIGS",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
# the shipped tumour model (T1c + FLAIR, 2 mm): tumour pairs, and one image's tumour segmentation
TUMOUR_CONFIGS = ("inference.json", "joint.json", "tumour.json")
TUMOUR_SEGMENTATION_CONFIGS = (*TUMOUR_CONFIGS, "inference_segmentation.json")


def config_paths(bundle_root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Absolute paths of ``<bundle_root>/configs/<name>``, in order.

    Raises:
        FileNotFoundError: a config file is missing (all missing ones named).
    """
    configs = Path(bundle_root).resolve() / "configs"
    missing = [n for n in names if not (configs / n).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle configs not found in {configs}: {missing}")
    return [str(configs / n) for n in names]


def config_file_arg(bundle_root: str | os.PathLike, names: Sequence[str]) -> str:
    """``--config_file`` value of a ``monai.bundle`` command line: one path, or ``"['a.json','b.json']"``."""
    paths = config_paths(bundle_root, names)
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


def read_config(bundle_root: str | os.PathLike, names: Sequence[str], overrides: Mapping | None = None):
    """A ``monai.bundle.ConfigParser`` of the configs merged in order, with ``bundle_root`` and ``overrides`` set.

    Raises:
        FileNotFoundError: a config file is missing.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_paths(bundle_root, names))
    parser.update({"bundle_root": str(bundle_root), **dict(overrides or {})})
    return parser


def run_config(run_id: str, bundle_root: str | os.PathLike, names: Sequence[str], overrides: Mapping | None = None) -> None:
    """``monai.bundle.run(run_id)`` in this process, with the bundle's metadata and logging configuration
    (``bundle_root`` defaults to the bundle; an override may move it)."""
    from monai.bundle import run

    configs = Path(bundle_root).resolve() / "configs"
    run(
        run_id,
        config_file=config_paths(bundle_root, names),
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        **{"bundle_root": str(bundle_root), **dict(overrides or {})},
    )


def bundle_command(
    run_id: str, bundle_root: str | os.PathLike, names: Sequence[str], overrides: Mapping | None = None
) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file ... --key value ...`` as an argument list.

    Values are passed as ``str(value)`` (what ``monai.bundle``'s command line parses back): lists and numbers
    keep their Python spelling, paths become strings.
    """
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file_arg(bundle_root, names)]
    for key, value in {"bundle_root": str(bundle_root), **dict(overrides or {})}.items():
        args += [f"--{key}", str(value)]
    return args


def is_regularisation_conditioned(state: Mapping) -> bool:
    """A network conditioned on the regularisation weight has FiLM layers (the shipped registration model of
    ``configs/inference.json`` is one; on ``train.json`` it needs ``configs/regularisation_conditioned.json``)."""
    return any(k.removeprefix("module.").startswith("film_") for k in state)


def is_probabilistic(state: Mapping) -> bool:
    """A network with Gaussian encoder features (``gaussians.*`` weights): it needs
    ``configs/probabilistic_features.json``."""
    return any(k.removeprefix("module.").startswith("gaussians.") for k in state)


def is_registration_only(state: Mapping) -> bool:
    """A registration-only (VoxelMorph U-Net) state dict has a ``head`` and no segmentation head (the joint
    model, ``configs/joint.json`` on ``inference.json``, has both)."""
    keys = {k.removeprefix("module.") for k in state}
    return any(k.startswith("head.") for k in keys) and not any(k.startswith("seg_head.") for k in keys)


# Overlays that change the network, tried in this order on top of the base configs by :func:`checkpoint_overlays`:
# the shipped registration model (inference.json) or the joint model (train.json) first, then the other
# architectures the bundle trains: joint (4 mm T1, or the tumour campaign's 2-channel half-resolution one), the
# campaign's half-resolution SVF U-Net and the plain full-resolution U-Net, each with or without FiLM on λ; last the
# joint models with FiLM on λ (``joint_conditioned.json``).
_ARCHITECTURE_OVERLAYS = (
    (),
    ("joint.json",),
    ("joint.json", "tumour.json"),
    ("joint.json", "tumour.json", "tumour_whole.json"),
    ("tumour_campaign.json",),
    ("joint.json", "tumour_campaign.json"),
    ("registration_only.json", "campaign.json", "regularisation_conditioned.json"),
    ("registration_only.json", "campaign.json"),
    ("registration_only.json",),
    ("registration_only.json", "regularisation_conditioned.json"),
    ("joint.json", "tumour.json", "joint_conditioned.json"),
    ("joint.json", "tumour.json", "tumour_whole.json", "joint_conditioned.json"),
    ("joint.json", "joint_conditioned.json"),
)


def _shapes(state: Mapping) -> dict:
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def checkpoint_overlays(
    bundle_root: str | os.PathLike, base: Sequence[str], state: Mapping, registration_only: bool | None = None,
    path: str = "checkpoint",
) -> list[str]:
    """The config overlays to add to ``base`` so that its ``network_def`` takes ``state`` (same parameter names and
    shapes): the first fitting entry of the bundle's architecture overlays (none for the shipped model on
    ``inference.json``; ``joint.json`` for the joint T1 model, ``joint.json`` + ``tumour.json`` for the T1c + FLAIR
    tumour model (oedema / tumour core), + ``tumour_whole.json`` for a one-class (whole tumour) version; ``registration_only.json`` [+ ``campaign.json``]
    [+ ``regularisation_conditioned.json``] for the other registration-only U-Nets), plus
    ``probabilistic_features.json`` for Gaussian encoder features. Settings a state dict cannot show (the
    integration steps, the training grid) are those of the matching configs.

    Args:
        registration_only: ``True`` / ``False`` keep only registration-only / joint architectures; ``None``: any.
        path: the checkpoint's name in the error message.

    Raises:
        ValueError: no overlay builds a network with these parameters.
    """
    wanted = _shapes(state)
    probabilistic = ("probabilistic_features.json",) if is_probabilistic(state) else ()
    if registration_only is not None and registration_only != is_registration_only(state):
        kind = "registration-only" if registration_only else "joint (registration + segmentation)"
        raise ValueError(f"{path} is not a {kind} model (its parameters say otherwise).")
    for overlays in _ARCHITECTURE_OVERLAYS:
        names = [*base, *overlays, *probabilistic]
        if any(n in base for n in overlays):
            continue
        try:
            network = read_config(bundle_root, names).get_parsed_content("network_def", instantiate=True)
        except (FileNotFoundError, RuntimeError):  # an overlay this bundle lacks, or one that does not combine
            continue
        if _shapes(network.state_dict()) == wanted:
            return [*overlays, *probabilistic]
    raise ValueError(
        f"{path}: no network of this bundle's configs ({', '.join(base)} with or without "
        f"{', '.join(sorted({n for o in _ARCHITECTURE_OVERLAYS for n in o}))}) has its parameters; "
        "was it trained with other channels or architecture settings?"
    )
