"""2x2 max pooling that also returns where the maxima were, and the matching max-unpooling.

The official decoder (PyTorch `MaxUnpool2d`) puts each feature back where the encoder's max was,
so reconstruction keeps the spatial detail pooling threw away. We carry the pooling "indices" as a
0/1 switch mask at the input resolution (`x == upsample(maxpool(x))`) rather than as PyTorch's
flat int indices: the pooling itself stays TF's native `max_pool2d` (fast on CPU, with first and
second-order gradients: the MID meta step differentiates through the decoder twice), unpooling is
a broadcast and a multiply (any-order differentiable, batch-independent, valid under any
distribution strategy), and the mask carries no gradient, as indices do not. A window whose
maximum is tied between several positive entries (measure zero for real-valued activations; the
all-zero windows after ReLU unpool to zero either way) routes the value to each tied position.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from mid_tf.kernels import xla


@tf.custom_gradient
def _upsample2x_tf(x):
    """Nearest-neighbour 2x upsampling with a pooling-op gradient.

    The autodiff gradient of the broadcast formulation is a reduce_sum over two interleaved axes of
    a [B,h,2,w,2,C] tensor, which was the slowest op of the MID meta update on CPU; `4 * avg_pool`
    computes the same sums, exactly, much faster (docs/performance.md). Both ops have gradients, so
    second order (the exact MID meta step) still differentiates through it."""
    h, w = x.shape[1], x.shape[2]
    # half_pixel_centers nearest resize at exactly 2x: out[i] = in[i // 2] (faster than a broadcast).
    y = tf.image.resize(x, (2 * h, 2 * w), method="nearest")

    def grad(dy):
        return tf.nn.avg_pool2d(dy, 2, 2, "VALID") * tf.constant(4, dy.dtype)
    return tf.cast(y, x.dtype), grad


def upsample2x(x):
    """Nearest-neighbour 2x upsampling: [B,h,w,C] -> [B,2h,2w,C]."""
    _, h, w, c = x.shape
    if keras.backend.backend() == "tensorflow":
        return _upsample2x_tf(x)
    x = ops.broadcast_to(ops.reshape(x, (-1, h, 1, w, 1, c)), (ops.shape(x)[0], h, 2, w, 2, c))
    return ops.reshape(x, (-1, 2 * h, 2 * w, c))


@keras.saving.register_keras_serializable(package="mid_tf")
class MaxPooling2D(keras.layers.MaxPooling2D):
    """keras.layers.MaxPooling2D whose 2x2/stride-2 case on even H, W has the compiled, bit-identical
    gradient of `kernels.xla.max_pool_2x2` when the compiled kernels are on; otherwise stock. The
    class keeps the stock name, like kernels/fast_conv.py's layers, so saved models and weights files
    match."""

    def call(self, inputs):
        _, h, w, _ = inputs.shape
        if (xla.enabled() and tuple(self.pool_size) == (2, 2) and tuple(self.strides) == (2, 2)
                and self.padding == "valid" and self.data_format == "channels_last"
                and h is not None and w is not None and h % 2 == 0 and w % 2 == 0):
            return xla.max_pool_2x2(inputs)
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="mid_tf")
class MaxPoolWithIndices(keras.layers.Layer):
    """2x2/stride-2 max pooling returning `(pooled, switches)`; switches is a float 0/1 mask [B,H,W,C]."""

    def compute_output_spec(self, x):
        b, h, w, c = x.shape
        return (keras.KerasTensor((b, h // 2, w // 2, c), dtype=x.dtype), keras.KerasTensor(x.shape, dtype=x.dtype))

    def call(self, x):
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"MaxPoolWithIndices needs even spatial dims, got {h}x{w}")
        if xla.enabled():
            pooled = xla.max_pool_2x2(x)
            return pooled, xla.tie_switches(x, pooled)
        pooled = ops.max_pool(x, pool_size=2, strides=2, padding="valid")
        switches = ops.stop_gradient(ops.cast(ops.equal(x, upsample2x(pooled)), x.dtype))
        return pooled, switches


@keras.saving.register_keras_serializable(package="mid_tf")
class MaxUnpool(keras.layers.Layer):
    """Inverse of `MaxPoolWithIndices`: `[B,h,w,C]` values + switches -> `[B,2h,2w,C]`, zeros elsewhere.

    `use_switches=False` ignores the switches and upsamples (nearest neighbour): a decoder that depends on its
    input features alone, whose output every loss can then shape through them (switches carry no gradient)."""

    def __init__(self, use_switches: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.use_switches = use_switches

    def get_config(self):
        return {**super().get_config(), "use_switches": self.use_switches}

    def compute_output_spec(self, x, switches):
        return keras.KerasTensor(switches.shape, dtype=x.dtype)

    def call(self, x, switches):
        if not self.use_switches:
            return upsample2x(x)
        if xla.enabled():
            return xla.unpool(x, ops.stop_gradient(switches))
        return upsample2x(x) * switches
