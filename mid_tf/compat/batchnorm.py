"""Keras' BatchNormalization with batch moments that are exact to every order of differentiation.

Upstream defect (no upstream issue found for the second-order effect): Keras 3's TensorFlow backend computes a
BatchNormalization layer's batch moments with `tf.nn.moments`, whose variance is
`mean((x - stop_gradient(mean(x)))^2)`. The stop_gradient leaves the first derivative unchanged (d var / d mean
is zero at the mean: tensorflow/tensorflow#19609 added a comment saying so), but not the second: a
Hessian-vector product through a training-mode BatchNormalization misses the terms through the mean inside the
variance. MID's exact second-order meta-gradient (`--meta_order=2`) differentiates the inner gradient, so with
the stock layer it was wrong on the ResNet family: 13% off a central difference of J at alpha = 0.05 on a
width-1/16 encoder (tests/test_rgb.py), exact with this layer.

`exact_batch_normalization(**kwargs)` is Keras' own layer whose `_moments` recomputes the moments without the
stop_gradient (in float32 for 16-bit inputs, as Keras does); inference (moving averages), the moving-average
updates and the masked path are Keras' own. The class stays `keras.layers.BatchNormalization` on purpose: Keras'
weight files key each layer by its class name, so a subclass could not load weights saved with the stock layer
(nor the other way round).
"""

from __future__ import annotations

import types

import keras
from keras import ops


def _exact_moments(layer, inputs, mask):
    if mask is not None or layer.synchronized:
        return keras.layers.BatchNormalization._moments(layer, inputs, mask)
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    x = ops.cast(inputs, "float32") if dtype in ("float16", "bfloat16") else inputs
    mean = ops.mean(x, axis=layer._reduction_axes, keepdims=True)
    variance = ops.mean(ops.square(x - mean), axis=layer._reduction_axes)
    mean = ops.squeeze(mean, axis=layer._reduction_axes)
    return ops.cast(mean, dtype), ops.cast(variance, dtype)


def exact_batch_normalization(**kwargs) -> keras.layers.BatchNormalization:
    """`keras.layers.BatchNormalization(**kwargs)` whose training-mode batch moments are twice differentiable
    exactly."""
    layer = keras.layers.BatchNormalization(**kwargs)
    object.__setattr__(layer, "_moments", types.MethodType(_exact_moments, layer))
    return layer


def has_exact_moments(layer) -> bool:
    return getattr(getattr(layer, "_moments", None), "__func__", None) is _exact_moments
