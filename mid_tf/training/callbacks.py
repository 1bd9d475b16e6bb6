"""Callbacks for the MID stage: per-epoch validation under attack, and TensorBoard images.

Each epoch, on a small fixed validation slice: clean accuracy of C(E_s(·)), its accuracy under each
validation attack crafted on the target (the paper's protocol; `val_<attack>_accuracy`) and under
each white-box validation attack crafted anew on the current C(E_s(·)) (`val_wb_<attack>_accuracy`),
written to TensorBoard and to the Keras logs (so the progress line shows them), plus an image grid
clean | adversarial | regenerated D_t(E_s(x~)) for the first validation attack. Each epoch's numbers
are also appended, with the wall-clock time, to `<log_dir>.jsonl` (one JSON object a line): what
benchmarks/time_to_accuracy.py reads to say when a run first reached given accuracies.
"""

from __future__ import annotations

import json
import os
import time

import keras
import tensorflow as tf


def image_grid(rows) -> tf.Tensor:
    """[n images per row] tensors [n, H, W, C] -> one image [1, rows*H, n*W, C] for tf.summary.image."""
    # float32 whatever the compute dtype (a mixed_bfloat16 decoder returns bfloat16 images)
    strips = [tf.concat(tf.unstack(tf.clip_by_value(tf.cast(r, tf.float32), 0.0, 1.0)), axis=1) for r in rows]
    return tf.concat(strips, axis=0)[None]


class AttackValidation(keras.callbacks.Callback):
    def __init__(self, x, y, attacks: dict, source_fn, log_dir: str | None, seed: int = 0, grid_images: int = 8,
                 whitebox_attacks: dict | None = None):
        super().__init__()
        self.x, self.y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        self.attacks, self.source_fn, self.seed, self.n = attacks, source_fn, seed, grid_images
        # Crafted on the fixed target: computed once, reused every epoch.
        self._adv = {name: fn(source_fn, self.x, self.y, seed=seed) for name, fn in attacks.items()}
        # White-box: crafted on the model being trained, every epoch (one compiled function per attack).
        self._whitebox = {name: tf.function(lambda x, y, fn=fn: fn(lambda z: self.model(z, training=False), x, y,
                                                                  seed=seed))
                          for name, fn in (whitebox_attacks or {}).items()}
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
        self.jsonl = log_dir.rstrip("/\\") + ".jsonl" if log_dir else None

    def _acc(self, x) -> float:
        pred = tf.argmax(self.model(x, training=False), axis=-1, output_type=tf.int64)
        return float(tf.reduce_mean(tf.cast(pred == tf.cast(self.y, tf.int64), tf.float32)))

    def on_epoch_end(self, epoch, logs=None):
        results = {"val_clean_accuracy": self._acc(self.x)}
        for name, adv in self._adv.items():
            results[f"val_{name}_accuracy"] = self._acc(adv)
        for name, craft in self._whitebox.items():
            results[f"val_wb_{name}_accuracy"] = self._acc(craft(self.x, self.y))
        if logs is not None:
            logs.update(results)
        if self.jsonl:
            os.makedirs(os.path.dirname(self.jsonl) or ".", exist_ok=True)
            with open(self.jsonl, "a") as f:  # one line per epoch: a resumed run appends
                f.write(json.dumps({"epoch": epoch + 1, "time": time.time(), "examples": int(self.x.shape[0]),
                                    **results}) + "\n")
        if self.writer is None:
            return
        with self.writer.as_default(step=epoch + 1):
            for k, v in results.items():
                tf.summary.scalar(k, v)
            if self._adv:
                name, adv = next(iter(self._adv.items()))
                rows = [self.x[: self.n], adv[: self.n], self.model.regenerate(adv[: self.n])]
                tf.summary.image(f"clean|{name}|regenerated", image_grid(rows))
        self.writer.flush()
