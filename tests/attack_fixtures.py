"""Shared, cached helpers for the attack tests: a tiny LeNet trained on real MNIST.

Not a conftest (tests/conftest.py belongs to the lead): the test modules wrap these in their own
session fixtures; `functools.cache` makes the model train once per process.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from mid_tf.data.datasets import load_split
from mid_tf.models.factory import build_models

from conftest import mnist_dir  # noqa: E402  (tests/ is on sys.path under pytest)

DATA_DIR = mnist_dir()


def train_target(width: float = 0.25, train_examples: int = 8000, epochs: int = 1, seed: int = 0,
                 data_dir: str = DATA_DIR) -> keras.Model:
    """An undefended LeNet target trained briefly on real MNIST (clean test accuracy ~0.9+)."""
    keras.utils.set_random_seed(seed)
    split = load_split("mnist", "train", data_dir, limit=train_examples)
    x = split.images.astype(np.float32) / 255.0
    model = build_models("mnist", width=width).target
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, split.labels, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    return model


@functools.cache
def tiny_target() -> keras.Model:
    return train_target()


# The 100-step restart attacks with 10 steps (same code: restarts, margin loss) for tests that run every
# registered attack: 100 unrolled steps x 5 restarts took 75-100 s each to trace and run on a 2-core CPU.
FEWER_STEPS = {"pgd100x5": "nb_iter=10,eps_iter=0.04", "pgd100x5_margin": "nb_iter=10,eps_iter=0.04"}


@functools.cache
def test_batch(n: int = 128):
    """The first `n` MNIST test images (float32 [0,1]) and labels (int64)."""
    split = load_split("mnist", "test", DATA_DIR, limit=n)
    return split.images.astype(np.float32) / 255.0, split.labels.astype(np.int64)


@functools.cache
def model_fn():
    """One stable callable per process (CleverHans' compute_gradient retraces per callable)."""
    model = tiny_target()
    return lambda z: model(z, training=False)


def accuracy(fn, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(fn(tf.constant(x))), -1) == y))
