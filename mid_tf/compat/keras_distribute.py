"""Lets Keras 3's `fit` run under MultiWorkerMirroredStrategy: two defects of Keras' TensorFlow
trainer (keras/src/backend/tensorflow/trainer.py), patched at run time by `apply()` (idempotent).

Each replacement keeps the upstream function as `__wrapped__`, and tests/test_compat.py checks, per
patch, that the upstream one still shows the defect: when one of those tests fails, upstream has
fixed it and the patch can go.

1. Scalar logs: reported upstream as tensorflow/tensorflow#72388 ("`tf.distribute` and `keras` 3
   incompatibility: ValueError: Invalid reduction dimension 0 for input with 0 dimensions", closed
   there as a Keras issue; no keras-team/keras issue found). `reduce_per_replica` reduces the step's
   logs with `strategy.reduce("MEAN", v, axis=0)` on a multi-worker strategy, which fails for scalar
   metrics: we reduce scalars with `axis=None` (the mean over replicas).
2. The first batch's symbolic build: no upstream issue found; symptom: `fit` never starts under
   MultiWorkerMirroredStrategy, failing with "Attempt to convert a value (PerReplica...) ... to a
   Tensor". `TensorFlowTrainer._maybe_symbolic_build` calls `strategy.reduce("MEAN", batch)` on the
   whole nested (x, y) batch, which `CollectiveAllReduceStrategy.reduce` cannot take. The build only
   needs shapes and dtypes: we use this worker's first local replica batch instead (no collective,
   the same on every worker).
"""

from __future__ import annotations

import functools

import tensorflow as tf


def _first_local(strategy, v):
    return strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v


def _symbolic_build_patch(original):
    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(lambda v: _first_local(strategy, v), batch)
                break
            with strategy.scope():
                self._symbolic_build(data_batch=data_batch)
            return
        return original(self, iterator=iterator, data_batch=data_batch)
    return _maybe_symbolic_build


def _reduce_patch(original):
    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in ("auto", "mean"):
            def _reduce(v):
                if not (isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v)):
                    return v
                local = _first_local(strategy, v)
                return strategy.reduce("MEAN", v, axis=None if local.shape.rank == 0 else 0)
            return tf.nest.map_structure(_reduce, values)
        return original(values, strategy, reduction)
    return reduce_per_replica


def apply() -> None:
    """Installs both patches once (make_strategy('multi_worker') calls it)."""
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.TensorFlowTrainer, "_mid_tf_patched", False):
        return
    trainer.TensorFlowTrainer._maybe_symbolic_build = _symbolic_build_patch(
        trainer.TensorFlowTrainer._maybe_symbolic_build)
    trainer.reduce_per_replica = _reduce_patch(trainer.reduce_per_replica)
    trainer.TensorFlowTrainer._mid_tf_patched = True
