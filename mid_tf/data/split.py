"""What every loader returns (`Split`) and raises (`DataError`); a module of its own so that the loaders
(datasets.py, folders.py) import it and not each other."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(RuntimeError):
    """Data that is missing, unreadable or inconsistent; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Split:
    """An in-memory split: uint8 images [N, H, W, C] and int64 labels [N].

    `class_names[i]` names label i when the source knows it (every loader here sets it; splits built by
    hand may leave it None)."""
    images: np.ndarray
    labels: np.ndarray
    source: str  # where it was read from, for the run summary
    class_names: tuple | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])
