"""Robust accuracy of a classifier under an attack, in two threat models.

  transfer   adversarials crafted on the undefended target (the paper's protocol), then classified
             by the defended pipeline; crafted once per attack and reused for every model evaluated
  white-box  adversarials crafted end to end on the pipeline that classifies them
Graph-safe attacks run compiled (`tf.function`, one trace per batch shape); eager-only ones (CW,
SPSA, ART) run as they are.
"""

from __future__ import annotations

import collections
import functools

import keras
import numpy as np
import tensorflow as tf

from mid_tf.attacks import get_spec, make_attack


def craft(attack: str, source_fn, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500, seed: int = 0,
          progress: bool = True, first_batch: int = 0) -> np.ndarray:
    """Adversarial examples for all of `x`, crafted on `source_fn`, batch by batch; batch i is seeded
    (seed, first_batch + i)."""
    spec = get_spec(attack)
    call = (compiled(spec, source_fn, x.shape[1:]) if spec.graph_safe
            else functools.partial(_eager, make_attack(spec), source_fn))
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


def _eager(fn, source_fn, xb, yb, seed):
    return fn(source_fn, xb, yb, seed=seed)


# Compiled attacks by (spec, source, image shape): one trace serves every craft call of an evaluation (its shards,
# its batches of any size); a trace of PGD-100 x 5 takes about a minute on a 2-core CPU.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 16


def compiled(spec, source_fn, image_shape):
    """`attack(source_fn, x, y, seed)` of a graph-safe `spec` as a tf.function traced once for any batch size."""
    key = (spec, id(source_fn), tuple(image_shape))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is source_fn:  # the source is held, so its id is not reused while cached
        _COMPILED.move_to_end(key)
        return hit[1]
    fn = make_attack(spec)
    signature = [tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int64),
                 tf.TensorSpec([2], tf.int64)]
    call = tf.function(functools.partial(_eager, fn, source_fn), input_signature=signature)
    _COMPILED[key] = (source_fn, call)
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return call


def accuracy(classify_fn, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = classify_fn(tf.constant(x[start:start + batch_size], tf.float32))
        correct += int(np.sum(np.argmax(np.asarray(logits), -1) == y[start:start + batch_size]))
    return correct / max(len(x), 1)
