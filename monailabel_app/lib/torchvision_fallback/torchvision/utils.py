"""``make_grid`` / ``save_image`` of the torchvision stand-in: importable, and a clear error when called."""

__all__ = ["make_grid", "save_image"]


def _needs_torchvision(name: str):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError(
            f"torchvision.utils.{name} was called, but torchvision is not installed (a stand-in only lets MONAI "
            "Label start). Install the torchvision build that matches your torch to use MONAI Label's 2D "
            "debug-image transforms."
        )

    missing.__name__ = name
    return missing


make_grid = _needs_torchvision("make_grid")
save_image = _needs_torchvision("save_image")
