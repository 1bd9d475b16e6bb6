"""The fast CPU ops (kernels/fast_conv.py, kernels/xla.py, pooling.upsample2x) compute what the stock Keras/TF ops compute:
values, first-order and second-order gradients (the exact MID meta step differentiates gradients),
in float32 and under the mixed_bfloat16 policy; and checkpoints of the stock layers load into them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mid_tf.kernels import fast_conv, xla
from mid_tf.models import lenet
from mid_tf.models.pooling import MaxPooling2D, MaxPoolWithIndices, MaxUnpool, upsample2x


@pytest.fixture(autouse=True)
def compiled_kernels_on():
    """These tests compare the compiled kernels with the stock ops: force them on whatever this CPU's
    `auto` choice is (tests/test_fast_ops.py::test_auto_mode... checks that choice)."""
    previous = xla.configure("on")
    yield
    xla.configure(previous)


def _grads_two_orders(fn, x, variables):
    """(y, dL/dx, dL/dvars, d(|dL/dx|^2 + |dL/dvars|^2)/d(x, vars)) for L = sum(sin(fn(x)))."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = fn(x)
            loss = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)))
        gx, *gv = inner.gradient(loss, [x, *variables])
        second = tf.reduce_sum(gx ** 2) + sum(tf.reduce_sum(g ** 2) for g in gv)
    return y, gx, gv, outer.gradient(second, [x, *variables])


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_fast_conv_matches_stock_layer_to_second_order(kind, kernel):
    keras.utils.set_random_seed(kernel)
    if kind == "conv":
        fast, stock, x = (fast_conv.Conv2D(6, kernel, padding="same", activation="relu"),
                          keras.layers.Conv2D(6, kernel, padding="same", activation="relu"),
                          tf.random.stateless_normal((3, 9, 11, 1), [1, 2]))
    else:
        fast, stock, x = (fast_conv.Conv2DTranspose(1, kernel, padding="same"),
                          keras.layers.Conv2DTranspose(1, kernel, padding="same"),
                          tf.random.stateless_normal((3, 9, 11, 6), [1, 2]))
    fast(x), stock(x)
    stock.set_weights(fast.get_weights())
    a = _grads_two_orders(fast, x, fast.trainable_variables)
    b = _grads_two_orders(stock, x, stock.trainable_variables)
    for got, want in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        scale = max(1.0, float(tf.reduce_max(tf.abs(want))))
        np.testing.assert_allclose(got.numpy() / scale, want.numpy() / scale, atol=5e-5)  # float32 round-off of a different summation order


def test_fast_conv_falls_back_to_stock_for_other_shapes():
    layer = fast_conv.Conv2D(4, 3, padding="valid")  # not SAME: the stock op
    x = tf.random.uniform((2, 8, 8, 1))
    stock = keras.layers.Conv2D(4, 3, padding="valid")
    stock(x), layer(x)
    stock.set_weights(layer.get_weights())
    np.testing.assert_allclose(layer(x), stock(x), atol=1e-6)


def test_upsample2x_matches_broadcast_to_second_order():
    x = tf.random.stateless_normal((2, 4, 5, 3), [3, 4])
    mask = tf.cast(tf.random.stateless_uniform((2, 8, 10, 3), [5, 6]) > 0.5, tf.float32)

    def broadcast(z):
        return tf.reshape(tf.broadcast_to(tf.reshape(z, (-1, 4, 1, 5, 1, 3)), (2, 4, 2, 5, 2, 3)), (-1, 8, 10, 3))
    a = _grads_two_orders(lambda z: upsample2x(z) * mask, x, [])
    b = _grads_two_orders(lambda z: broadcast(z) * mask, x, [])
    for got, want in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_fast_ops_under_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        fast, stock = fast_conv.Conv2D(8, 3, padding="same"), keras.layers.Conv2D(8, 3, padding="same")
        x = tf.random.uniform((2, 10, 10, 1))
        fast(x), stock(x)
        stock.set_weights(fast.get_weights())
        with tf.GradientTape() as t:
            t.watch(x)
            y = fast(x)
            loss = tf.reduce_sum(tf.cast(upsample2x(y), tf.float32))
        assert y.dtype == tf.bfloat16
        gx = t.gradient(loss, x)
        assert gx.dtype == tf.float32 and float(tf.reduce_max(tf.abs(gx))) > 0
        np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(stock(x), tf.float32), atol=0.05)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _stock_target():
    """The target as first written (relu inside the convs, stock layers): the checkpoint format to keep."""
    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(200, activation="relu", name="fc1")(h)
    return keras.Model(x, keras.layers.Dense(10, name="logits")(h), name="target")


def test_target_pool_then_relu_equals_stock_target_and_loads_its_checkpoint(tmp_path):
    stock = _stock_target()
    path = str(tmp_path / "target.weights.h5")
    stock.save_weights(path)
    ours = lenet.build_target()
    ours.load_weights(path)  # same checkpoint layout
    x = tf.random.stateless_uniform((16, 28, 28, 1), [7, 8])
    with xla.stock_ops():  # pooling before relu is exact: same ops, same bits
        np.testing.assert_array_equal(ours(x).numpy(), stock(x).numpy())
    # The compiled 1-channel conv sums its 9 taps in another order: float32 round-off only.
    np.testing.assert_allclose(ours(x).numpy(), stock(x).numpy(), rtol=1e-5, atol=1e-6)

    def input_grad(model):
        with tf.GradientTape() as t:
            t.watch(x)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.zeros(16, tf.int32), model(x)))
        return t.gradient(loss, x).numpy()
    want = input_grad(stock)
    np.testing.assert_allclose(input_grad(ours), want, atol=1e-6 * max(1.0, np.abs(want).max()))


def _tied(shape, seed):
    """Small integers: most 2x2 windows hold tied maxima, as a constant MNIST background does."""
    return tf.cast(tf.random.stateless_uniform(shape, [seed, 1], 0, 3, dtype=tf.int32), tf.float32)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_compiled_max_pool_is_bit_identical_to_tf_with_ties(dtype):
    x = tf.cast(_tied((3, 8, 10, 5), 1), dtype)
    dy = tf.cast(tf.random.stateless_normal((3, 4, 5, 5), [2, 3]), dtype)

    def value_and_grad(pool):
        with tf.GradientTape() as t:
            t.watch(x)
            y = pool(x)
        return y, t.gradient(y, x, output_gradients=dy)
    got = value_and_grad(xla.max_pool_2x2)
    want = value_and_grad(lambda z: tf.nn.max_pool2d(z, 2, 2, "VALID"))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for g, w in zip(got, want):
        np.testing.assert_array_equal(tf.cast(g, tf.float32).numpy(), tf.cast(w, tf.float32).numpy())
    # Each window's gradient went to one position (the first maximum), not to every tied one.
    assert int(tf.math.count_nonzero(got[1])) == int(tf.math.count_nonzero(dy))


def test_compiled_max_pool_layer_matches_stock_to_second_order():
    x = _tied((2, 6, 8, 3), 4) + 0.1 * tf.random.stateless_normal((2, 6, 8, 3), [5, 6])
    scale = tf.random.stateless_normal((2, 6, 8, 3), [7, 8])
    a = _grads_two_orders(lambda z: MaxPooling2D(2)(z * scale), x, [])
    b = _grads_two_orders(lambda z: keras.layers.MaxPooling2D(2)(z * scale), x, [])
    for got, want in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_compiled_max_pool_layer_falls_back_for_odd_sizes_and_other_pools():
    for layer, shape in [(MaxPooling2D(2), (2, 7, 7, 3)), (MaxPooling2D(3), (2, 9, 9, 3)),
                         (MaxPooling2D(2, strides=1), (2, 6, 6, 3))]:
        x = tf.random.stateless_normal(shape, [9, 9])
        stock = keras.layers.MaxPooling2D(layer.pool_size, strides=layer.strides)
        np.testing.assert_array_equal(layer(x).numpy(), stock(x).numpy())


def test_max_pool_with_indices_keeps_values_gradients_and_switches():
    x = _tied((2, 8, 8, 4), 11)
    layer = MaxPoolWithIndices()

    def run():
        with tf.GradientTape() as t:
            t.watch(x)
            pooled, switches = layer(x)
            loss = tf.reduce_sum(pooled * tf.range(1.0, 5.0))
        return pooled, switches, t.gradient(loss, x)
    fast = run()
    with xla.stock_ops():
        stock = run()
    for got, want in zip(fast, stock):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def _op_types(fn, x):
    graph = tf.function(fn).get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return {op.type for op in graph.get_operations()}


def test_stock_ops_and_mode_off_turn_the_compiled_kernels_off():
    model = lenet.build_target(width=0.25)
    x = tf.zeros((2, 28, 28, 1))
    compiled = _op_types(model, x)
    assert "MaxPool" not in compiled and {"PartitionedCall", "StatefulPartitionedCall"} & compiled
    with xla.stock_ops():
        stock = _op_types(model, x)
    assert "MaxPool" in stock and not {"PartitionedCall", "StatefulPartitionedCall"} & stock
    xla.configure("off")
    assert not xla.enabled() and _op_types(model, x) == stock


def test_compiled_unpool_matches_stock_to_second_order():
    x = tf.random.stateless_normal((2, 4, 5, 3), [12, 13])
    switches = tf.cast(tf.random.stateless_uniform((2, 8, 10, 3), [14, 15]) > 0.6, tf.float32)
    layer = MaxUnpool()
    fast = _grads_two_orders(lambda z: layer(z, switches), x, [])
    with xla.stock_ops():
        stock = _grads_two_orders(lambda z: layer(z, switches), x, [])
    np.testing.assert_array_equal(fast[0].numpy(), stock[0].numpy())  # the same products
    for got, want in zip(tf.nest.flatten(fast), tf.nest.flatten(stock)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_auto_mode_uses_the_compiled_kernels_only_without_avx512(tmp_path):
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n")
    assert xla.auto_choice(str(avx2))[0] is True
    on, why = xla.auto_choice(str(avx512))
    assert on is False and "AVX-512" in why
    assert xla.configure("auto") == "on"  # the previous mode (the fixture's)
    assert xla.mode() == "auto"
    assert xla.enabled() == xla.auto_choice()[0]  # this machine's own choice
    assert ("on" if xla.enabled() else "off") in xla.describe()
    with pytest.raises(ValueError, match="auto .* on .* or off"):
        xla.configure("yes")
    assert xla.mode() == "auto"  # a refused mode changes nothing
    xla.configure("OFF")
    assert not xla.enabled() and "off" in xla.describe()


def test_the_kernel_choice_is_an_api_not_an_environment_variable():
    """`kernels.xla.configure` is the only switch: no module of the library reads the old variable."""
    import pathlib
    root = pathlib.Path(xla.__file__).resolve().parents[1]
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py") if "MID_TF_XLA_KERNELS" in p.read_text()]
    assert readers == []
