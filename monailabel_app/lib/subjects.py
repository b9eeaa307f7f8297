"""Split the datastore's labelled images into training and validation subjects."""

from __future__ import annotations

__all__ = ["split_subjects"]


def split_subjects(subjects: list[dict], val_split: float) -> tuple[list[dict], list[dict]]:
    """The last ``round(len * val_split)`` subjects validate, keeping at least 2 for training (one pair).

    Raises:
        ValueError: fewer than 2 subjects, or ``val_split`` outside [0, 1).
    """
    if len(subjects) < 2:
        raise ValueError(f"training needs at least 2 labelled images (one pair), the datastore has {len(subjects)}.")
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}.")
    n_val = min(round(len(subjects) * val_split), len(subjects) - 2)
    return subjects[: len(subjects) - n_val], subjects[len(subjects) - n_val :]
