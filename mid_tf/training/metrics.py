"""Evaluation helpers shared by the stages: accuracy and reconstruction quality."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def accuracy(logits_fn, dataset) -> float:
    """Top-1 accuracy of `logits_fn` over a finite (x, y) dataset."""
    correct = total = 0
    for x, y in dataset:
        pred = tf.argmax(logits_fn(x), axis=-1, output_type=tf.int64)
        correct += int(tf.reduce_sum(tf.cast(pred == tf.cast(y, tf.int64), tf.int32)))
        total += int(tf.shape(y)[0])
    return correct / max(total, 1)


def reconstruction_quality(image_fn, dataset) -> dict:
    """Mean per-image PSNR and SSIM (dB / [0,1]) of `image_fn(x)` clipped to [0,1] against x, and the MSE."""
    psnr, ssim, sq, n = [], [], 0.0, 0
    for x, _ in dataset:
        rec = tf.clip_by_value(image_fn(x), 0.0, 1.0)
        psnr.append(tf.image.psnr(rec, x, max_val=1.0).numpy())
        ssim.append(tf.image.ssim(rec, x, max_val=1.0).numpy())
        sq += float(tf.reduce_sum(tf.square(rec - x)))
        n += int(tf.size(x))
    psnr = np.concatenate(psnr)
    psnr = np.minimum(psnr, 100.0)  # a perfect reconstruction is inf dB; cap so the mean stays finite
    return {"psnr_db": float(psnr.mean()), "ssim": float(np.concatenate(ssim).mean()), "mse": sq / max(n, 1)}
