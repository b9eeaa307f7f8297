"""Lay the bundle out for MONAI Label's stock ``monaibundle`` app (``BundleInferTask`` / ``BundleTrainTask``).

Those tasks read fixed file names from ``<app>/model/<name>/``: ``configs/inference.json`` (ids
``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), ``configs/metadata.json`` (first input
and output of ``network_data_format``, the output's ``channel_def`` as the labels), ``configs/train.json``
(ids ``bundle_root``, ``device``, ``network``, ``train#trainer#max_epochs``, ``train#dataset#data``,
``train#handlers``, ``validate#dataset#data``) and ``models/model.pt``. This bundle's ``inference.json`` is
the pair registration and its metadata describes the joint network, so the layout is made from the MONAI
Label variants, each file being the bundle's own config merged with its overlay:

- ``inference.json`` = ``inference.json`` + the model's architecture overlays (``joint.json`` [+ ``tumour.json``],
  chosen from its parameters) + ``inference_segmentation.json`` + ``monailabel_infer.json`` (no file writer);
- ``metadata.json`` = ``metadata.json`` + ``monailabel_metadata.json`` (the segmentation head's I/O);
- ``train.json`` = ``train.json`` + the same architecture overlays + ``monailabel_train.json`` (datastore subjects
  -> every ordered pair).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser

from bundle.configs import checkpoint_overlays
from bundle.engines.checkpoints import network_state_dict
from bundle.transforms import tumour_class_names

from .bundle_config import read_config, read_metadata

__all__ = ["export_stock_bundle", "stock_configs"]


def stock_configs(bundle_root: str | os.PathLike, state: dict, path: str = "checkpoint") -> dict[str, tuple[str, ...]]:
    """``{stock file name: the bundle's configs merged into it}`` for the joint model ``state``.

    Raises:
        ValueError: no joint network of the bundle takes ``state``.
    """
    def overlays(base: str) -> list[str]:
        return checkpoint_overlays(bundle_root, [base], state, registration_only=False, path=path)

    return {
        "inference.json": ("inference.json", *overlays("inference.json"), "inference_segmentation.json",
                           "monailabel_infer.json"),
        "train.json": ("train.json", *overlays("train.json"), "monailabel_train.json"),
    }


def _metadata(bundle_root: Path, names: Sequence[str], overrides: dict | None) -> dict:
    """The MONAI Label metadata with the input channels and output classes of the model's configs (T1c + FLAIR in,
    background / oedema / tumour core out for the shipped tumour model; the static overlay describes one channel
    in, background / tumour out)."""
    parser = read_config(bundle_root, names, overrides)
    metadata = read_metadata(bundle_root)
    image = next(iter(metadata["network_data_format"]["inputs"].values()))
    image["num_channels"] = int(parser.get_parsed_content("num_channels"))
    names = parser.get_parsed_content("channel_names") if "channel_names" in parser else None
    if names:
        image["channel_def"] = {str(i): f"{name} (skull-stripped)" for i, name in enumerate(names)}
    pred = next(iter(metadata["network_data_format"]["outputs"].values()))
    classes = tumour_class_names(parser.get_parsed_content("num_tumour_classes"))
    pred["num_channels"], pred["channel_def"] = len(classes), {str(i): name for i, name in enumerate(classes)}
    return metadata


def export_stock_bundle(
    bundle_root: str | os.PathLike, dest: str | os.PathLike, model: str | os.PathLike, overrides: dict | None = None
) -> Path:
    """Write the ``monaibundle`` layout of the bundle at ``bundle_root`` into ``dest``; returns ``dest``.

    Args:
        bundle_root: this bundle (a folder with ``configs/``).
        dest: e.g. ``<monaibundle app>/model/brain_tumour_segmentation`` (created; its configs are replaced).
        model: the checkpoint to copy to ``dest/models/model.pt`` (checked to be a readable state dict).
        overrides: config ids set in both configs, e.g. ``{"pixdim": [4.0, 4.0, 4.0]}``.

    Raises:
        FileNotFoundError: a config or the checkpoint is missing.
        ValueError: the checkpoint is not a readable state dict, or no joint network of the bundle takes it.
    """
    bundle_root, dest = Path(bundle_root), Path(dest)
    files = stock_configs(bundle_root, network_state_dict(model), str(model))  # clear error before anything is written
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    (dest / "models").mkdir(parents=True, exist_ok=True)
    for name, names in files.items():
        parser = read_config(bundle_root, names, overrides)
        config = {**parser.get(), "bundle_root": "."}  # MONAI Label sets it to the bundle's folder
        ConfigParser.export_config_file(config, str(dest / "configs" / name), fmt="json", indent=4)
    (dest / "configs" / "metadata.json").write_text(json.dumps(_metadata(bundle_root, files["inference.json"], overrides), indent=4) + "\n")
    shutil.copyfile(bundle_root / "configs" / "logging.conf", dest / "configs" / "logging.conf")
    shutil.copyfile(model, dest / "models" / "model.pt")
    return dest
