"""Adversarial-training baselines (PGD-AT, TRADES): they train on attacks crafted on themselves."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mid_tf.models import build_models
from mid_tf.training.baselines import AdversarialTraining, _kl_rows


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1)).astype(np.float32), (np.arange(n) % 10).astype(np.int64)


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_baseline_steps_train_the_network_on_its_own_adversarials(method):
    keras.utils.set_random_seed(0)
    net = build_models("mnist", width=0.25).pgd_at
    model = AdversarialTraining(net, method, attack="pgd40:nb_iter=3,eps_iter=0.1")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    w0 = [w.copy() for w in net.get_weights()]
    x, y = _data()
    hist = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][-1])
    assert any(not np.allclose(a, b) for a, b in zip(w0, net.get_weights()))


def test_trades_adversary_maximises_the_kl_it_trains_on():
    keras.utils.set_random_seed(1)
    net = build_models("mnist", width=0.25).trades
    model = AdversarialTraining(net, "trades", attack="pgd40:nb_iter=5,eps_iter=0.1")
    x, _ = _data(16)
    x = tf.constant(x)
    clean = net(x)
    adv = model._trades_adversary(model._logits, x, clean, tf.constant([0, 1], tf.int64))
    assert float(tf.reduce_max(tf.abs(adv - x))) <= 0.3 + 1e-6
    noise = tf.clip_by_value(x + tf.random.uniform(x.shape, -0.3, 0.3, seed=3), 0, 1)
    assert float(tf.reduce_mean(_kl_rows(clean, net(adv)))) > 2 * float(tf.reduce_mean(_kl_rows(clean, net(noise))))


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_eps_warmup_scales_the_attack_ball_then_reaches_full_eps(method):
    keras.utils.set_random_seed(2)
    net = build_models("mnist", width=0.25).pgd_at
    model = AdversarialTraining(net, method, attack="pgd40:nb_iter=5,eps_iter=0.1", warmup_steps=10)
    x, y = _data(16)
    x, y, seed = tf.constant(x), tf.constant(y), tf.constant([0, 3], tf.int64)
    assert [float(model.eps_fraction(tf.constant(t, tf.int64))) for t in (0, 4, 9, 50)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0])
    dist = {t: float(tf.reduce_max(tf.abs(model.adversary(x, y, tf.constant(t, tf.int64), seed) - x)))
            for t in (0, 4, 9)}
    assert 0.02 < dist[0] <= 0.03 + 1e-6 and 0.1 < dist[4] <= 0.15 + 1e-6 and 0.2 < dist[9] <= 0.3 + 1e-6, dist
    full = AdversarialTraining(net, method, attack="pgd40:nb_iter=5,eps_iter=0.1")  # no warm-up
    assert float(full.eps_fraction(tf.constant(0, tf.int64))) == 1.0
    adv = full.adversary(x, y, tf.constant(0, tf.int64), seed)
    assert float(tf.reduce_min(adv)) >= 0.0 and float(tf.reduce_max(adv)) <= 1.0


def test_baseline_refuses_targeted_or_eager_inner_attacks():
    net = build_models("mnist", width=0.25).pgd_at
    for bad in ("pgd40_t0", "cw_l2", "mim40"):
        with pytest.raises(ValueError, match="baseline_attack"):
            AdversarialTraining(net, "pgd_at", attack=bad)
    with pytest.raises(ValueError, match="baseline must be"):
        AdversarialTraining(net, "madry", attack="pgd10")


def test_baseline_stages_run_from_the_pipeline(tmp_path, mnist_data_dir):
    from mid_tf import stages
    from mid_tf.config import BaselineConfig, DataConfig, RunConfig

    cfg = RunConfig(model_dir=str(tmp_path), data=DataConfig(data_dir=mnist_data_dir, train_examples=256,
                                                             eval_examples=200),
                    stages=("pgd_at", "trades"), width=0.25, verbose=0,
                    baseline=BaselineConfig(epochs=1, batch_size=128, attack="pgd40:nb_iter=2,eps_iter=0.15"))
    summary = stages.run(cfg)
    for method in ("pgd_at", "trades"):
        done = json.load(open(os.path.join(tmp_path, method, "done.json")))
        assert 0.0 <= done["clean_accuracy"] <= 1.0
        assert os.path.exists(os.path.join(tmp_path, method, f"{method}.weights.h5"))
        assert summary["stages"][method]["epochs"] == 1


def test_trades_stage_in_mixed_bfloat16_lands_in_the_float32_network(tmp_path, mnist_data_dir):
    """--baseline_precision=mixed_bfloat16: TRADES trains a bfloat16 twin; its weights land in the float32
    network that is saved, pgd_at (not run) keeps its initial weights, and the global policy is restored."""
    from mid_tf import artifacts, stages
    from mid_tf.config import BaselineConfig, ConfigError, DataConfig, RunConfig

    cfg = RunConfig(model_dir=str(tmp_path), data=DataConfig(data_dir=mnist_data_dir, train_examples=256,
                                                             eval_examples=200),
                    stages=("trades",), width=0.25, verbose=0,
                    baseline=BaselineConfig(epochs=1, batch_size=128, attack="pgd40:nb_iter=2,eps_iter=0.15",
                                            precision="mixed_bfloat16"))
    summary = stages.run(cfg)
    assert keras.config.dtype_policy().name == "float32"
    assert summary["stages"]["trades"]["precision"] == "mixed_bfloat16"
    assert 0.0 <= summary["stages"]["trades"]["clean_accuracy"] <= 1.0
    trained = artifacts.load_models(cfg.model_dir, ("trades",)).trades
    assert trained.compute_dtype == "float32" and all(w.dtype == np.float32 for w in trained.get_weights())
    keras.utils.set_random_seed(cfg.seed)  # as stages.run: rebuilds the initial weights
    initial = build_models("mnist", width=0.25).trades.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(trained.get_weights(), initial))  # bf16 training reached it
    with pytest.raises(ConfigError, match=r"^baseline\.precision "):
        BaselineConfig(precision="float16").validate()


def test_a_model_dir_with_a_baseline_and_no_mid_is_evaluated_on_its_own(tmp_path, mnist_data_dir):
    """Stages target, trades, eval: the report scores the target and TRADES, no MID pipeline and no
    regeneration (MID's rows come from another run of the same seed and images)."""
    from mid_tf import stages
    from mid_tf.config import BaselineConfig, DataConfig, RunConfig, StageTrainConfig

    cfg = RunConfig(model_dir=str(tmp_path), data=DataConfig(data_dir=mnist_data_dir, train_examples=256,
                                                             eval_examples=64),
                    stages=("target", "trades", "eval"), width=0.25, verbose=0,
                    target=StageTrainConfig(epochs=0, batch_size=64),
                    baseline=BaselineConfig(epochs=1, batch_size=128, attack="pgd40:nb_iter=2,eps_iter=0.15"),
                    eval_attacks=("fgsm",), eval_whitebox_attacks=("fgsm",), eval_eps_sweep=())
    summary = stages.run(cfg)
    report = json.load(open(os.path.join(tmp_path, "eval", "report.json")))
    assert report["models"] == ["target", "trades"]
    assert set(report["whitebox"]["fgsm"]) == {"target", "trades"} and report["regeneration"] == {}
    assert not os.path.exists(os.path.join(tmp_path, "mid")) and "mid" not in summary["stages"]
