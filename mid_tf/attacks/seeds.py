"""Stateless attack randomness: seeds, their derivation, and the seeded random start.

Every random draw of an attack (PGD's random start, random targets, the pool's per-task seeds) comes
from stateless ops keyed by a seed (an int or an int [2] tensor), so a seeded attack is the same
eagerly, inside `tf.function` and on each replica of `strategy.run`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mid_tf.compat import cleverhans as ch_compat


def as_seed(seed) -> tf.Tensor | None:
    """None -> None; int / scalar -> [seed, 0]; [2] tensor -> as is. Returns an int64 [2] tensor."""
    if seed is None:
        return None
    s = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if s.shape.rank == 0:
        s = tf.stack([s, tf.constant(0, tf.int64)])
    return s


def fold(seed, *data) -> tf.Tensor:
    """Derives an independent stateless seed from `seed` and integers `data` (graph-safe)."""
    s = as_seed(seed)
    for d in data:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(d, tf.int64))
    return s


def seeded_lp_vector(shape, norm, eps, seed, dtype=tf.float32) -> tf.Tensor:
    """Uniform sample from the L-inf or L2 ball of radius eps (CleverHans' distribution), stateless."""
    seed = as_seed(seed)
    eps = tf.cast(eps, dtype)
    if norm == np.inf:
        return tf.random.stateless_uniform(shape, seed, -eps, eps, dtype=dtype)
    if norm != 2:
        raise ValueError(f"seeded random start supports norm inf or 2, got {norm}")
    shape = tf.convert_to_tensor(shape)
    dim = tf.reduce_prod(shape[1:])
    x = tf.random.stateless_normal(tf.stack([shape[0], dim]), fold(seed, 1), dtype=dtype)
    nrm = tf.sqrt(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True))
    w = tf.pow(tf.random.stateless_uniform(tf.stack([shape[0], 1]), fold(seed, 2), dtype=dtype),
               1.0 / tf.cast(dim, dtype))
    return eps * tf.reshape(w * x / nrm, shape)


def seeded_random_start(seed):
    """A context: within it, CleverHans PGD's random start is drawn statelessly from `seed`
    (`seeded_lp_vector`, through the patch in compat/cleverhans.py)."""
    s = as_seed(seed)

    def draw(shape, norm, eps, dtype):
        return seeded_lp_vector(shape, norm, eps, s, dtype=dtype)
    return ch_compat.random_start(draw)
