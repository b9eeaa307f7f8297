"""MONAI Label's command line (``python -m monailabel.main``) that also runs where torchvision is not installed.

    python monailabel_app/monailabel_cli.py start_server --app APP --studies STUDIES [--conf KEY VALUE ...]

Same arguments as ``monailabel``, except that ``start_server`` binds to 127.0.0.1 unless ``--host`` is given
(MONAI Label has no authentication; its own default is every interface). Before MONAI Label is imported, the torchvision stand-in of
``lib/compat.py`` is put on the path (and on ``PYTHONPATH`` for MONAI Label's training subprocesses) if,
and only if, torchvision is missing. Needed for apps whose ``main.py`` does not do it itself, such as
MONAI Label's stock ``monaibundle`` app; this app's ``main.py`` does. With ``--workers`` > 1 uvicorn
starts fresh processes: they find the stand-in through ``PYTHONPATH`` too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load_compat():
    """``lib/compat.py`` loaded by path: this folder must not stay on ``sys.path`` (its ``lib`` shadows an app's)."""
    spec = importlib.util.spec_from_file_location("monailabel_app_compat", HERE / "lib" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def local_by_default(argv: list[str]) -> list[str]:
    """``argv`` with ``--host 127.0.0.1`` added to a ``start_server`` command that names no host."""
    if "start_server" in argv and not any(a in ("--host", "-i") or a.startswith(("--host=", "-i=")) for a in argv):
        return [*argv, "--host", "127.0.0.1"]
    return argv


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)
    sys.argv = [sys.argv[0], *local_by_default(sys.argv[1:])]
    _load_compat().ensure_torchvision(export_env=True)
    from monailabel.main import Main

    Main().run()
