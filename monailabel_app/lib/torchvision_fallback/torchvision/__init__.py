"""Stand-in for ``torchvision``, used only where torchvision is NOT installed (see ``lib/compat.py``).

MONAI Label 0.8.5 imports ``torchvision.utils.make_grid`` and ``save_image`` at module level in
``monailabel.transform.post`` (which ``BundleInferTask`` imports) although only its 2D debug-image transforms
call them, and CPU-only torch builds have no torchvision to install. This package provides those two names so
that the import succeeds; calling them, or using anything else of torchvision, raises a clear error.
"""

__version__ = "0+monailabel-app-fallback"


def __getattr__(name: str):
    raise AttributeError(
        f"torchvision.{name}: torchvision is not installed; only a stand-in for MONAI Label's start-up imports "
        "is on the path (monailabel_app/lib/torchvision_fallback). Install the torchvision build that matches "
        "your torch to use it."
    )
