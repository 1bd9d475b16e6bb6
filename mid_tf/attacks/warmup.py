"""eps warm-up shared by the MID pool (`AttackPool.craft_step`) and the adversarial-training baselines.

At optimizer step t an attack works in the ball of radius r·eps around x, r = min(1, (t + 1) / warm-up steps):
it runs on z ↦ model(x + r(z − x)) (its ball and steps scaled by r) and its result is x + r(z − x).
Started at full eps, a randomly initialised network attacked from step 0 may not learn at all (PGD-AT
does not, training/baselines.py).
"""

from __future__ import annotations

import tensorflow as tf


def eps_fraction(step, warmup_steps: int):
    """r at optimizer step `step` (float32 scalar; 1 without warm-up)."""
    if warmup_steps <= 0:
        return tf.constant(1.0)
    return tf.minimum(1.0, tf.cast(step + 1, tf.float32) / float(warmup_steps))


def shrink(x, z, r):
    """x + r (z − x): `z` pulled toward `x` by the warm-up fraction `r`."""
    return x + r * (z - x)
