"""The attack cache of the transfer protocol: craft the pool's adversarials once, reuse them for K epochs.

When the pool's attacks are crafted on the fixed target (`--attack_source=target`, the paper's
protocol) they do not depend on the student, so crafting them anew every step repeats identical work
for every attack without a random start (MIM, targeted or not) and redraws only PGD's random start.
The cache crafts all tasks for the whole training split once per *refresh* (every
`--attack_cache_epochs` epochs, with new seeds, hence new random starts), and the MID step then
spends its time on the meta update alone. What changes: within one refresh period an example sees
the same PGD random start in every epoch. The per-step held-out split is unchanged. The cache is a
deterministic function of (seed, refresh), so a resumed run rebuilds exactly the same cache.
Memory: N x T x H x W x C float32 (MNIST, 5 tasks: 0.94 GB).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mid_tf.data import Split

_REFRESH_STRIDE = 1_000_003  # keeps the crafting "steps" of different refreshes apart


def build_cache(pool, source_model, split: Split, *, batch_size: int, refresh: int, progress: bool = True) -> np.ndarray:
    """All tasks of `pool` for every example of `split`: float32 [N, T, H, W, C]."""
    craft = tf.function(lambda x, y, step: pool.craft_all(source_model, x, y, step), reduce_retracing=True)
    n = len(split)
    out = np.empty((n, pool.num_tasks, *split.images.shape[1:]), np.float32)
    bar = keras.utils.Progbar(n, unit_name="image") if progress else None
    if progress:
        print(f"attack cache: crafting {pool.num_tasks} tasks {list(pool.names)} for {n} examples "
              f"(refresh {refresh})", flush=True)
    for b, start in enumerate(range(0, n, batch_size)):
        x = tf.constant(split.images[start:start + batch_size], tf.float32) / 255.0
        y = tf.constant(split.labels[start:start + batch_size])
        step = tf.constant(refresh * _REFRESH_STRIDE + b, tf.int64)
        tasks = craft(x, y, step)  # [T, b, H, W, C]
        out[start:start + batch_size] = np.moveaxis(tasks.numpy(), 0, 1)
        if bar:
            bar.add(int(x.shape[0]))
    return out
