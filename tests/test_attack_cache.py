"""The attack cache of the transfer protocol: crafting order, overlap with training, failure handling."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from interrupt import Kill, KillAfter
from mid_tf.attacks.pool import AttackPool
from mid_tf.data import Split, train_stream
from mid_tf.data.pipeline import epoch_order
from mid_tf.models import build_models
from mid_tf.training.attack_cache import AttackCache, crafting_order

POOL = "clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15"


@pytest.fixture(scope="module")
def small(mnist_small):
    return Split(mnist_small[0].images[:200], mnist_small[0].labels[:200], "test")


def test_crafting_order_follows_the_first_epoch_of_the_stream(small):
    n, b = len(small), 64  # 3 batches per epoch: 8 examples per pass are left out
    order = crafting_order(n, b, seed=3, start_batch=5, steps=3)
    assert sorted(order.tolist()) == list(range(n))
    wanted = epoch_order(n, b, seed=3, start_batch=5, steps=3)
    assert len(wanted) == 3 * b
    first = list(dict.fromkeys(wanted.tolist()))  # distinct, order of first appearance
    assert order[:len(first)].tolist() == first
    # The stream's labels at batches 5..7 are those of the indices epoch_order names.
    labels = np.concatenate([y.numpy() for _, y in train_stream(small, b, seed=3, start_batch=5).take(3)])
    np.testing.assert_array_equal(labels, small.labels[wanted])


def test_overlapped_cache_equals_the_prebuilt_one_bit_for_bit(small):
    keras.utils.set_random_seed(0)
    target = build_models("mnist", width=0.25).target
    pool = AttackPool(POOL, seed=1)
    order = crafting_order(len(small), 64, seed=2, start_batch=0, steps=3)
    prebuilt = AttackCache(pool, target, small, batch_size=64, refresh=1, order=order).fill().data
    cache = AttackCache(pool, target, small, batch_size=64, refresh=1, order=order).start()
    # The stream waits for each batch's examples: what it yields is the finished cache's content.
    batches = list(train_stream(small, 64, seed=2, extra=cache).take(3))
    cache.join()
    assert cache.complete
    np.testing.assert_array_equal(cache.data, prebuilt)
    wanted = epoch_order(len(small), 64, seed=2, start_batch=0, steps=3).reshape(3, 64)
    for (x, y, tasks), idx in zip(batches, wanted):
        np.testing.assert_array_equal(tasks.numpy(), prebuilt[idx])
        np.testing.assert_array_equal(tasks.numpy()[:, 0], x.numpy())  # task 0 is the clean batch
    # The attacks moved the pixels (not a copy of the clean task), within eps.
    assert np.abs(prebuilt[:, 1] - prebuilt[:, 0]).max() == pytest.approx(0.3, abs=1e-5)
    # Another refresh draws other random starts for PGD; FGSM (no random start) is the same.
    other = AttackCache(pool, target, small, batch_size=64, refresh=2, order=order).fill().data
    np.testing.assert_array_equal(other[:, 1], prebuilt[:, 1])
    assert not np.array_equal(other[:, 2], prebuilt[:, 2])


def test_a_crafting_failure_reaches_the_training_stream(small):
    def source(x):  # breaks (at run time) on the last, smaller chunk: 200 = 3 x 64 + 8
        with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(x)[0], 64, message="source broke")]):
            return tf.zeros([tf.shape(x)[0], 10]) + 0.0 * tf.reduce_sum(x, [1, 2, 3])[:, None]

    cache = AttackCache(AttackPool("clean,fgsm", seed=0), source, small, batch_size=64, refresh=0,
                        order=np.arange(len(small))).start()
    np.testing.assert_array_equal(cache.gather(np.arange(64))[:, 0],
                                  small.images[:64].astype(np.float32) / 255.0)  # crafted before the failure
    with pytest.raises(RuntimeError, match="attack cache: crafting failed"):
        cache.gather(np.arange(192, 200))  # never crafted: raises instead of waiting forever
    with pytest.raises(RuntimeError, match="attack cache: crafting failed"):
        cache.join()
    with pytest.raises(Exception, match="crafting failed"):  # and through the tf.data stream
        for _ in train_stream(small, 64, seed=0, extra=cache).take(10):
            pass


def test_mid_stage_with_and_without_overlap_trains_the_same_student_and_resumes(tmp_path, small):
    from mid_tf.config import MIDStageConfig
    from mid_tf.training.mid_stage import train_mid

    def run(overlap, model_dir, callbacks=()):
        keras.utils.set_random_seed(4)
        models = build_models("mnist", width=0.25)
        cfg = MIDStageConfig(epochs=2, batch_size=64, learning_rate=1e-3, val_examples=0, pool=POOL,
                             attack_cache_epochs=1, attack_cache_overlap=overlap)  # 3 steps/epoch, 2 refreshes
        mid, resumed = train_mid(models, small, cfg, seed=4, model_dir=str(model_dir), checkpoint_every=100,
                                 verbose=0, callbacks=callbacks)
        return models.student_encoder.get_weights(), int(mid.optimizer.iterations.numpy()), resumed

    w_sync, steps, _ = run(False, tmp_path / "sync")
    w_overlap, steps_o, _ = run(True, tmp_path / "overlap")
    assert steps == steps_o == 6
    for a, b in zip(w_sync, w_overlap):
        np.testing.assert_array_equal(a, b)
    # Killed in the second refresh period: the resumed run rebuilds that period's cache and ends identical.
    with pytest.raises(Kill):
        run(True, tmp_path / "killed", [KillAfter(4)])
    w_resumed, steps_r, resumed = run(True, tmp_path / "killed")
    assert resumed == 3 and steps_r == 6
    for a, b in zip(w_sync, w_resumed):
        np.testing.assert_allclose(a, b, atol=1e-6)
