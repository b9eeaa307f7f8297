"""Image reading whose failures name the file: MONAI's loader raises the reader library's own errors
(``EOFError`` for a truncated ``.nii.gz``, nibabel's ``ImageFileError``, ``RuntimeError`` for an unknown suffix),
often without the file name, and casts complex data to real without a word."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
from monai import transforms
from monai.utils import ensure_tuple

from bundle.errors import one_line

__all__ = ["LoadImage", "LoadImaged", "is_file"]

# MONAI's readers keep the file names of ``read`` on the reader for ``get_data`` (NibabelReader.filenames): two
# threads sharing one LoadImage (CacheDataset's num_workers threads) mix them, and a 2-file image comes back with
# 1 channel. One read at a time per process (a module lock: nothing to pickle for DataLoader worker processes).
_READ_LOCK = threading.Lock()


def is_file(path: str | os.PathLike) -> bool:
    """``Path(path).is_file()``, also ``False`` where the system refuses the name (``OSError``, e.g. a name longer
    than the file system allows) instead of raising: such a file cannot exist."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


class LoadImage(transforms.LoadImage):
    """``monai.transforms.LoadImage`` (same arguments) that names the file when it cannot be read.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image (truncated, not an image, a header that claims more data
            than the file holds, ...), or holds complex values (the cast to real would drop the imaginary part).
    """

    def __call__(self, filename, reader=None):
        try:
            with _READ_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                return super().__call__(filename, reader)
        except FileNotFoundError:
            raise
        except np.exceptions.ComplexWarning as e:
            raise ValueError(f"{self._name(filename)}: complex-valued image; save its magnitude as a real image.") from e
        except Exception as e:  # the reader libraries raise many types for unreadable files
            raise ValueError(f"{self._name(filename)}: not a readable image ({one_line(e)}).") from e

    @staticmethod
    def _name(filename) -> str:
        return ", ".join(str(f) for f in ensure_tuple(filename))


class LoadImaged(transforms.LoadImaged):
    """``monai.transforms.LoadImaged`` (same arguments) with the errors of :class:`LoadImage`."""

    def __init__(self, keys, *args, **kwargs) -> None:
        super().__init__(keys, *args, **kwargs)
        self._loader.__class__ = LoadImage  # MONAI builds its loader in __init__: the same object, our __call__
