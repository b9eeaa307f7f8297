"""Image reading whose failures name the file: MONAI's loader raises the reader library's own errors
(``EOFError`` for a truncated ``.nii.gz``, nibabel's ``ImageFileError``, ``RuntimeError`` for an unknown suffix),
often without the file name, and casts complex data to real without a word."""

from __future__ import annotations

import copy
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from monai import transforms
from monai.data import MetaTensor
from monai.utils import convert_to_dst_type, ensure_tuple

from bundle.errors import one_line

__all__ = ["LoadImage", "LoadImaged", "is_file"]

# MONAI's readers keep the file names of ``read`` on the reader for ``get_data`` (NibabelReader.filenames): two
# threads sharing one LoadImage (CacheDataset's num_workers threads) mix them, and a 2-file image comes back with
# 1 channel. One read at a time per LoadImage object (module-level locks keyed by the object: nothing to pickle
# for DataLoader worker processes); separate objects (LoadImaged's per-key copies) read at the same time.
_READ_LOCKS: dict[int, threading.Lock] = defaultdict(threading.Lock)
_LOCKS_LOCK = threading.Lock()


def _read_lock(loader) -> threading.Lock:
    with _LOCKS_LOCK:
        return _READ_LOCKS[id(loader)]


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
        # The cast to ``dtype`` happens here, after a look at the type read: a ComplexWarning turned into an error
        # is no test, since warning filters are process-wide and LoadImaged reads its keys in parallel threads.
        try:
            with _read_lock(self):
                dtype, self.dtype = self.dtype, None
                try:
                    result = super().__call__(filename, reader)
                finally:
                    self.dtype = dtype
        except FileNotFoundError:
            raise
        except Exception as e:  # the reader libraries raise many types for unreadable files
            raise ValueError(f"{self._name(filename)}: not a readable image ({one_line(e)}).") from e
        image = result if self.image_only else result[0]
        if torch.as_tensor(image).is_complex():
            raise ValueError(f"{self._name(filename)}: complex-valued image; save its magnitude as a real image.")
        if dtype is not None:
            image = convert_to_dst_type(image, dst=image, dtype=dtype)[0]
        return image if self.image_only else (image, image.meta if isinstance(image, MetaTensor) else result[1])

    @staticmethod
    def _name(filename) -> str:
        return ", ".join(str(f) for f in ensure_tuple(filename))


class LoadImaged(transforms.LoadImaged):
    """``monai.transforms.LoadImaged`` (same arguments) with the errors of :class:`LoadImage`, reading the keys'
    files at the same time, one thread per key (gzip and the readers release the GIL: the moving and fixed images
    of a pair load in about the time of one). ``parallel=False`` reads them one after another."""

    def __init__(self, keys, *args, parallel: bool = True, **kwargs) -> None:
        super().__init__(keys, *args, **kwargs)
        self._loader.__class__ = LoadImage  # MONAI builds its loader in __init__: the same object, our __call__
        self.parallel = parallel
        self._key_loaders: dict = {}

    def _loader_of(self, key) -> LoadImage:
        """One loader (readers included) per key, so that keys read at the same time share no reader state."""
        if key not in self._key_loaders:
            self._key_loaders[key] = copy.deepcopy(self._loader)
        return self._key_loaders[key]

    def __call__(self, data, reader=None):
        d = dict(data)
        keys = [key for key in self.key_iterator(d)]
        if not self.parallel or len(keys) < 2:
            return super().__call__(d, reader)
        loaders = {key: self._loader_of(key) for key in keys}
        with ThreadPoolExecutor(max_workers=len(keys)) as pool:
            futures = {key: pool.submit(loaders[key], d[key], reader) for key in keys}
            loaded = {key: future.result() for key, future in futures.items()}  # the first key's error first
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            # as monai.transforms.LoadImaged.__call__ (1.6), on the images already read
            result = loaded[key]
            if self._loader.image_only:
                d[key] = result
                continue
            d[key] = result[0]
            meta_key = meta_key or f"{key}_{meta_key_postfix}"
            if meta_key in d and not self.overwriting:
                raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
            d[meta_key] = result[1]
        return d
