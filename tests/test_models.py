"""Model contracts: shapes, dtypes, composition, pooling indices routing the decoder."""

import numpy as np
import pytest
import tensorflow as tf

from mid_tf.models import build_autoencoder, build_models, build_pipeline, build_regenerator, decode, encode
from mid_tf.models.pooling import MaxPoolWithIndices, MaxUnpool


@pytest.mark.parametrize("dataset,width,feat", [("mnist", 1.0, (7, 7, 64)), ("mnist", 0.25, (7, 7, 16)),
                                                ("cifar10", 0.125, (4, 4, 64))])
def test_shapes_and_dtypes(dataset, width, feat):
    m = build_models(dataset, width=width)
    x = tf.random.uniform((3, *m.input_shape))
    assert m.target(x).shape == (3, 10) and m.target(x).dtype == tf.float32
    for enc in (m.teacher_encoder, m.student_encoder):
        f, idx = encode(enc, x)
        assert f.shape == (3, *feat) and f.dtype == tf.float32
        assert all(i.dtype == tf.float32 for i in idx)  # pooling switches (0/1 masks)
        assert len(idx) == (2 if dataset == "mnist" else 0)
    f, idx = encode(m.teacher_encoder, x)
    assert decode(m.decoder, f, idx).shape == x.shape
    assert m.classifier(f).shape == (3, 10)
    # Student has the teacher encoder's architecture but its own weights.
    assert [w.shape for w in m.student_encoder.weights] == [w.shape for w in m.teacher_encoder.weights]
    assert not np.allclose(m.student_encoder.weights[0].numpy(), m.teacher_encoder.weights[0].numpy())


def test_composed_pipelines_equal_manual_composition():
    m = build_models("mnist", width=0.5)
    x = tf.random.uniform((4, 28, 28, 1))
    f, idx = encode(m.student_encoder, x)
    np.testing.assert_allclose(build_pipeline(m.student_encoder, m.classifier)(x), m.classifier(f), atol=1e-6)
    np.testing.assert_allclose(build_regenerator(m.student_encoder, m.decoder)(x), decode(m.decoder, f, idx),
                               atol=1e-6)
    out = build_autoencoder(m.teacher_encoder, m.decoder, m.classifier)(x)
    assert set(out) == {"logits", "reconstruction"}


def test_pool_matches_maxpool_and_unpool_inverts_on_maxima():
    x = tf.random.normal((2, 8, 6, 3))
    pooled, idx = MaxPoolWithIndices()(x)
    np.testing.assert_allclose(pooled, tf.nn.max_pool2d(x, 2, 2, "VALID"), atol=0)
    assert idx.shape == x.shape and set(np.unique(idx.numpy())) == {0.0, 1.0}
    # one switch per 2x2 window for real-valued inputs (no ties)
    np.testing.assert_array_equal(tf.nn.avg_pool2d(idx, 2, 2, "VALID").numpy() * 4, np.ones(pooled.shape))
    up = MaxUnpool()(pooled, idx)
    nz = up.numpy() != 0
    assert nz.sum() == pooled.numpy().size  # exactly one entry per window survives ...
    np.testing.assert_allclose(up.numpy()[nz], x.numpy()[nz])  # ... at the position of the max


def test_pooling_indices_route_the_decoder():
    m = build_models("mnist", width=0.25)
    x1, x2 = tf.random.uniform((2, 28, 28, 1)), tf.random.uniform((2, 28, 28, 1))
    f1, idx1 = encode(m.teacher_encoder, x1)
    _, idx2 = encode(m.teacher_encoder, x2)
    same = decode(m.decoder, f1, idx1)
    routed = decode(m.decoder, f1, idx2)  # same features, other indices -> other image
    assert float(tf.reduce_max(tf.abs(same - routed))) > 1e-3


def test_switches_carry_no_gradient_and_second_order_gradients_exist():
    x = tf.random.normal((1, 4, 4, 2))
    with tf.GradientTape() as tape:
        tape.watch(x)
        _, switches = MaxPoolWithIndices()(x)
        s = tf.reduce_sum(switches * x)
    g = tape.gradient(s, x)  # only through the explicit `* x`, not through the switches
    np.testing.assert_allclose(g, switches)
    m = build_models("mnist", width=0.25)
    x = tf.random.uniform((2, 28, 28, 1))
    w = m.teacher_encoder.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            f, idx = encode(m.teacher_encoder, x)
            loss = tf.reduce_sum(tf.square(decode(m.decoder, f, idx)))
        g = inner.gradient(loss, w)
        gnorm = tf.add_n([tf.reduce_sum(gi * gi) for gi in g])
    hg = outer.gradient(gnorm, w)
    assert all(h is not None for h in hg)
    assert any(float(tf.reduce_max(tf.abs(h))) > 0 for h in hg)


def test_unknown_dataset_family():
    with pytest.raises(ValueError, match="no model family"):
        build_models("imagenet")


def test_a_nearest_decoder_ignores_the_switches_and_keeps_the_weights_shapes():
    m, official = build_models("mnist", width=0.25, decoder_unpool="nearest"), build_models("mnist", width=0.25)
    assert m.decoder_unpool == "nearest" and official.decoder_unpool == "switches"
    x1, x2 = tf.random.uniform((2, 28, 28, 1)), tf.random.uniform((2, 28, 28, 1))
    f1, idx1 = encode(m.teacher_encoder, x1)
    _, idx2 = encode(m.teacher_encoder, x2)
    for decoder in (m.decoder, m.student_decoder):  # D_t and D_s alike
        np.testing.assert_array_equal(decode(decoder, f1, idx1), decode(decoder, f1, idx2))
    # The same weights as the official decoder (checkpoints of either load into the other's shapes) ...
    assert [w.shape for w in m.decoder.weights] == [w.shape for w in official.decoder.weights]
    official.decoder.set_weights(m.decoder.get_weights())
    # ... but another function: each feature fills its whole 2x2 window instead of the max's position.
    assert float(tf.reduce_max(tf.abs(decode(official.decoder, f1, idx1) - decode(m.decoder, f1, idx1)))) > 1e-3
    # The pixel term trains the features through it.
    with tf.GradientTape() as tape:
        tape.watch(f1)
        total = tf.reduce_sum(decode(m.decoder, f1, idx1))
    assert float(tf.reduce_max(tf.abs(tape.gradient(total, f1)))) > 0
    with pytest.raises(ValueError, match="LeNet family"):
        build_models("cifar10", width=0.125, decoder_unpool="nearest")


def test_a_bfloat16_twin_keeps_the_decoders_unpooling():
    from mid_tf.training import precision
    m = build_models("mnist", width=0.25, decoder_unpool="nearest")
    twin = precision.mixed_twin(m, "mnist", 0.25, "mixed_bfloat16")
    assert twin.decoder_unpool == "nearest"
    f, idx = encode(m.teacher_encoder, tf.random.uniform((2, 28, 28, 1)))
    _, other = encode(m.teacher_encoder, tf.random.uniform((2, 28, 28, 1)))
    np.testing.assert_array_equal(decode(twin.decoder, f, idx), decode(twin.decoder, f, other))
