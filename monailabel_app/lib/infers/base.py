"""A MONAI Label infer task whose network, pre-processing, inferer and post-processing come from bundle configs."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence

import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monai.transforms import Compose
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from bundle.engines import load_weights
from bundle.io import OUTPUT_WRITERS

__all__ = ["BundleConfigInferTask"]

logger = logging.getLogger(__name__)


class BundleConfigInferTask(BasicInferTask):
    """Runs the ``network_def`` / ``preprocessing`` / ``inferer`` / ``postprocessing`` of a parsed bundle config.

    The bundle's file writers (``bundle.io.OUTPUT_WRITERS``) are left out: MONAI Label writes the result itself.
    Weights are loaded with :func:`bundle.engines.load_weights` (strict, clear errors for a checkpoint that
    does not fit) from the last existing of ``model_paths``, and reloaded when that file changes.

    Args:
        parser: the bundle config (see :func:`lib.bundle_config.read_config`).
        model_paths: checkpoints, the last existing one is used (MONAI Label's convention).
        labels: ``{name: value}`` of the returned label map.
        description: shown by MONAI Label's ``/info/``.
        kwargs: passed to :class:`BasicInferTask` (``input_key``, ``config``, ...).
    """

    def __init__(
        self,
        parser: ConfigParser,
        model_paths: Sequence[str],
        labels: dict[str, int],
        description: str,
        **kwargs,
    ):
        self.parser = parser
        network = parser.get_parsed_content("network_def", instantiate=True)
        super().__init__(
            path=list(model_paths),
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=int(parser.get_parsed_content("spatial_dims")),
            description=description,
            **kwargs,
        )

    def _transforms(self, config_id: str) -> list[Callable]:
        transforms = self.parser.get_parsed_content(config_id, instantiate=True)
        transforms = list(transforms.transforms) if isinstance(transforms, Compose) else list(transforms)
        return [t for t in transforms if not isinstance(t, OUTPUT_WRITERS)]

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._transforms("preprocessing")

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return self._transforms("postprocessing")

    def inferer(self, data=None) -> Inferer:
        return self.parser.get_parsed_content("inferer", instantiate=True)

    def _get_network(self, device, data):
        path = self.get_path()
        if path is None:
            raise FileNotFoundError(f"no checkpoint: none of {self.path} exists (train first, or set --conf model).")
        mtime = os.stat(path).st_mtime
        cached = self._networks.get(device)
        if cached and cached[1] == mtime:
            return cached[0]
        logger.info(f"loading weights from {path}")
        network = load_weights(copy.deepcopy(self.network), path).to(torch.device(device)).eval()
        self._networks[device] = (network, mtime)
        return network
