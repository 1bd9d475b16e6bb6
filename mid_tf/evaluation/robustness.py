"""Robust accuracy of a classifier under an attack, in two threat models.

  transfer   adversarials crafted on the undefended target (the paper's protocol), then classified
             by the defended pipeline; crafted once per attack and reused for every model evaluated
  white-box  adversarials crafted end to end on the pipeline that classifies them
Graph-safe attacks run compiled (`tf.function`, one trace per batch shape); eager-only ones (CW,
SPSA, ART) run as they are.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mid_tf.attacks import get_spec, make_attack


def craft(attack: str, source_fn, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500, seed: int = 0,
          progress: bool = True, first_batch: int = 0) -> np.ndarray:
    """Adversarial examples for all of `x`, crafted on `source_fn`, batch by batch; batch i is seeded
    (seed, first_batch + i)."""
    spec = get_spec(attack)
    fn = make_attack(spec)
    call = (tf.function(lambda xb, yb, s: fn(source_fn, xb, yb, seed=s), reduce_retracing=True)
            if spec.graph_safe else (lambda xb, yb, s: fn(source_fn, xb, yb, seed=s)))
    out = []
    bar = keras.utils.Progbar(len(x), unit_name="image") if progress else None
    for i, start in enumerate(range(0, len(x), batch_size)):
        xb = tf.constant(x[start:start + batch_size], tf.float32)
        yb = tf.constant(y[start:start + batch_size], tf.int64)
        seed_t = tf.constant([seed, first_batch + i], tf.int64)
        out.append(np.asarray(call(xb, yb, seed_t)))
        if bar:
            bar.add(len(xb))
    return np.concatenate(out)


def accuracy(classify_fn, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = classify_fn(tf.constant(x[start:start + batch_size], tf.float32))
        correct += int(np.sum(np.argmax(np.asarray(logits), -1) == y[start:start + batch_size]))
    return correct / max(len(x), 1)
