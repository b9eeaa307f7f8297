"""Train the joint registration / tumour segmentation model on the datastore's labelled images."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from bundle.engines import load_weights
from bundle.io.writers import write_atomic

from ..bundle_config import AppSettings
from ..subjects import split_subjects

__all__ = ["JointTraining", "configs"]

logger = logging.getLogger(__name__)



def configs(settings: AppSettings) -> tuple[str, ...]:
    """The bundle's training config for the architecture of the app's joint model (so that what it trains, the
    infer task loads), with MONAI Label's data (subjects -> every ordered pair; see docs/monailabel.md)."""
    return ("train.json", *settings.joint_overlays("train.json"), "monailabel_train.json")


class JointTraining(TrainTask):
    """Run the bundle's training (``configs/train.json`` + the model's architecture overlays +
    ``configs/monailabel_train.json``, see :func:`configs`) on the datastore.

    Every labelled image is a subject (its final label is its tumour mask); sorted by path, the last
    ``val_split`` of them validate. Training pairs are every ordered pair of training subjects, validation pairs
    every training subject registered to each validation subject (or, with no validation subject, the
    training pairs). Each run writes to ``<app>/model/train_runs/<time>/`` (checkpoints, TensorBoard logs);
    the best model (highest validation tumour Dice, ``val_tumour_dice``) is then published atomically to
    ``<app>/model/trained_model.pt``, which the infer tasks pick up. With ``pretrained`` the network starts
    from the infer tasks' current checkpoint.
    """

    def __init__(self, settings: AppSettings):
        super().__init__("Train the joint registration / tumour segmentation model on the labelled images")
        self.settings = settings

    def config(self):
        return {"max_epochs": 10, "val_split": 0.2, "pretrained": True, "device": device_list()}

    def __call__(self, request, datastore: Datastore):
        labelled = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d.get("label")]
        subjects = sorted(labelled, key=lambda d: d["image"])  # the same split whatever the datastore's order
        train, val = split_subjects(subjects, float(request.get("val_split", 0.2)))
        run_dir = self.settings.app_dir / "model" / "train_runs" / time.strftime("%Y%m%d_%H%M%S")
        device = name_to_device(request.get("device"))
        folder = self.settings.bundle_root / "configs"
        workflow = ConfigWorkflow(
            config_file=[str(folder / f) for f in configs(self.settings)],
            meta_file=str(folder / "metadata.json"),
            **{
                **self.settings.overrides,
                "bundle_root": str(self.settings.bundle_root),
                "ckpt_dir": str(run_dir / "models"),
                "output_dir": str(run_dir / "eval"),
                "device": torch.device(device),
                "max_epochs": int(request.get("max_epochs", 10)),
                "progress_bar": False,
                "train#dataset#data": train,
                "validate#dataset#data": val,
            },
        )
        workflow.initialize()
        start = self._start_checkpoint() if request.get("pretrained", True) else None
        if start is not None:
            logger.info(f"starting from {start}")
            load_weights(workflow.parser.get_parsed_content("network_def"), start)
        logger.info(f"training on {len(train)} subjects, validating on {len(val) or len(train)}; run folder {run_dir}")
        workflow.run()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        workflow.finalize()
        best = run_dir / "models" / "model.pt"
        if not best.is_file():
            raise RuntimeError(f"training wrote no best model ({best}): no validation ran (see {run_dir}).")
        published = self._publish(best)
        return {
            "model": str(published),
            "run_dir": str(run_dir),
            "best_metric": float(evaluator.state.best_metric),
            "best_metric_epoch": int(evaluator.state.best_metric_epoch),
            "train_subjects": len(train),
            "val_subjects": len(val),
        }

    def _start_checkpoint(self) -> Path | None:
        existing = [Path(p) for p in self.settings.model_paths if Path(p).is_file()]
        return existing[-1] if existing else None

    def _publish(self, best: Path) -> Path:
        """Copy ``best`` to the infer tasks' trained-model path atomically (no half-written file is ever read)."""
        target = write_atomic(self.settings.trained_model, ".pt", lambda tmp: shutil.copyfile(best, tmp))
        logger.info(f"published {best} -> {target}")
        return target
