"""Distribution strategies by name: default | mirrored | multi_worker.

  default       tf.distribute's default (no-op) strategy: one device
  mirrored      MirroredStrategy over the local GPUs (or the logical CPUs configured before TF starts,
                see `configure_logical_cpus`), synchronous all-reduce
  multi_worker  MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment variable
Every network and optimizer must be built inside `strategy.scope()` (stages.run does so); the MID
train_step scales its loss by 1/replicas inside the tape (see training/meta.py).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def configure_logical_cpus(n: int) -> None:
    """Splits the CPU into `n` logical devices (must run before TensorFlow initialises its devices)."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        cross = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task); "
                             "see README, 'Multi-GPU and multi-host'")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
        _patch_keras_symbolic_build()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy must be one of {STRATEGIES}, got {name!r}")


def _patch_keras_symbolic_build() -> None:
    """Two Keras 3.15 defects keep `fit` from running under MultiWorkerMirroredStrategy; we patch both.

    1. `TensorFlowTrainer.make_train_function` reduces the step's logs with
       `strategy.reduce("MEAN", v, axis=0)`, which fails for scalar metrics ("Invalid reduction
       dimension 0 for input with 0 dimensions"): we reduce scalars with `axis=None` (mean over replicas).
    2. Keras 3.15's `TensorFlowTrainer._maybe_symbolic_build` calls `strategy.reduce("MEAN", batch)` on
    the whole (x, y) batch of the first step. `CollectiveAllReduceStrategy.reduce` cannot take a nested
    structure and fails with "Attempt to convert a value (PerReplica...) ... to a Tensor", so `fit`
    never starts under MultiWorkerMirroredStrategy. The build only needs shapes and dtypes: use this
    worker's first local replica batch instead (no collective, the same on every worker).
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.TensorFlowTrainer, "_mid_tf_patched", False):
        return
    original = trainer.TensorFlowTrainer._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
            with strategy.scope():
                self._symbolic_build(data_batch=data_batch)
            return
        return original(self, iterator=iterator, data_batch=data_batch)

    original_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in ("auto", "mean"):
            def _reduce(v):
                if not (isinstance(v, tf.distribute.DistributedValues) or tf.is_tensor(v)):
                    return v
                local = strategy.experimental_local_results(v)[0] if isinstance(
                    v, tf.distribute.DistributedValues) else v
                return strategy.reduce("MEAN", v, axis=None if local.shape.rank == 0 else 0)
            return tf.nest.map_structure(_reduce, values)
        return original_reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._mid_tf_patched = True


def is_chief() -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster (it must not write outputs)."""
    cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = cfg.get("task", {})
    if not task:
        return True
    return task.get("type") == "chief" or (task.get("type") == "worker" and task.get("index", 0) == 0
                                           and "chief" not in cfg.get("cluster", {}))
