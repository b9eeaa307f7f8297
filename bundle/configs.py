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
]

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    """A network conditioned on the regularisation weight has FiLM layers: it needs
    ``configs/regularisation_conditioned.json`` (and ``registration_only.json``)."""
    return any(k.removeprefix("module.").startswith("film_") for k in state)


def is_probabilistic(state: Mapping) -> bool:
    """A network with Gaussian encoder features (``gaussians.*`` weights): it needs
    ``configs/probabilistic_features.json``."""
    return any(k.removeprefix("module.").startswith("gaussians.") for k in state)


def is_registration_only(state: Mapping) -> bool:
    """A registration-only (VoxelMorph U-Net) state dict has a ``head`` and no segmentation head: it needs
    ``configs/registration_only.json`` on top of the base configs."""
    keys = {k.removeprefix("module.") for k in state}
    return any(k.startswith("head.") for k in keys) and not any(k.startswith("seg_head.") for k in keys)
