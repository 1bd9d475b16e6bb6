"""tf.data pipelines over in-memory splits.

Training streams are built over a shuffled, repeated *index* stream: with a fixed seed the order of
every epoch is fixed, so a resumed run can `skip` to global batch N cheaply and see exactly the
batches it would have seen had it never stopped. Pixels become float32 in [0, 1] in the pipeline.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mid_tf.data.datasets import Split


def _to_float(images):
    return tf.cast(images, tf.float32) / 255.0


def augment_batch(images, seed):
    """Standard CIFAR augmentation (He et al. 2016): a random 32x32 crop of the image zero-padded by 4 pixels
    on each side, and a random horizontal flip, per image. Stateless (`seed`: int32 [2]), so a resumed
    stream redraws exactly the crops it would have drawn."""
    shape = tf.shape(images)
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]])
    seeds = tf.random.experimental.stateless_split(seed, 2)
    crop_seeds = tf.random.experimental.stateless_split(seeds[0], shape[0])
    flip_seeds = tf.random.experimental.stateless_split(seeds[1], shape[0])

    def one(args):
        image, crop_seed, flip_seed = args
        image = tf.image.stateless_random_crop(image, tf.shape(images)[1:], crop_seed)
        return tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.map_fn(one, (padded, crop_seeds, flip_seeds), fn_output_signature=images.dtype)


def train_stream(split: Split, batch_size: int, seed: int, start_batch: int = 0, extra=None,
                 augment: bool = False) -> tf.data.Dataset:
    """Infinite stream of (image, label) batches, reshuffled each epoch, starting at `start_batch`.
    `augment`: random crops and flips (`augment_batch`), seeded by (seed, batch index).

    `extra` (an array with the split's examples on axis 0, e.g. cached adversarial tasks) is
    gathered alongside: the stream then yields (image, label, extra).
    """
    n = len(split)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples; lower --batch_size "
                         "or raise --train_examples")
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    ds = _index_batches(n, batch_size, seed, start_batch)
    if augment:
        if extra is not None:
            raise ValueError("augmentation cannot be combined with per-example extras (cached attacks)")
        ds = ds.enumerate(start_batch).map(
            lambda b, i: (augment_batch(_to_float(tf.gather(images, i)), tf.stack([seed, tf.cast(b, tf.int32)])),
                          tf.gather(labels, i)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif extra is None:
        ds = ds.map(lambda i: (_to_float(tf.gather(images, i)), tf.gather(labels, i)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif hasattr(extra, "gather"):  # filled while training runs (training/attack_cache.py): waits per batch
        def gather_extra(i):
            out = tf.numpy_function(extra.gather, [i], tf.float32, stateful=True)
            out.set_shape([batch_size, *extra.shape[1:]])
            return out
        ds = ds.map(lambda i: (_to_float(tf.gather(images, i)), tf.gather(labels, i), gather_extra(i)))
    else:
        extra = tf.constant(extra)
        ds = ds.map(lambda i: (_to_float(tf.gather(images, i)), tf.gather(labels, i), tf.gather(extra, i)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _index_batches(n: int, batch_size: int, seed: int, start_batch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    # Epochs are `n // batch_size` full batches; the stream is continuous across epochs.
    return ds.skip(start_batch * batch_size).batch(batch_size, drop_remainder=True)


def epoch_order(n: int, batch_size: int, seed: int, start_batch: int, steps: int):
    """The example indices `train_stream(..., seed, start_batch)` yields in its next `steps` batches (flat)."""
    batches = _index_batches(n, batch_size, seed, start_batch).take(steps)
    return np.concatenate([b.numpy() for b in batches]) if steps else np.zeros([0], np.int64)


def eval_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """Finite, ordered dataset of (image, label) batches, cached after the first pass."""
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels)).batch(batch_size)
    ds = ds.map(lambda x, y: (_to_float(x), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.cache().prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return max(1, len(split) // batch_size)
