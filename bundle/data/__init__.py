"""The data sets: the embedded demo (``demo``), the evaluation sets of the side-by-side comparison
(``evaluation``: IBSR, SynthSeg-synthesised, OASIS, LPBA40) and their fixed subject splits (``splits/``)."""

from __future__ import annotations

import json
from pathlib import Path

from bundle.configs import REPO_ROOT

__all__ = ["SHARED_DATA", "SPLITS_DIR", "load_split"]

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # the development data (see its README); never committed
SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def load_split(name: str) -> dict:
    """The committed subject split ``splits/<name>_split.json`` (``ibsr``, ``lpba40``, ``synthseg``, ``tumour``).

    Raises:
        FileNotFoundError: no such split (the known ones named).
    """
    path = SPLITS_DIR / f"{name}_split.json"
    if not path.is_file():
        known = sorted(p.name.removesuffix("_split.json") for p in SPLITS_DIR.glob("*_split.json"))
        raise FileNotFoundError(f"no split {name!r} in {SPLITS_DIR} (known: {known}).")
    return json.loads(path.read_text())
