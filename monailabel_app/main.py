"""MONAI Label app for the brain registration / joint tumour segmentation bundle.

    python -m monailabel.main start_server --app monailabel_app --studies STUDIES --host 127.0.0.1 [--conf KEY VALUE ...]

Tasks (see docs/monailabel.md): infer ``tumour_segmentation`` (the joint model's segmentation head on one
image), infer ``atlas_registration`` (an atlas registered onto the image, its labels propagated), train
``joint_model``. The ``--conf`` keys are described in ``lib/bundle_config.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lib.compat import ensure_torchvision

ensure_torchvision()  # before any monailabel task module: they import torchvision.utils

import monailabel  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

from bundle.errors import input_error  # noqa: E402
from lib.bundle_config import AppSettings  # noqa: E402
from lib.infers import AtlasRegistration, TumourSegmentation  # noqa: E402
from lib.infers.atlas_registration import ATLAS_KEY  # noqa: E402
from lib.trainers import JointTraining  # noqa: E402

logger = logging.getLogger(__name__)

# data keys the bundle configs read as files: set by BrainRegistrationApp.infer, never by a client
SERVER_PATH_KEYS = {"brain_mask", "fixed_brain_mask", "moving_brain_mask", "moving", "moving_label", "fixed"}


class BrainRegistrationApp(MONAILabelApp):
    """Infer tasks ``tumour_segmentation`` and ``atlas_registration``, train task ``joint_model``."""

    def __init__(self, app_dir, studies, conf):
        self.settings = AppSettings.from_conf(app_dir, conf)
        logger.info(f"bundle {self.settings.bundle_root}; weights {self.settings.model_paths}; atlas registration {self.settings.atlas_model}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Brain MRI registration and tumour segmentation (MONAI bundle)",
            description="Tumour segmentation, atlas segmentation by registration, training of the joint model",
            version=monailabel.__version__,
        )

    def init_infers(self):
        return {
            "tumour_segmentation": TumourSegmentation(self.settings),
            "atlas_registration": AtlasRegistration(self.settings),
        }

    def init_trainers(self):
        return {"joint_model": JointTraining(self.settings)}

    def init_strategies(self):
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        """Check the request, then run it; a bad request is answered 4xx with the reason, not 500.

        ``atlas_registration`` takes ``atlas``: the id of a datastore image whose final label is propagated. Both
        tasks take ``brain_mask_tag``: the tag of the datastore image's label that is its brain mask (for heads that
        are not skull-stripped; every voxel outside becomes background first); the atlas task also applies a
        datastore atlas's label of that tag, where it has one. The image must be a datastore id or the file the
        client uploaded (MONAI Label's own ``infer`` would also read any path on the server), and the masks are
        found here, never taken as paths from the client.
        """
        from fastapi import HTTPException

        datastore = datastore or self.datastore()
        request = {k: v for k, v in request.items() if k != ATLAS_KEY}  # only set here, never by a client
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this app has {sorted(self._infers)}")
        task = self._infers[model]
        paths = sorted(set(request) & SERVER_PATH_KEYS)
        if paths:
            raise HTTPException(status_code=400, detail=f"{', '.join(paths)}: not request parameters (a server path); "
                                "give brain_mask_tag, the tag of the image's brain-mask label in the datastore")
        image = request.get("image")
        if isinstance(image, str) and not _known_image(image, datastore):
            raise HTTPException(status_code=404, detail=f"unknown image {image!r}: give a datastore image id or upload the file")
        atlas_id = request.get("atlas")
        if atlas_id:
            label = datastore.get_label_uri(atlas_id, DefaultLabelTag.FINAL)
            if not label:
                raise HTTPException(status_code=400, detail=f"atlas {atlas_id!r} has no final label in the datastore")
            request[ATLAS_KEY] = (datastore.get_image_uri(atlas_id), label)
        tag = request.pop("brain_mask_tag", None)
        if tag:
            mask = datastore.get_label_uri(image, tag) if isinstance(image, str) and datastore.get_image_uri(image) else None
            if not mask:
                raise HTTPException(status_code=400, detail=f"brain_mask_tag {tag!r}: image {image!r} has no label "
                                    "of that tag in the datastore (an uploaded image has no labels)")
            request[task.brain_mask_key] = mask
            atlas_mask = datastore.get_label_uri(atlas_id, tag) if atlas_id else None
            if atlas_mask and getattr(task, "atlas_brain_mask_key", None):
                request[task.atlas_brain_mask_key] = atlas_mask
        try:
            return super().infer(request, datastore)
        except Exception as e:
            cause = input_error(e)  # our transforms' and checks' errors name the file and the problem
            if cause is None:
                raise
            raise HTTPException(status_code=400, detail=str(cause)) from e


def _known_image(image: str, datastore) -> bool:
    """A datastore image id, or a file MONAI Label wrote for the client: an upload (temporary folder) or a
    session's image (its session store)."""
    from monailabel.config import settings

    if datastore.get_image_uri(image):
        return True
    path = Path(image).resolve()
    upload = path.parent == Path(tempfile.gettempdir()).resolve() and path.name.startswith("tmp")  # NamedTemporaryFile
    sessions = settings.MONAI_LABEL_SESSION_PATH.strip() or str(Path.home() / ".cache" / "monailabel" / "sessions")
    return path.exists() and (upload or Path(sessions).resolve() in path.parents)
