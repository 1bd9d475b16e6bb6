"""Per-example result cache for ART's numpy attacks, keyed by the bytes of each input row.

ART's Square attack asks the classifier three times per query for rows it has already seen: it
re-predicts every image (`predict(x_adv)`, the robust ones unchanged since the last query and the
broken ones never changing again), then recomputes the loss of the current robust points (computed
one query earlier as the candidates). ART's APGD computes the loss at x_{k+1} and, at the next
iteration, the gradient at the same point. A model in inference mode maps each example independently
of its batch, so one forward (and backward) pass per new row gives every answer: `RowCache` holds the
outputs by a 128-bit BLAKE2b digest of the row (and its label), least recently used dropped beyond
`capacity`. Measured effect: docs/attacks.md ("Row cache").
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def row_keys(*arrays) -> list[bytes]:
    """One digest per example over the given arrays' rows (e.g. an image and its label row)."""
    rows = [np.ascontiguousarray(a).reshape(len(a), -1) for a in arrays]
    keys = []
    for i in range(len(rows[0])):
        h = hashlib.blake2b(digest_size=16)
        for r in rows:
            h.update(r[i].tobytes())
        keys.append(h.digest())
    return keys


class RowCache:
    """`cache(compute, *arrays)` returns `compute(*arrays)` but calls `compute` only on rows not seen.

    `compute` takes row subsets of `arrays` and returns a tuple of per-row outputs (first axis = rows).
    `hits` / `misses` count rows answered from the cache / computed."""

    def __init__(self, capacity: int = 50_000):
        if capacity < 1:
            raise ValueError(f"RowCache capacity must be >= 1, got {capacity}")
        self.capacity, self.hits, self.misses = capacity, 0, 0
        self._store: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()

    def __len__(self):
        return len(self._store)

    def __call__(self, compute, *arrays) -> tuple:
        n = len(arrays[0])
        if n == 0:
            return tuple(np.asarray(o) for o in compute(*arrays))
        keys = row_keys(*arrays)
        miss, first = [], {}
        for i, k in enumerate(keys):
            if k not in self._store and k not in first:
                first[k] = len(miss)
                miss.append(i)
        fresh = {}
        if miss:
            out = [np.asarray(o) for o in compute(*(a[miss] for a in arrays))]
            fresh = {keys[i]: tuple(o[j] for o in out) for j, i in enumerate(miss)}
        rows = []
        for k in keys:
            value = fresh.get(k)
            if value is None:
                value = self._store[k]
                self._store.move_to_end(k)
            rows.append(value)
        self._store.update(fresh)
        while len(self._store) > self.capacity:
            self._store.popitem(last=False)
        self.misses += len(miss)
        self.hits += n - len(miss)
        return tuple(np.stack([r[m] for r in rows]) for m in range(len(rows[0])))
