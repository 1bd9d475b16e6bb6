"""Small XLA-compiled kernels for the LeNet hot path on CPU, and the switch that picks them.

Why: on CPUs without AVX-512, TF's `MaxPoolGrad` and the 1-channel first convolution (which oneDNN
runs far below the matmul rate) dominate an attack step on the LeNet target. Both are memory-bound
elementwise work that XLA fuses into one pass over the data, so each is a
`tf.function(jit_compile=True)` that the surrounding (non-XLA) graph calls:

* `max_pool_2x2(x)`: 2x2/stride-2 max pooling whose forward pass also records each window's
  argmax (int8) and whose gradient routes dy there in one fused write. The argmax is the *first*
  maximum in row-major order, TF's tie rule, so values and gradients are bit-identical to MaxPool /
  `MaxPoolGrad` (ties are everywhere: a constant MNIST background gives equal conv outputs).
* `conv_one_channel(x, kernel)`: SAME stride-1 convolution of a 1-channel image as kh*kw shifted,
  scaled copies summed in one fused loop. Same maths, a different summation order (float32
  round-off on [0, 1] images).
* `tie_switches` / `unpool`: the encoder's unpooling switches and the decoder's max-unpooling as
  single passes (same values).

Their gradients are custom-gradient ops too (pooling: routing and gathering at the argmax, each the
other's transpose; convolution: see fast_conv.py), so the second-order MID meta step differentiates
them without a tape recording the compiled functions' full-resolution intermediates.

Where they pay off depends on the CPU: with AVX-512, oneDNN's own pooling and convolution were
measured faster (docs/performance.md). `configure(mode)` sets the choice for the process:
`auto` (the default) uses them only where the CPU lacks AVX-512 (`avx512f` not in /proc/cpuinfo),
`on` forces them, `off` turns them off (debugging, or a platform whose XLA misbehaves). The apps
call it from their `--xla_kernels` flag.

`stock_ops()` makes the layers trace TF's stock ops whatever the setting. The SavedModel export uses
it: the served graph then holds only standard kernels (no `_XlaMustCompile` functions for TF Serving
to JIT). `compiled_ops()` forces the compiled ones within a block (benchmarks compare both).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import keras
import tensorflow as tf

from mid_tf import hardware

MODES = ("auto", "on", "off")
_mode = "auto"
_state = threading.local()


def configure(mode: str) -> str:
    """Sets which kernels layers trace from now on in this process: auto | on | off. Returns the
    previous mode (so a caller can restore it). Layers read the choice when they are traced."""
    global _mode
    value = str(mode).strip().lower()
    if value not in MODES:
        raise ValueError(f"xla kernels mode {mode!r} is not valid: use auto (compiled kernels only on CPUs "
                         "without AVX-512), on (always) or off (never)")
    previous, _mode = _mode, value
    return previous


def mode() -> str:
    """The mode set by `configure` (auto until then)."""
    return _mode


def auto_choice(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """(use the compiled kernels, why) for mode `auto`: on unless the CPU has AVX-512."""
    if "avx512f" in hardware.cpu_flags(cpuinfo):
        return False, "the CPU has AVX-512: oneDNN's stock pooling and convolution measured faster there"
    return True, "no AVX-512 on this CPU: the compiled pooling and 1-channel convolution measured faster"


@functools.lru_cache(maxsize=None)
def _auto() -> bool:
    return auto_choice()[0]


def enabled() -> bool:
    """True when layers should use these kernels (read at trace time)."""
    if getattr(_state, "stock_depth", 0) > 0 or keras.backend.backend() != "tensorflow":
        return False
    if getattr(_state, "compiled_depth", 0) > 0:
        return True
    return _mode == "on" or (_mode == "auto" and _auto())


def describe() -> str:
    """One line for logs and benchmarks: which kernels layers trace here, and why."""
    if _mode != "auto":
        return f"compiled CPU kernels {_mode} (xla kernels mode {_mode})"
    on, why = auto_choice()
    return f"compiled CPU kernels {'on' if on else 'off'} (xla kernels mode auto: {why})"


@contextlib.contextmanager
def compiled_ops():
    """Within this block, layers trace the compiled kernels whatever the mode (benchmarks compare both);
    an enclosing or nested `stock_ops()` still wins."""
    _state.compiled_depth = getattr(_state, "compiled_depth", 0) + 1
    try:
        yield
    finally:
        _state.compiled_depth -= 1


@contextlib.contextmanager
def stock_ops():
    """Within this block, layers trace TF's stock ops (e.g. for a portable SavedModel)."""
    _state.stock_depth = getattr(_state, "stock_depth", 0) + 1
    try:
        yield
    finally:
        _state.stock_depth -= 1


@tf.function(jit_compile=True)
def pool_2x2_with_argmax(x):
    """(max_pool2d(x, 2, 2, 'VALID'), window argmax) for x [B, H, W, C] with H, W even, in one pass.

    The argmax (int8 in 0..3, row-major in the 2x2 window) is the *first* position equal to the
    window's maximum: TF's tie rule, so the gradient routed by it is bit-identical to MaxPoolGrad."""
    _, h, w, c = x.shape
    x6 = tf.reshape(x, [-1, h // 2, 2, w // 2, 2, c])
    a, b = x6[:, :, 0, :, 0, :], x6[:, :, 0, :, 1, :]
    d, e = x6[:, :, 1, :, 0, :], x6[:, :, 1, :, 1, :]
    top = tf.maximum(tf.maximum(a, b), tf.maximum(d, e))
    first = tf.where(tf.equal(a, top), 0, tf.where(tf.equal(b, top), 1, tf.where(tf.equal(d, top), 2, 3)))
    return top, tf.cast(first, tf.int8)


_POSITION = [1, 1, 2, 1, 2, 1]  # where the window's row-major index 0..3 lives in [B, h, 2, w, 2, C]


def _at_argmax(argmax):
    """[B, h, 2, w, 2, C] bool: True at each window's argmax."""
    return tf.equal(argmax[:, :, None, :, None, :], tf.reshape(tf.constant([0, 1, 2, 3], tf.int8), _POSITION))


@tf.function(jit_compile=True)
def _route(argmax, dy):
    _, h, w, c = dy.shape
    dx = tf.where(_at_argmax(argmax), dy[:, :, None, :, None, :], tf.zeros([], dy.dtype))  # [B, h, 2, w, 2, C]
    return tf.reshape(dx, [-1, 2 * h, 2 * w, c])


@tf.function(jit_compile=True)
def _gather(argmax, dx):
    _, h, w, c = argmax.shape
    dx6 = tf.reshape(dx, [-1, h, 2, w, 2, c])
    return tf.reduce_sum(tf.where(_at_argmax(argmax), dx6, tf.zeros([], dx.dtype)), axis=[2, 4])


# The two linear maps below are each other's transpose, so each is the other's gradient. Wrapping the
# compiled functions in custom gradients keeps a second-order tape (the exact MID meta step) from
# recording their insides, which would make it save their full-resolution intermediates.
@tf.custom_gradient
def route_to_argmax(argmax, dy):
    """dx [B, 2h, 2w, C]: each dy [B, h, w, C] placed at its window's argmax, zeros elsewhere."""
    def grad(ddx):
        return None, gather_at_argmax(argmax, ddx)
    return _route(argmax, dy), grad


@tf.custom_gradient
def gather_at_argmax(argmax, dx):
    """[B, h, w, C]: dx [B, 2h, 2w, C] read at each window's argmax (the transpose of route_to_argmax)."""
    def grad(ddy):
        return None, route_to_argmax(argmax, ddy)
    return _gather(argmax, dx), grad


@tf.custom_gradient
def max_pool_2x2(x):
    """`tf.nn.max_pool2d(x, 2, 2, 'VALID')` for even H, W; forward and gradient are compiled kernels."""
    y, argmax = pool_2x2_with_argmax(x)

    def grad(dy):
        return route_to_argmax(argmax, dy)
    return y, grad


@tf.function(jit_compile=True)
def _tie_switches(x, pooled):
    _, h, w, c = x.shape
    x6 = tf.reshape(x, [-1, h // 2, 2, w // 2, 2, c])
    return tf.reshape(tf.cast(tf.equal(x6, pooled[:, :, None, :, None, :]), x.dtype), [-1, h, w, c])


def tie_switches(x, pooled):
    """`cast(x == upsample2x(pooled))` in one pass: the 0/1 unpooling switches of MaxPoolWithIndices,
    every tied maximum marked (the encoder's documented rule), carrying no gradient."""
    # Inputs cut from the tape, so no tape records the compiled call (it would keep its intermediates).
    return _tie_switches(tf.stop_gradient(x), tf.stop_gradient(pooled))


@tf.function(jit_compile=True)
def _unpool(h, switches):
    _, hh, ww, c = h.shape
    s6 = tf.reshape(switches, [-1, hh, 2, ww, 2, c])
    return tf.reshape(h[:, :, None, :, None, :] * s6, [-1, 2 * hh, 2 * ww, c])


@tf.function(jit_compile=True)
def _unpool_transpose(dy, switches):
    _, h2, w2, c = dy.shape
    shape6 = [-1, h2 // 2, 2, w2 // 2, 2, c]
    return tf.reduce_sum(tf.reshape(dy, shape6) * tf.reshape(switches, shape6), axis=[2, 4])


@tf.custom_gradient
def unpool(h, switches):
    """`upsample2x(h) * switches` (max-unpooling, [B, h, w, C] -> [B, 2h, 2w, C]) in one pass. The
    switches are constants here (MaxPoolWithIndices stops their gradient), so they get none."""
    def grad(dy):
        return unpool_transpose(dy, switches), None
    return _unpool(h, switches), grad


@tf.custom_gradient
def unpool_transpose(dy, switches):
    """The transpose of `unpool`: each window's sum of dy * switches, [B, 2h, 2w, C] -> [B, h, w, C]."""
    def grad(ddh):
        return unpool(ddh, switches), None
    return _unpool_transpose(dy, switches), grad


@tf.function(jit_compile=True)
def conv_one_channel(x, kernel):
    """tf.nn.conv2d(x, kernel, 1, 'SAME') for x [B, H, W, 1], kernel [kh, kw, 1, C]: shifted planes, fused."""
    kh, kw, _, _ = kernel.shape
    h, w = x.shape[1], x.shape[2]
    pt, pl = (kh - 1) // 2, (kw - 1) // 2  # TF's SAME padding before, for stride 1
    xp = tf.pad(x, [[0, 0], [pt, kh - 1 - pt], [pl, kw - 1 - pl], [0, 0]])
    out = None
    for u in range(kh):
        for v in range(kw):
            term = xp[:, u:u + h, v:v + w, :] * kernel[u, v, 0, :]
            out = term if out is None else out + term
    return out
