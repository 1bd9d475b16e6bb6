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

from mid_tf.compat import keras_distribute

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
            raise ValueError("strategy multi_worker needs the TF_CONFIG environment variable (cluster and task); "
                             "see docs/training.md, 'Multi-GPU and multi-host'")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
        keras_distribute.apply()  # Keras' fit under this strategy (compat/keras_distribute.py)
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def is_chief() -> bool:
    """True unless this process is a non-chief worker of a multi-worker cluster (it must not write outputs)."""
    cfg = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = cfg.get("task", {})
    if not task:
        return True
    return task.get("type") == "chief" or (task.get("type") == "worker" and task.get("index", 0) == 0
                                           and "chief" not in cfg.get("cluster", {}))
