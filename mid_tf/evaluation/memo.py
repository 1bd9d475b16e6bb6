"""Finished pieces of a robustness report, kept on disk so that a killed evaluation resumes.

A full report (every attack, two threat models, four models, 10,000 images) takes hours on a CPU.
Each finished piece - one transfer attack (its adversarials scored by every model), one white-box
attack on one model, one model's gradient and eps checks - is written here as soon as it is done,
and a rerun of the eval stage reads it back instead of crafting again.

A piece is keyed by everything its numbers depend on: the attack spec, the example count, the seed,
and a fingerprint of the weights of every model involved (so a retrained model is evaluated anew,
never matched to stale numbers). Models given as plain functions have no fingerprint; their pieces
are never memoized. The file is rewritten atomically after each piece.
"""

from __future__ import annotations

import hashlib
import json
import os


def fingerprint(model) -> str | None:
    """SHA-1 of a Keras model's weights (names, shapes, bytes); None for anything else."""
    import keras
    if not isinstance(model, keras.Model):
        return None
    h = hashlib.sha1()
    for v in model.weights:
        value = v.numpy()
        h.update(f"{v.path}:{value.shape}:{value.dtype}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _has_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_none(v) for v in value)
    if isinstance(value, dict):
        return any(_has_none(v) for v in value.values())
    return False


class ReportMemo:
    """get(key) / put(key, value) over a JSON file; `path=None` keeps nothing (memo off)."""

    def __init__(self, path: str | None = None):
        self.path, self.entries, self.hits = path, {}, 0
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError):
                self.entries = {}  # unreadable (never half-written: writes are atomic): start over

    @staticmethod
    def key(*parts) -> str | None:
        """A key from JSON-able parts; None if any part is None (a model without fingerprint)."""
        return None if _has_none(parts) else json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str | None):
        if self.path is None or key is None or key not in self.entries:
            return None
        self.hits += 1
        return self.entries[key]

    def put(self, key: str | None, value) -> None:
        if self.path is None or key is None:
            return
        from mid_tf.artifacts import write_json_atomic
        self.entries[key] = value
        write_json_atomic(self.path, self.entries)
