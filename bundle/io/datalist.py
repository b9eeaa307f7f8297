"""Datalist JSON -> list of registration pairs ``{moving, fixed, moving_label?, fixed_label?, name}``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path

from bundle.io.readers import is_file

__all__ = ["load_pairs", "load_subjects", "check_label_supervision", "PAIRINGS"]

PAIRINGS = ("explicit", "atlas", "all")
_PATH_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "moving_tumour", "fixed_tumour", "moving_brain_mask",
              "fixed_brain_mask", "image", "label", "tumour", "brain_mask")


def _resolve(value, base: Path, where: str, check: bool, channels: bool = True):
    """Absolute path(s) for one file or a flat list of files (stacked as channels); check they exist."""
    if channels and isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: empty list of files.")
        return [_resolve(v, base, where, check, channels=False) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where}: expected a file path or a list of paths, got {value!r}.")
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if check and not is_file(path):
        raise FileNotFoundError(f"{where}: file not found: {path}")
    return str(path)


def _subject_pair(moving: dict, fixed: dict, name: str) -> dict:
    pair = {"moving": moving["image"], "fixed": fixed["image"], "name": name}
    for key in ("label", "tumour", "brain_mask"):
        if key in moving:
            pair[f"moving_{key}"] = moving[key]
        if key in fixed:
            pair[f"fixed_{key}"] = fixed[key]
    return pair


def _subject_name(subject: dict, index: int) -> str:
    return str(subject.get("name", index))


def load_subjects(datalist: str | os.PathLike, section: str = "testing", check_files: bool = True) -> list[dict]:
    """Read single images ``{"image", "label"?, "tumour"?, "brain_mask"?, "name"?}`` from a datalist section (e.g. to
    segment).

    Entries that are pairs contribute their ``fixed`` image (with its labels), each image once. Names default
    to the image's file name without extension.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_pairs`.
    """
    content, path = _read(datalist, section)
    subjects: dict[str, dict] = {}
    for i, entry in enumerate(content[section]):
        if isinstance(entry, dict) and "image" not in entry and "fixed" in entry:  # a pair: take its fixed image
            entry = {"image": entry["fixed"], **{k.removeprefix("fixed_"): v for k, v in entry.items() if k.startswith("fixed_")}}
        item = _resolve_entry(entry, path, section, i, ("image",), check_files)
        first = item["image"][0] if isinstance(item["image"], list) else item["image"]
        name = str(item.get("name", Path(first).name.split(".")[0]))
        subjects.setdefault(str(item["image"]), {**item, "name": name})
    return list(subjects.values())


def _read(datalist: str | os.PathLike, section: str) -> tuple[dict, Path]:
    """Parsed datalist JSON and its path; the section must be a non-empty list."""
    path = Path(datalist)
    if not is_file(path):
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not text
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ValueError(f"datalist {path} is not a datalist: JSON nested too deeply.") from e
    except OSError as e:
        raise ValueError(f"datalist {path} cannot be read: {e.strerror}.") from e
    if not isinstance(content, dict):
        raise ValueError(f"datalist {path} must hold a JSON object with a {section!r} list.")
    entries = content.get(section)
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise ValueError(f"datalist {path} has no entries in section {section!r}.")
    return content, path


def _resolve_entry(entry, path: Path, section: str, index: int, needed: Sequence[str], check_files: bool) -> dict:
    """Check an entry has the ``needed`` keys and make its paths absolute (relative to the datalist)."""
    if not isinstance(entry, dict):
        raise ValueError(f"datalist {path} [{section}][{index}]: expected an object, got {entry!r}.")
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"datalist {path} [{section}][{index}]: missing {missing}.")
    base = path.parent.resolve()
    return {
        k: _resolve(v, base, f"datalist {path} [{section}][{index}].{k}", check_files) if k in _PATH_KEYS else v
        for k, v in entry.items()
    }


def load_pairs(
    datalist: str | os.PathLike,
    section: str = "training",
    pairing: str | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Read registration pairs from a datalist JSON.

    Formats (paths absolute or relative to the datalist's folder; an image may be a list of files that
    are stacked as channels, e.g. MRI sequences in the order ``metadata.json`` lists):

    - ``"explicit"``: ``section`` lists pairs ``{"moving", "fixed", "moving_label"?, "fixed_label"?,
      "moving_tumour"?, "fixed_tumour"?, "moving_brain_mask"?, "fixed_brain_mask"?, "name"?}`` (``*_label``:
      anatomical label maps; ``*_tumour``: tumour masks; ``*_brain_mask``: brain masks on the image's grid, for
      images that are not skull-stripped, applied by the training and inference configs).
    - ``"atlas"``: ``section`` lists subjects ``{"image", "label"?, "tumour"?, "brain_mask"?, "name"?}``; each is registered to the
      top-level ``"atlas"`` subject (moving = subject, fixed = atlas).
    - ``"all"``: ``section`` lists subjects; every ordered pair of distinct subjects is a pair.

    ``pairing`` defaults to the datalist's top-level ``"pairing"`` key, else ``"explicit"``. Pairs without a
    ``name`` are named by their index (for subjects, ``<moving>_to_<fixed>``).

    Raises:
        FileNotFoundError: the datalist or a file it names does not exist.
        ValueError: malformed datalist, unknown pairing, or no pairs.
    """
    content, path = _read(datalist, section)
    pairing = pairing or content.get("pairing", "explicit")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r} (datalist {path}).")
    needed = ("moving", "fixed") if pairing == "explicit" else ("image",)
    resolved = [_resolve_entry(e, path, section, i, needed, check_files) for i, e in enumerate(content[section])]

    if pairing == "explicit":
        pairs = [{**item, "name": str(item.get("name", i))} for i, item in enumerate(resolved)]
    elif pairing == "atlas":
        atlas = content.get("atlas")
        if not isinstance(atlas, dict) or "image" not in atlas:
            raise ValueError(f"datalist {path}: pairing 'atlas' needs a top-level 'atlas' object with an 'image'.")
        atlas = _resolve_entry(atlas, path, "atlas", 0, ("image",), check_files)
        pairs = [_subject_pair(s, atlas, f"{_subject_name(s, i)}_to_atlas") for i, s in enumerate(resolved)]
    else:
        pairs = [
            _subject_pair(resolved[i], resolved[j], f"{_subject_name(resolved[i], i)}_to_{_subject_name(resolved[j], j)}")
            for i, j in permutations(range(len(resolved)), 2)
        ]
    if not pairs:
        raise ValueError(f"datalist {path} section {section!r} gives no pairs (pairing {pairing!r}).")
    return pairs


def check_label_supervision(pairs: Sequence[dict], label_weight: float, section: str = "training") -> int:
    """Number of pairs with both label maps; raise when ``label_weight > 0`` but none has them.

    A label weight with no labelled pair would be accepted and silently ignored: training would run
    unsupervised while the config says otherwise.

    Raises:
        ValueError: ``label_weight > 0`` and no pair has ``moving_label`` and ``fixed_label``.
    """
    labelled = sum(1 for p in pairs if "moving_label" in p and "fixed_label" in p)
    if label_weight > 0 and labelled == 0:
        raise ValueError(
            f"label_weight={label_weight} but no {section} pair has both moving_label and fixed_label: "
            "add label maps to the datalist or set label_weight to 0."
        )
    return labelled
