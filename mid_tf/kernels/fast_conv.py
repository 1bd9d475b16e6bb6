"""Drop-in Keras convolutions with a faster gradient for single-channel images (CPU hot path).

Why: an attack step on the LeNet target is dominated not by a big convolution but by the input
gradient of the first one, `Conv2DBackpropInput` from 32 channels to the 1-channel image, a shape
oneDNN runs far below its matmul rate. Every attack step needs it, and so does the cyclic term of
the MID loss, whose gradient crosses the teacher encoder's first convolution and whose forward pass
runs the decoder's last transposed convolution (32 -> 1 channels: the same op). For a kernel with
one image channel the op is

    dx[b, i, j] = sum_{u, v} M[b, i + kh-1-u - pt, j + kw-1-v - pl, (u, v)],   M = dy @ K^T

a [B*H*W, C] x [C, kh*kw] matmul followed by kh*kw shifted adds of one-channel planes, which runs
faster (docs/performance.md). Same weights, same shapes, same maths (float round-off aside): only
the op that computes it changes.

* `Conv2D`: `keras.layers.Conv2D` whose gradient w.r.t. a 1-channel input uses the formula above;
  its forward pass is `xla.conv_one_channel` (a fused XLA loop) when the compiled kernels are on,
  and its kernel gradient TF's oneDNN op. Any other configuration is plain Conv2D.
* `Conv2DTranspose`: `keras.layers.Conv2DTranspose` whose forward pass, when it produces one
  channel, is the formula above; its gradients are the forward conv (the same fused kernel) and the
  kernel-gradient op.

Both gradients are built from differentiable TF ops, so second-order gradients (the exact MID meta
step differentiates the loss's gradient) work; tests/test_fast_ops.py checks first and second order
against the stock layers. Weights are the stock layers' (same variables, same checkpoint layout); the
classes keep the stock names on purpose: Keras names the entries of a `.weights.h5` file after the
layer's class, so checkpoints written with `keras.layers.Conv2D` load into these and back.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mid_tf.kernels import xla


def col2im_one_channel(dy, kernel):
    """sum_c dy[..., c] (x) kernel[..., 0, c] placed back on the image: the transposed SAME stride-1
    convolution to one channel. dy [B, H, W, C], kernel [kh, kw, 1, C] -> [B, H, W, 1]."""
    kh, kw, one, c = kernel.shape
    if one != 1:
        raise ValueError(f"col2im_one_channel needs a [kh, kw, 1, C] kernel, got {kernel.shape}")
    shape = tf.shape(dy)
    h, w = dy.shape[1], dy.shape[2]
    # M^T [kh*kw, B*H*W]: one contiguous plane per kernel tap (slicing a channel out of an NHWC
    # tensor instead is a strided gather, slower).
    m = tf.matmul(tf.reshape(kernel, [kh * kw, c]), tf.reshape(dy, [-1, c]), transpose_b=True)
    m = tf.reshape(m, tf.stack([kh * kw, shape[0], shape[1], shape[2]]))
    pt, pl = (kh - 1) // 2, (kw - 1) // 2  # padding before, as TF's SAME stride-1 convolution
    # dx[i] = sum_u M_u[i + pt - u]: pad each plane by (kh-1-pt) above and pt below, slice at kh-1-u.
    mp = tf.pad(m, [[0, 0], [0, 0], [kh - 1 - pt, pt], [kw - 1 - pl, pl]])
    out = None
    for u in range(kh):
        for v in range(kw):
            term = mp[u * kw + v, :, kh - 1 - u:kh - 1 - u + h, kw - 1 - v:kw - 1 - v + w]
            out = term if out is None else out + term
    return out[..., None]


_col2im_compiled = tf.function(col2im_one_channel, jit_compile=True)  # the shifted adds fused in one pass


def _col2im(dy, kernel):
    return _col2im_compiled(dy, kernel) if xla.enabled() else col2im_one_channel(dy, kernel)


def _conv_one_channel(x, kernel):
    """SAME stride-1 conv of a 1-channel x: the fused XLA kernel (xla.py), or oneDNN's conv."""
    if xla.enabled():
        return xla.conv_one_channel(x, kernel)
    return tf.nn.conv2d(x, kernel, 1, "SAME")


def _filter_grad(x, kernel_shape, dy):
    return tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=kernel_shape, out_backprop=dy,
                                           strides=[1, 1, 1, 1], padding="SAME")


def _one_channel_op(forward, adjoint, filter_grad):
    """A SAME stride-1 one-channel convolution op, linear in its input, whose input gradient is its adjoint
    op (`adjoint()`, the other op of the pair), called as a custom-gradient op so that a second-order tape
    records one op with a known gradient, not the compiled kernel's intermediates."""
    @tf.custom_gradient
    def op(h, kernel):
        def grad(dy):
            return adjoint()(dy, kernel), filter_grad(h, dy, tf.shape(kernel))
        return forward(h, kernel), grad
    return op


# tf.nn.conv2d(x, kernel, 1, 'SAME') for a 1-channel x, with the fast input gradient.
conv2d_one_channel = _one_channel_op(
    _conv_one_channel, lambda: conv2d_transpose_one_channel,
    lambda x, dy, shape: _filter_grad(x, shape, dy))
# Keras' SAME stride-1 conv_transpose of h [B,H,W,C] to one channel (kernel [kh, kw, 1, C]). It is the input
# gradient of conv(., k), so its gradients are that conv (w.r.t. h) and the filter gradient with the roles of
# input and output swapped (w.r.t. k).
conv2d_transpose_one_channel = _one_channel_op(
    _col2im, lambda: conv2d_one_channel,
    lambda h, dy, shape: _filter_grad(dy, shape, h))


def _fast_ok(layer, in_channels) -> bool:
    return (in_channels == 1 and layer.rank == 2 and layer.data_format == "channels_last"
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and layer.padding == "same" and keras.backend.backend() == "tensorflow")


@keras.saving.register_keras_serializable(package="mid_tf")
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D with the fast 1-channel input gradient (module docstring); otherwise stock."""

    def convolution_op(self, inputs, kernel):
        if _fast_ok(self, inputs.shape[-1]) and self.groups == 1:
            kernel = tf.convert_to_tensor(kernel)
            return conv2d_one_channel(tf.cast(inputs, kernel.dtype), kernel)
        return super().convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="mid_tf")
class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """Conv2DTranspose whose 1-channel output is computed by `col2im_one_channel`; otherwise stock."""

    def call(self, inputs):
        if not (_fast_ok(self, self.filters) and self.output_padding is None):
            return super().call(inputs)
        kernel = tf.convert_to_tensor(self.kernel)
        outputs = conv2d_transpose_one_channel(tf.cast(inputs, kernel.dtype), kernel)
        if self.use_bias:
            outputs = outputs + tf.cast(self.bias, outputs.dtype)
        return self.activation(outputs) if self.activation is not None else outputs
