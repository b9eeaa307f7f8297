"""Datalist JSON -> list of registration pairs ``{moving, fixed, moving_label?, fixed_label?, name}``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path

__all__ = ["load_pairs", "PAIRINGS"]

PAIRINGS = ("explicit", "atlas", "all")
_PATH_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "moving_tumour", "fixed_tumour", "image", "label", "tumour")


def _resolve(value, base: Path, where: str, check: bool):
    """Absolute path(s) for one file or a list of files (stacked as channels); check they exist."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: empty list of files.")
        return [_resolve(v, base, where, check) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{where}: expected a file path or a list of paths, got {value!r}.")
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if check and not path.is_file():
        raise FileNotFoundError(f"{where}: file not found: {path}")
    return str(path)


def _subject_pair(moving: dict, fixed: dict, name: str) -> dict:
    pair = {"moving": moving["image"], "fixed": fixed["image"], "name": name}
    for key in ("label", "tumour"):
        if key in moving:
            pair[f"moving_{key}"] = moving[key]
        if key in fixed:
            pair[f"fixed_{key}"] = fixed[key]
    return pair


def _subject_name(subject: dict, index: int) -> str:
    return str(subject.get("name", index))


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
      "moving_tumour"?, "fixed_tumour"?, "name"?}`` (``*_label``: anatomical label maps; ``*_tumour``: tumour masks).
    - ``"atlas"``: ``section`` lists subjects ``{"image", "label"?, "tumour"?, "name"?}``; each is registered to the
      top-level ``"atlas"`` subject (moving = subject, fixed = atlas).
    - ``"all"``: ``section`` lists subjects; every ordered pair of distinct subjects is a pair.

    ``pairing`` defaults to the datalist's top-level ``"pairing"`` key, else ``"explicit"``. Pairs without a
    ``name`` are named by their index (for subjects, ``<moving>_to_<fixed>``).

    Raises:
        FileNotFoundError: the datalist or a file it names does not exist.
        ValueError: malformed datalist, unknown pairing, or no pairs.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"datalist {path} must hold a JSON object with a {section!r} list.")
    pairing = pairing or content.get("pairing", "explicit")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r} (datalist {path}).")
    entries = content.get(section)
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise ValueError(f"datalist {path} has no entries in section {section!r}.")

    base = path.parent.resolve()
    resolved = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"datalist {path} [{section}][{i}]: expected an object, got {entry!r}.")
        needed = ("moving", "fixed") if pairing == "explicit" else ("image",)
        missing = [k for k in needed if k not in entry]
        if missing:
            raise ValueError(f"datalist {path} [{section}][{i}]: missing {missing} for pairing {pairing!r}.")
        item = dict(entry)
        for key in _PATH_KEYS:
            if key in item:
                item[key] = _resolve(item[key], base, f"datalist {path} [{section}][{i}].{key}", check_files)
        resolved.append(item)

    if pairing == "explicit":
        pairs = [{**item, "name": str(item.get("name", i))} for i, item in enumerate(resolved)]
    elif pairing == "atlas":
        atlas = content.get("atlas")
        if not isinstance(atlas, dict) or "image" not in atlas:
            raise ValueError(f"datalist {path}: pairing 'atlas' needs a top-level 'atlas' object with an 'image'.")
        atlas = {k: _resolve(v, base, f"datalist {path} atlas.{k}", check_files) if k in _PATH_KEYS else v for k, v in atlas.items()}
        pairs = [_subject_pair(s, atlas, f"{_subject_name(s, i)}_to_atlas") for i, s in enumerate(resolved)]
    else:
        pairs = [
            _subject_pair(resolved[i], resolved[j], f"{_subject_name(resolved[i], i)}_to_{_subject_name(resolved[j], j)}")
            for i, j in permutations(range(len(resolved)), 2)
        ]
    if not pairs:
        raise ValueError(f"datalist {path} section {section!r} gives no pairs (pairing {pairing!r}).")
    return pairs
