"""The switch probe (evaluation/switches.py, cli/switch_probe.py): regeneration PSNR split into features and
pooling switches."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from mid_tf.evaluation import switches
from mid_tf.models import build_models, build_regenerator
from mid_tf.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 28, 28, 1)).astype("float32")
    x_adv = np.clip(x + rng.uniform(-0.3, 0.3, size=x.shape), 0, 1).astype("float32")
    return x, [(x[:4], x_adv[:4]), (x[4:], x_adv[4:])]


def test_the_rows_pair_features_and_switches_and_the_teachers_row_is_its_autoencoder():
    m = build_models("mnist", width=0.25)
    x, batches = _batches()
    rows = switches.switch_ablation(m, batches)
    assert [r["row"] for r in rows] == [switches.label(r) for r in switches.ROWS] and len(rows) == 7
    own = metrics.reconstruction_quality(build_regenerator(m.teacher_encoder, m.decoder),
                                         tf.data.Dataset.from_tensor_slices((x, np.zeros(8))).batch(4))
    np.testing.assert_allclose(rows[0]["psnr_db"], own["psnr_db"], rtol=1e-5)
    student = metrics.reconstruction_quality(build_regenerator(m.student_encoder, m.decoder),
                                             tf.data.Dataset.from_tensor_slices((x, np.zeros(8))).batch(4))
    np.testing.assert_allclose(rows[4]["psnr_db"], student["psnr_db"], rtol=1e-5)
    # Same features, the switches of another input: another image.
    assert abs(rows[0]["psnr_db"] - rows[1]["psnr_db"]) > 1e-3


def test_a_nearest_decoder_gives_the_same_row_whatever_the_switches():
    m = build_models("mnist", width=0.25, decoder_unpool="nearest")
    rows = switches.switch_ablation(m, _batches()[1])
    for r in rows[1:4]:  # E_t(x) features with the switches of E_t(x~), E_s(x), E_s(x~)
        assert r["psnr_db"] == rows[0]["psnr_db"] and r["ssim"] == rows[0]["ssim"]
    assert rows[6]["psnr_db"] == rows[5]["psnr_db"]  # E_s(x~) features, either switches
    assert "| E_t(x) | E_s(x~) |" in switches.format_markdown(rows)


def test_the_probe_refuses_a_model_dir_without_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mid_tf.cli.switch_probe", f"--model_dir={tmp_path}", "--examples=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_probe_on_a_run_prints_every_row_and_writes_them(tmp_path, mnist_data_dir):
    import json

    from mid_tf import stages
    from mid_tf.config import DataConfig, MIDStageConfig, RunConfig, StageTrainConfig
    zero = StageTrainConfig(epochs=0, batch_size=64)
    stages.run(RunConfig(model_dir=str(tmp_path / "run"), verbose=0, width=0.25, stages=("target", "teacher", "mid"),
                         data=DataConfig(data_dir=mnist_data_dir, train_examples=256, eval_examples=64),
                         target=zero, teacher=zero, mid=MIDStageConfig(epochs=0, batch_size=64, val_examples=0)))
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-m", "mid_tf.cli.switch_probe", f"--model_dir={tmp_path / 'run'}",
                           f"--data_dir={mnist_data_dir}", "--examples=16", "--attack=pgd10:nb_iter=2", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 test images, pgd10:nb_iter=2 crafted on the target, decoder D_t (switches)" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| E_")]
    rows = json.loads(out.read_text())["rows"]
    assert len(table) == len(rows) == 7 and all(np.isfinite(r["psnr_db"]) for r in rows)
