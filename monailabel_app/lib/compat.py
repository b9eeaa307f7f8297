"""Let MONAI Label start where torchvision is not installed, without hiding a real torchvision.

``monailabel.transform.post`` (imported by ``BundleInferTask``) does ``from torchvision.utils import make_grid,
save_image`` at import time. :func:`ensure_torchvision` appends ``lib/torchvision_fallback`` to the END of
``sys.path`` only when no torchvision can be imported: a real installation (GPU users) always comes first on
the path and is used unchanged; the stand-in raises a clear error if its functions are ever called.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

__all__ = ["FALLBACK_DIR", "ensure_torchvision"]

logger = logging.getLogger(__name__)

FALLBACK_DIR = Path(__file__).resolve().parent / "torchvision_fallback"


def ensure_torchvision(export_env: bool = False) -> str:
    """Make ``import torchvision.utils`` work; returns ``"torchvision"`` (the real one) or ``"fallback"``.

    Args:
        export_env: when the stand-in is used, also append its folder to ``PYTHONPATH`` so that the
            subprocesses MONAI Label starts (training, batch inference) find it; only for launching apps
            whose ``main.py`` does not call this function itself (MONAI Label's ``monaibundle`` app).
    """
    if str(FALLBACK_DIR) not in sys.path:
        if importlib.util.find_spec("torchvision") is not None:
            return "torchvision"
        sys.path.append(str(FALLBACK_DIR))
        logger.warning(f"torchvision is not installed: using the import-only stand-in in {FALLBACK_DIR}")
    if export_env and str(FALLBACK_DIR) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(FALLBACK_DIR)]))
    return "fallback"
