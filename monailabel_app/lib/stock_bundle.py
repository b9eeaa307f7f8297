"""Lay the bundle out for MONAI Label's stock ``monaibundle`` app (``BundleInferTask`` / ``BundleTrainTask``).

Those tasks read fixed file names from ``<app>/model/<name>/``: ``configs/inference.json`` (ids
``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), ``configs/metadata.json`` (first input
and output of ``network_data_format``, the output's ``channel_def`` as the labels), ``configs/train.json``
(ids ``bundle_root``, ``device``, ``network``, ``train#trainer#max_epochs``, ``train#dataset#data``,
``train#handlers``, ``validate#dataset#data``) and ``models/model.pt``. This bundle's ``inference.json`` is
the pair registration and its metadata describes the joint network, so the layout is made from the MONAI
Label variants, each file being the bundle's own config merged with its overlay:

- ``inference.json`` = ``inference.json`` + ``joint.json`` + ``inference_segmentation.json`` + ``monailabel_infer.json`` (no file
  writer);
- ``metadata.json`` = ``metadata.json`` + ``monailabel_metadata.json`` (the segmentation head's I/O);
- ``train.json`` = ``train.json`` + ``monailabel_train.json`` (datastore subjects -> every ordered pair).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from monai.bundle import ConfigParser

from bundle.engines import load_checkpoint

from .bundle_config import read_config, read_metadata

__all__ = ["export_stock_bundle", "STOCK_CONFIGS"]

STOCK_CONFIGS = {
    "inference.json": ("inference.json", "joint.json", "inference_segmentation.json", "monailabel_infer.json"),
    "train.json": ("train.json", "monailabel_train.json"),
}


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
        ValueError: the checkpoint is not a readable state dict.
    """
    bundle_root, dest = Path(bundle_root), Path(dest)
    load_checkpoint(model)  # clear error before anything is written
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    (dest / "models").mkdir(parents=True, exist_ok=True)
    for name, files in STOCK_CONFIGS.items():
        parser = read_config(bundle_root, files, overrides)
        config = {**parser.get(), "bundle_root": "."}  # MONAI Label sets it to the bundle's folder
        ConfigParser.export_config_file(config, str(dest / "configs" / name), fmt="json", indent=4)
    (dest / "configs" / "metadata.json").write_text(json.dumps(read_metadata(bundle_root), indent=4) + "\n")
    shutil.copyfile(bundle_root / "configs" / "logging.conf", dest / "configs" / "logging.conf")
    shutil.copyfile(model, dest / "models" / "model.pt")
    return dest
