"""The pixel consistency w_PC·‖D_t(E_s(x~)) − x‖₁ of the MID loss (--pixel_weight): exact meta-gradient, the
three-term loss unchanged at w_PC = 0, its target the clean x in both losses, and training that lowers it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import attack_fixtures as F
from mid_tf.attacks.pool import AttackPool
from mid_tf.config import ConfigError, MIDStageConfig
from mid_tf.models import build_models
from mid_tf.training import meta
from mid_tf.training.losses import cross_entropy, kl_divergence
from test_meta import FixedPool, _directional, _mid, _tiny_float64, float64  # noqa: F401  (float64 is a fixture)


def _three_term_loss(student_out, teacher_clean_features, labels, *, classifier, decoder, teacher_encoder,
                     weights, clean_images=None, softmax_axis=-1, kl_reduction="elementwise_mean"):
    """multi_consistency as it was before the pixel term (verbatim, `clean_images` ignored): the reference the
    default w_PC = 0 must reproduce bit for bit."""
    f = student_out["features"]
    terms = {"lc": cross_entropy(labels, classifier(f, training=False))}
    terms["ac"] = kl_divergence(teacher_clean_features, f, softmax_axis, kl_reduction)
    if weights.cc:
        regenerated = decoder([f, *student_out["indices"]], training=False)
        cyclic = teacher_encoder(regenerated, training=False)["features"]
        terms["cc"] = kl_divergence(teacher_clean_features, cyclic, softmax_axis, kl_reduction)
    else:
        terms["cc"] = tf.zeros((), terms["lc"].dtype)
    terms["pc"] = tf.zeros((), terms["lc"].dtype)  # logged as 0, as the new code does
    terms["total"] = weights.lc * terms["lc"] + weights.ac * terms["ac"] + weights.cc * terms["cc"]
    return terms


def test_pixel_term_keeps_the_second_order_gradient_exact(float64):
    """w_PC > 0 in both losses: ∇θ J still matches a central difference of J (the pattern of
    test_meta.test_outer_gradient_is_the_exact_second_order_derivative), and the term moves the gradient."""
    models, x, y = _tiny_float64(11)
    mid = _mid(models, FixedPool(), alpha=0.5, beta=1.0, meta_order=2, pixel_weight=3.0)
    g, logs, *_ = mid.meta_gradients(x, y, 0)
    assert float(logs["train_pc"]) > 0 and float(logs["test_pc"]) > 0
    g_without, *_ = _mid(models, FixedPool(), alpha=0.5, beta=1.0, meta_order=2).meta_gradients(x, y, 0)
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(g, g_without)) > 1e-4
    theta = [v.value for v in models.student_encoder.trainable_variables]
    rng = np.random.default_rng(3)
    for _ in range(2):
        d = [tf.constant(rng.standard_normal(t.shape)) for t in theta]
        eps = 1e-6
        jp = mid.meta_objective(x, y, 0, [t + eps * di for t, di in zip(theta, d)])
        jm = mid.meta_objective(x, y, 0, [t - eps * di for t, di in zip(theta, d)])
        fd = float(jp - jm) / (2 * eps)
        assert abs(_directional(g, d) - fd) <= 1e-6 * abs(fd)


@pytest.mark.parametrize("meta_order", [1, 2])
def test_zero_pixel_weight_is_the_three_term_loss_bit_for_bit(monkeypatch, meta_order):
    """The default w_PC = 0: J, every logged term and ∇θ J equal those of the loss before the pixel term."""
    keras.utils.set_random_seed(12)
    models = build_models("mnist", width=0.125)
    x, y = tf.random.uniform((8, 28, 28, 1)), tf.range(8) % 10
    assert MIDStageConfig().pixel_weight == 0.0
    mid = _mid(models, FixedPool(), alpha=0.5, meta_order=meta_order)
    g_new, logs_new, *_ = mid.meta_gradients(x, y, 0)
    monkeypatch.setattr(meta, "multi_consistency", _three_term_loss)
    g_ref, logs_ref, *_ = mid.meta_gradients(x, y, 0)
    assert set(logs_new) == set(logs_ref) and float(logs_new["train_pc"]) == float(logs_new["test_pc"]) == 0.0
    for name in logs_ref:
        assert logs_new[name].numpy() == logs_ref[name].numpy(), name
    for a, b in zip(g_new, g_ref):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_pixel_term_targets_the_clean_batch_in_both_losses(float64):
    """With α = 0 (θ' = θ) J is linear in w_PC: J(w) − J(0) = w · (k · train_pc + β · test_pc), and each term
    is the mean L1 of the regenerated *tasks* against the *clean* x (meta-train: every task of S against x)."""
    models, x, y = _tiny_float64(13)
    pool = FixedPool(held_out=1)

    def logs(w):
        return _mid(models, pool, alpha=0.0, beta=0.7, meta_order=1, pixel_weight=w).meta_gradients(x, y, 0)[1]

    base, with_pc = logs(0.0), logs(2.5)
    tasks = pool.craft_all(None, x, y, 0)
    mid = _mid(models, pool)
    l1 = [float(tf.reduce_mean(tf.abs(mid.regenerate(tasks[t]) - x))) for t in range(3)]
    np.testing.assert_allclose(float(with_pc["test_pc"]), l1[1], rtol=1e-12)
    np.testing.assert_allclose(float(with_pc["train_pc"]), (l1[0] + l1[2]) / 2, rtol=1e-12)
    np.testing.assert_allclose(float(with_pc["loss"] - base["loss"]),
                               2.5 * (2 * (l1[0] + l1[2]) / 2 + 0.7 * l1[1]), rtol=1e-10)  # k = 2, β = 0.7
    for term in ("train_lc", "train_ac", "train_cc", "test_lc", "test_ac", "test_cc"):  # independent of w_PC
        assert float(with_pc[term]) == float(base[term]), term


def test_pixel_weight_is_validated():
    MIDStageConfig(pixel_weight=0.5).validate()
    with pytest.raises(ConfigError, match=r"^mid\.pixel_weight must be >= 0"):
        MIDStageConfig(pixel_weight=-0.1).validate()


def _regeneration_l1(mid, adversarials, x) -> float:
    return float(tf.reduce_mean(tf.abs(mid.regenerate(adversarials) - x)))


def test_training_with_a_large_pixel_weight_lowers_the_regeneration_error():
    """24 MID steps with w_PC = 20 bring D_t(E_s(x~)) closer to x on FGSM adversarials of real MNIST (crafted on
    the target) than before training and than the same steps without the term (which drift away). The untrained
    decoder here bounds how close E_s alone can get, hence the modest factors."""
    x, y = F.test_batch(64)
    results = {}
    for w in (0.0, 20.0):
        keras.utils.set_random_seed(14)  # the same initial weights for both runs
        models = build_models("mnist", width=0.25)
        mid = _mid(models, AttackPool("clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15", seed=0), meta_order=1,
                   pixel_weight=w)
        fgsm = mid.pool.craft_all(models.target, tf.constant(x), tf.constant(y), 0)[1]
        before = _regeneration_l1(mid, fgsm, x)
        mid.compile(optimizer=keras.optimizers.Adam(1e-2))
        mid.fit(x, y, batch_size=16, epochs=6, verbose=0)
        results[w] = (before, _regeneration_l1(mid, fgsm, x))
    assert results[0.0][0] == results[20.0][0]  # same start
    assert results[20.0][1] < 0.8 * results[20.0][0], results
    assert results[20.0][1] < 0.7 * results[0.0][1], results


def test_pixel_term_in_mixed_bfloat16_is_a_float32_loss():
    """--mid_precision=mixed_bfloat16 (the flagfiles' auto on bfloat16 CPUs): the bfloat16 regeneration is compared
    with the float32 clean x in float32, inside the compiled step, and the student moves."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(15)
        models = build_models("mnist", width=0.125)
        mid = _mid(models, FixedPool(), pixel_weight=1.0)
        mid.compile(optimizer=keras.optimizers.Adam(1e-2))
        w0 = [w.copy() for w in models.student_encoder.get_weights()]
        x = tf.random.uniform((8, 28, 28, 1))
        logs = tf.function(lambda: mid.train_step((x, tf.range(8) % 10)))()
        for name in ("loss", "train_pc", "test_pc"):
            assert logs[name].dtype == tf.float32 and np.isfinite(float(logs[name])), name
        assert float(logs["train_pc"]) > 0 and float(logs["test_pc"]) > 0
        assert any(not np.allclose(a, b) for a, b in zip(w0, models.student_encoder.get_weights()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
