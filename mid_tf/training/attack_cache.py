"""The attack cache of the transfer protocol: craft the pool's adversarials once, reuse them for K epochs.

When the pool's attacks are crafted on the fixed target (`--attack_source=target`, the paper's
protocol) they do not depend on the student, so crafting them anew every step repeats identical work
for every attack without a random start (MIM, targeted or not) and redraws only PGD's random start.
The cache crafts all tasks for the whole training split once per *refresh* (every
`--attack_cache_epochs` epochs, with new seeds, hence new random starts), and the MID step then
spends its time on the meta update alone. What changes: within one refresh period an example sees
the same PGD random start in every epoch. The per-step held-out split is unchanged.

Crafting order and overlap. The examples are crafted in chunks, in the order in which the period's
first epoch will ask for them (`crafting_order`), with chunk c seeded by (refresh, c). So the cache is
a deterministic function of (pool seed, refresh, data order) however it is built: all at once before
training (`overlap=False`), or by a background thread while training runs (`overlap=True`, the
default of `--attack_cache_overlap`). In the overlapped case the tf.data stream gathers each batch
from the cache through `AttackCache.gather`, which waits until that batch's examples are crafted:
the first meta steps start after one chunk instead of after the whole split, and crafting the rest
overlaps with training. Both builds give the same cache bit for bit (tested), so the overlap changes
the wall time only; a resumed run rebuilds exactly the same cache.
Memory: N x T x H x W x C float32 (MNIST, 5 tasks: 0.94 GB).
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import tensorflow as tf

from mid_tf.data import Split
from mid_tf.data.pipeline import epoch_order

_REFRESH_STRIDE = 1_000_003  # keeps the crafting "steps" of different refreshes apart


def crafting_order(n: int, batch_size: int, seed: int, start_batch: int, steps: int) -> np.ndarray:
    """A permutation of range(n): the examples in the order the training stream first asks for them
    from global batch `start_batch` on (`steps` batches), then those it does not ask for, ascending."""
    wanted = epoch_order(n, batch_size, seed, start_batch, steps)
    _, first = np.unique(wanted, return_index=True)
    seen = wanted[np.sort(first)]  # distinct, in order of first appearance
    rest = np.setdiff1d(np.arange(n), seen, assume_unique=True)
    return np.concatenate([seen, rest]).astype(np.int64)


class AttackCache:
    """All tasks of `pool` for every example of `split`, float32 [N, T, H, W, C], crafted on `source_model`.

    `fill()` crafts everything in the calling thread; `start()` does it in a background thread, and
    `gather(indices)` (what the tf.data stream calls) returns those examples' tasks once they are ready.
    An error in the crafting thread is raised by `gather` and `join`, never swallowed.
    """

    def __init__(self, pool, source_model, split: Split, *, batch_size: int, refresh: int, order: np.ndarray):
        n = len(split)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError("crafting order must be a permutation of the split's examples")
        self.pool, self.source_model, self.split = pool, source_model, split
        self.batch_size, self.refresh, self.order = int(batch_size), int(refresh), np.asarray(order, np.int64)
        self.data = np.empty((n, pool.num_tasks, *split.images.shape[1:]), np.float32)
        self._ready = np.zeros(n, bool)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def shape(self) -> tuple:
        return self.data.shape

    def announce(self, how: str) -> None:
        print(f"attack cache: crafting {self.pool.num_tasks} tasks {list(self.pool.names)} for {len(self.order)} "
              f"examples (refresh {self.refresh}){how}", flush=True)

    def fill(self, progress: bool = False) -> "AttackCache":
        craft = tf.function(lambda x, y, step: self.pool.craft_all(self.source_model, x, y, step),
                            reduce_retracing=True)
        n = len(self.order)
        bar = keras.utils.Progbar(n, unit_name="image") if progress else None
        if progress:
            self.announce("")
        try:
            for c, start in enumerate(range(0, n, self.batch_size)):
                idx = self.order[start:start + self.batch_size]
                x = tf.constant(self.split.images[idx], tf.float32) / 255.0
                y = tf.constant(self.split.labels[idx])
                step = tf.constant(self.refresh * _REFRESH_STRIDE + c, tf.int64)
                tasks = craft(x, y, step)  # [T, b, H, W, C]
                self.data[idx] = np.moveaxis(tasks.numpy(), 0, 1)
                with self._cond:
                    self._ready[idx] = True
                    self._cond.notify_all()
                if bar:
                    bar.add(len(idx))
        except BaseException as e:  # handed to the consumer: a failed crafting never deadlocks training
            with self._cond:
                self._error = e
                self._cond.notify_all()
            raise
        return self

    def start(self) -> "AttackCache":
        """Crafts in a background thread (TF releases the GIL while it computes)."""
        def run():
            try:
                self.fill()
            except BaseException:  # kept in self._error for gather()/join()
                pass
        self._thread = threading.Thread(target=run, name=f"attack-cache-{self.refresh}", daemon=True)
        self._thread.start()
        return self

    def gather(self, indices) -> np.ndarray:
        """Tasks of `indices` [B] -> [B, T, H, W, C], waiting until they are crafted."""
        indices = np.asarray(indices, np.int64)
        with self._cond:
            while not self._ready[indices].all():
                if self._error is not None:
                    raise RuntimeError("attack cache: crafting failed") from self._error
                self._cond.wait()
        return self.data[indices]

    def join(self) -> "AttackCache":
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError("attack cache: crafting failed") from self._error
        return self

    @property
    def complete(self) -> bool:
        return bool(self._ready.all())
