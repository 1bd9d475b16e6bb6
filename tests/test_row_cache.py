"""The per-example cache under ART's attacks (mid_tf/attacks/row_cache.py, art_suite._classifier).

Checks that a row seen before is never sent through the model again, that cached answers equal fresh
ones (logits, per-example loss, input gradient), that eviction and duplicates behave, and that ART's
Square attack asks the model for at most half the rows it asked for without the cache.
"""

import numpy as np
import pytest
import tensorflow as tf

import attack_fixtures as F
from mid_tf.attacks import art_suite
from mid_tf.attacks.row_cache import RowCache, row_keys


class _Counted:
    """model_fn that counts the example rows it is called on (works eagerly and under tf.function)."""

    def __init__(self, fn):
        self.fn, self.rows = fn, tf.Variable(0, dtype=tf.int64)

    def __call__(self, x):
        self.rows.assign_add(tf.cast(tf.shape(x)[0], tf.int64))
        return self.fn(x)


@pytest.fixture(scope="module")
def fn():
    return F.model_fn()


@pytest.fixture(scope="module")
def batch():
    return F.test_batch(24)


def test_row_cache_computes_each_row_once():
    seen = []

    def square(a):
        seen.append(len(a))
        return (a ** 2, a.sum(1))

    cache = RowCache(capacity=4)
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    with pytest.raises(ValueError, match="capacity"):
        RowCache(capacity=0)
    sq, sm = cache(square, a)
    np.testing.assert_array_equal(sq, a ** 2)
    np.testing.assert_array_equal(sm, a.sum(1))
    b = a.copy()
    b[3] += 1  # one new row (rows 0, 1 were dropped: capacity 4); duplicates in one call computed once
    cache(square, np.concatenate([b[2:4], b[2:4]]))
    assert seen == [6, 1] and (cache.hits, cache.misses) == (3, 7)
    assert len(cache) == 4  # least recently used dropped beyond capacity
    assert len(set(row_keys(a, np.zeros((6, 1))))) == 6 and row_keys(a[:1]) != row_keys(a[:1], np.ones((1, 1)))
    empty = cache(square, a[:0])
    assert empty[0].shape == (0, 2) and seen[-1] == 0


def test_classifier_answers_seen_rows_from_the_cache(fn, batch):
    x, y = batch
    counted = _Counted(fn)
    clf = art_suite._classifier(counted, x.shape[1:], 10)
    logits = clf.predict(x)
    np.testing.assert_allclose(logits, fn(tf.constant(x)).numpy(), atol=1e-5)
    before = int(counted.rows.numpy())
    x2 = x.copy()
    x2[3] = np.clip(x2[3] + 0.1, 0, 1)
    np.testing.assert_allclose(clf.predict(x2)[np.arange(len(x)) != 3], logits[np.arange(len(x)) != 3], atol=1e-6)
    assert int(counted.rows.numpy()) - before == 1

    onehot = np.eye(10, dtype=np.float32)[y]
    loss = clf.compute_loss(x, onehot)
    before = int(counted.rows.numpy())
    grad = clf.loss_gradient(x, y)  # the gradient at the point whose loss was just taken: no model call
    assert int(counted.rows.numpy()) == before
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ref = art_suite._ce(fn(xt), tf.constant(onehot))
        total = tf.reduce_sum(ref)
    np.testing.assert_allclose(loss, ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, tape.gradient(total, xt).numpy(), rtol=1e-4, atol=1e-6)
    other = clf.compute_loss(x, np.eye(10, dtype=np.float32)[(y + 1) % 10])  # another label: not a hit
    assert int(counted.rows.numpy()) == before + len(x) and not np.allclose(other, loss)


def test_square_needs_at_most_half_the_model_rows(fn, batch):
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

    x, y = batch
    onehot = np.eye(10, dtype=np.float32)[y]
    rows, advs = {}, {}
    for name in ("plain", "cached"):
        counted = _Counted(fn)
        if name == "plain":  # ART's own classifier: Square only predicts, which works under Keras 3
            clf = TensorFlowV2Classifier(lambda z, training=False: counted(z), nb_classes=10,
                                         input_shape=x.shape[1:], clip_values=(0.0, 1.0))
        else:
            clf = art_suite._classifier(counted, x.shape[1:], 10)
        np.random.seed(0)
        adv = SquareAttack(clf, norm=np.inf, eps=0.3, max_iter=60, p_init=0.8, nb_restarts=1,
                           batch_size=128, verbose=False).generate(x, onehot)
        assert np.abs(adv - x).max() <= 0.3 + 1e-5
        rows[name], advs[name] = int(counted.rows.numpy()), adv
    assert rows["cached"] * 2 <= rows["plain"], rows
    fooled = {k: np.argmax(fn(tf.constant(v)).numpy(), 1) != y for k, v in advs.items()}
    assert abs(int(fooled["plain"].sum()) - int(fooled["cached"].sum())) <= 1, fooled
