"""Stage regen: the regeneration decoder D_s fitted to the trained student (training/regen.py), and where the
deployed regeneration D_s(E_s(x)) is used (eval report, export)."""

from __future__ import annotations

import dataclasses
import os
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from mid_tf import artifacts, stages
from mid_tf.config import ConfigError, DataConfig, MIDStageConfig, RegenConfig, RunConfig, StageTrainConfig
from mid_tf.models import build_models, build_regenerator
from mid_tf.models.factory import _global_draws_kept
from mid_tf.models.lenet import build_decoder
from mid_tf.training.regen import RegenerationTraining


def _weights(net):
    return [np.array(w) for w in net.get_weights()]


def test_the_student_decoder_starts_as_the_teacher_decoder_without_shifting_global_draws():
    state = random.getstate(), np.random.get_state()[1].copy()
    with _global_draws_kept():
        build_decoder((28, 28, 1), width=0.25)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    m = build_models("mnist", width=0.25)
    assert m.student_decoder is not m.decoder
    assert all(np.array_equal(a, b) for a, b in zip(_weights(m.student_decoder), _weights(m.decoder)))


def test_a_regen_step_trains_the_decoder_alone_and_lowers_the_l1_on_attacked_images():
    m = build_models("mnist", width=0.25)
    x = tf.random.stateless_uniform((32, 28, 28, 1), seed=(1, 2))
    y = tf.constant(np.arange(32) % 10, tf.int64)
    frozen = {n: _weights(getattr(m, n)) for n in ("student_encoder", "student_classifier", "decoder")}
    model = RegenerationTraining(m.student_encoder, m.student_classifier, m.student_decoder,
                                 attack="pgd40:nb_iter=2,eps_iter=0.15", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    first = model.train_on_batch(x, y, return_dict=True)
    for _ in range(15):
        last = model.train_on_batch(x, y, return_dict=True)
    assert last["adv_l1"] < 0.7 * first["adv_l1"] and last["l1"] < 0.7 * first["l1"]
    for name, before in frozen.items():  # E_s, C_s and D_t exactly as they were
        assert all(np.array_equal(a, b) for a, b in zip(before, _weights(getattr(m, name)))), name
    assert not all(np.array_equal(a, b) for a, b in zip(_weights(m.student_decoder), frozen["decoder"]))
    assert model(x).shape == x.shape


def test_regen_refuses_an_attack_it_cannot_run_in_the_train_step():
    m = build_models("mnist", width=0.25)
    with pytest.raises(ValueError, match="regen_attack"):
        RegenerationTraining(m.student_encoder, m.student_classifier, m.student_decoder, attack="autoattack")
    with pytest.raises(ConfigError, match="regen.attack"):
        RegenConfig(attack="no_such_attack").validate()
    with pytest.raises(ConfigError, match="regen.attack must be a graph-safe"):
        RegenConfig(attack="autoattack").validate()
    with pytest.raises(ConfigError, match="regen.epochs"):
        RegenConfig(epochs=-1).validate()


def test_the_regen_fingerprint_covers_mid_and_a_retrained_mid_discards_regen():
    cfg = RunConfig(model_dir="m")
    fp = stages.fingerprint(cfg, "regen")
    assert fp["regen.attack"] == "pgd10" and "mid.pool" in fp and "teacher.epochs" in fp
    assert "baseline.epochs" not in fp and "regen.epochs" not in stages.fingerprint(cfg, "mid")
    assert "regen" in stages.dependents("mid") and "regen" in stages.dependents("teacher")


def test_stage_regen_end_to_end_eval_and_export_use_d_s(tmp_path, mnist_data_dir):
    from mid_tf.evaluation.writers import load_report

    cfg = RunConfig(model_dir=str(tmp_path), data=DataConfig(data_dir=mnist_data_dir, train_examples=512,
                                                             eval_examples=64),
                    stages=("target", "teacher", "mid", "eval"), width=0.25, verbose=0,
                    target=StageTrainConfig(epochs=1, batch_size=64), teacher=StageTrainConfig(epochs=1, batch_size=64),
                    mid=MIDStageConfig(epochs=1, batch_size=128, steps_per_epoch=2, learning_rate=1e-3, val_examples=0,
                                       pool="clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15"),
                    regen=RegenConfig(epochs=3, batch_size=32, learning_rate=1e-2, attack="pgd40:nb_iter=2,eps_iter=0.15"),
                    eval_attacks=("fgsm",), eval_whitebox_attacks=("fgsm",), eval_eps_sweep=())
    before = stages.run(cfg)
    report = load_report(os.path.join(tmp_path, "eval", "report.json"))
    assert report["regenerator"] == "D_t(E_s(.))"
    psnr_t = report["regeneration"]["fgsm"]["psnr_db"]
    mid_before = _weights(artifacts.load_models(str(tmp_path)).student_encoder)

    after = stages.run(dataclasses.replace(cfg, stages=("regen", "eval")))
    done = after["stages"]["regen"]
    assert done["epochs"] == 3 and done["regeneration_psnr_db"] > 0
    assert os.path.isfile(artifacts.weights_path(str(tmp_path), "regen", "student_decoder"))
    report = load_report(os.path.join(tmp_path, "eval", "report.json"))
    assert report["regenerator"] == "D_s(E_s(.)), D_s from stage regen"
    assert report["regeneration"]["fgsm"]["psnr_db"] > psnr_t + 1.0  # D_s regenerates better than D_t here
    assert after["stages"]["eval"]["whitebox"] == before["stages"]["eval"]["whitebox"]  # the classifier is unchanged
    with open(os.path.join(tmp_path, "eval", "report.md")) as f:
        assert "## Robust regeneration D_s(E_s(.)), D_s from stage regen against x" in f.read()

    models = artifacts.load_models(str(tmp_path))  # loads the completed regen stage: the export's networks
    assert all(np.array_equal(a, b) for a, b in zip(mid_before, _weights(models.student_encoder)))
    x = tf.random.stateless_uniform((4, 28, 28, 1), seed=(3, 4))
    fitted = build_regenerator(models.student_encoder, models.student_decoder)(x)
    paper = build_regenerator(models.student_encoder, models.decoder)(x)
    assert not np.allclose(fitted, paper)
    from mid_tf.export.savedmodel import build_serving_module
    module = build_serving_module(models)
    served = module.regenerate(tf.cast(x, tf.float32))["image"]
    np.testing.assert_allclose(np.asarray(served), np.clip(np.asarray(fitted), 0, 1), atol=1e-5)
