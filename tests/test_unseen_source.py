"""Transfer from a source MID never saw: the surrogate CNN (stage surrogate) and the report's transfer_unseen rows."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf

from mid_tf import artifacts, stages
from mid_tf.config import KNOWN_STAGES, DataConfig, MIDStageConfig, RunConfig, StageTrainConfig
from mid_tf.models import build_models
from mid_tf.models.surrogate import build_surrogate

PGD = "pgd40:nb_iter=5,eps_iter=0.1"


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_surrogate_builds_for_any_input_shape_from_its_seed_alone(shape):
    state = random.getstate()
    net = build_surrogate(shape, 10, width=0.25, seed=1000)
    assert random.getstate() == state  # no draw from the global stream: the other networks keep their weights
    assert net(tf.zeros((2, *shape))).shape == (2, 10)
    again, other = build_surrogate(shape, 10, width=0.25, seed=1000), build_surrogate(shape, 10, width=0.25, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(net.get_weights(), again.get_weights()))
    assert not np.allclose(net.get_weights()[0], other.get_weights()[0])


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_the_surrogate_is_another_architecture_than_the_target(dataset):
    m = build_models(dataset, width=0.125, surrogate_seed=1000)
    assert [w.shape for w in m.surrogate.weights] != [w.shape for w in m.target.weights]
    assert m.surrogate(tf.zeros((1, *m.input_shape))).shape == (1, m.num_classes)


def test_surrogate_stage_seed_and_fingerprint():
    cfg = RunConfig(model_dir="m", seed=3)
    assert cfg.surrogate_seed == 1003
    fp = stages.fingerprint(cfg, "surrogate")
    assert fp["surrogate.epochs"] == cfg.surrogate.epochs and fp["seed"] == 3 and fp["width"] == 1.0
    assert "target.epochs" not in fp and "surrogate.reconstruction_weight" not in fp
    assert KNOWN_STAGES.index("mid") < KNOWN_STAGES.index("surrogate") < KNOWN_STAGES.index("regen") < KNOWN_STAGES.index("eval")
    assert stages.dependents("surrogate") == () and artifacts.STAGE_NETWORKS["surrogate"] == ("surrogate",)


def _tiny_run(model_dir, data_dir) -> RunConfig:
    return RunConfig(model_dir=str(model_dir), data=DataConfig(data_dir=data_dir, train_examples=768, eval_examples=64),
                     stages=("target", "teacher", "surrogate", "mid", "eval"), width=0.25, verbose=0,
                     target=StageTrainConfig(epochs=1, batch_size=64), teacher=StageTrainConfig(epochs=1, batch_size=64),
                     surrogate=StageTrainConfig(epochs=3, batch_size=64),
                     mid=MIDStageConfig(epochs=1, batch_size=128, steps_per_epoch=2, learning_rate=1e-3, val_examples=0,
                                        pool="clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15"),
                     eval_attacks=("fgsm", PGD), eval_whitebox_attacks=("fgsm",), eval_eps_sweep=())


def test_eval_reports_attacks_crafted_on_the_unseen_source_for_every_model(tmp_path, mnist_data_dir, monkeypatch):
    from mid_tf.evaluation import pieces
    from mid_tf.evaluation.robustness import accuracy, craft
    from mid_tf.evaluation.writers import load_report, validate_report

    cfg = _tiny_run(tmp_path, mnist_data_dir)
    summary = stages.run(cfg)
    report = load_report(os.path.join(tmp_path, "eval", "report.json"))
    assert report["models"] == ["target", "mid"]
    assert set(report["transfer_unseen"]) == {"fgsm", "pgd40"} == set(report["transfer"])
    assert all(set(row) == {"target", "mid"} for row in report["transfer_unseen"].values())
    source = report["unseen_source"]
    assert source["name"] == "surrogate" and source["label"] == "surrogate CNN, seed+1000"
    assert summary["stages"]["surrogate"]["seed"] == 1000
    assert source["clean"] == pytest.approx(summary["stages"]["surrogate"]["clean_accuracy"])
    assert source["accuracy"]["pgd40"] <= 0.1 < source["clean"]  # white-box where it was crafted
    assert set(report["summary"]["transfer_unseen"]) == {"target", "mid"}

    # The rows were crafted on the surrogate (not the target's weights): crafting again on it gives them.
    models = artifacts.load_models(str(tmp_path), stages=("target", "surrogate"))
    assert len(models.surrogate.weights) != len(models.target.weights)
    x, y = _test_set(mnist_data_dir)
    adv = craft(PGD, lambda z: models.surrogate(z, training=False), x, y, batch_size=500, seed=cfg.seed,
                progress=False)
    assert abs(accuracy(lambda z: models.target(z, training=False), adv, y)
               - report["transfer_unseen"]["pgd40"]["target"]) <= 1 / 64

    with open(os.path.join(tmp_path, "eval", "report.md")) as f:
        md = f.read()
    assert "## Transfer (unseen source: surrogate CNN, seed+1000)" in md and "surrogate (source)" in md
    assert md.index("## Transfer (crafted on the target") < md.index("## Transfer (unseen source")
    assert os.path.getsize(os.path.join(tmp_path, "eval", "robust_accuracy_transfer_unseen.png")) > 100
    eval_entry = summary["stages"]["eval"]
    assert eval_entry["transfer_unseen"] == report["transfer_unseen"]
    assert eval_entry["unseen_source"] == "surrogate CNN, seed+1000"
    with open(os.path.join(tmp_path, "eval", "memo.json")) as f:
        keys = [json.loads(k) for k in json.load(f)]
    assert sum(k[0] == "transfer_unseen" and "surrogate" in k for k in keys) == 2  # the source is in the key

    # An eval-only rerun loads the surrogate from disk and takes its rows from the memo.
    monkeypatch.setattr(pieces, "_craft_unseen", _never)
    again = stages.run(dataclasses.replace(cfg, stages=("eval",)))
    assert again["stages"]["eval"]["transfer_unseen"] == report["transfer_unseen"]
    broken = dict(report)
    del broken["unseen_source"]
    with pytest.raises(ValueError, match="unseen_source"):
        validate_report(broken)


def _never(*_):
    raise AssertionError("crafted again although the memo holds the piece")


def _test_set(data_dir):
    """The eval stage's 64 test images as it scores them (float 0..1) and their labels."""
    from mid_tf.data import load_split
    split = load_split("mnist", "test", data_dir, limit=64)
    x = split.images.astype(np.float32) / 255.0 if split.images.dtype == np.uint8 else split.images
    return x.astype(np.float32), np.asarray(split.labels).astype(np.int64)
