"""Natural images: per-dataset threat models, RGB ResNet models, BatchNorm in the meta step, augmentation,
and a tiny image folder trained, exported and served with its class names."""

import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mid_tf.attacks import registry
from mid_tf.data.pipeline import augment_batch, train_stream
from mid_tf.data.datasets import Split
from mid_tf.models import build_models
from test_meta import FixedPool, _directional, _mid, float64  # noqa: F401  (float64 is a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- threat models
def test_rgb_threat_model_sets_the_budget_of_every_spec_and_mnist_is_untouched():
    mnist = {n: registry.get_spec(n) for n in ("pgd40", "pgd10", "fgsm", "pgd_l2", "autoattack")}
    assert mnist["pgd40"].eps == 0.3 and mnist["pgd40"].eps_iter == 0.01 and mnist["pgd_l2"].eps == 2.0
    tm = registry.threat_model_for("image_folder", channels=3)
    assert tm is registry.RGB_THREAT and registry.threat_model_for("cifar10") is registry.RGB_THREAT
    assert registry.threat_model_for("image_folder", channels=1) is registry.MNIST_THREAT
    assert registry.threat_model_for("fashion_mnist") is registry.MNIST_THREAT
    with registry.threat_model(tm):
        for name in ("pgd40", "pgd10", "pgd100x5", "mim40", "autoattack"):
            spec = registry.get_spec(name)
            assert spec.eps == pytest.approx(8 / 255), name
        for name in ("pgd40", "pgd10", "mim40"):
            assert registry.get_spec(name).eps_iter == pytest.approx(2 / 255), name  # the standard PGD step
        assert registry.get_spec("fgsm").eps == pytest.approx(8 / 255)
        assert registry.get_spec("pgd_l2").eps == pytest.approx(0.5)
        assert registry.get_spec("pgd_l2").eps_iter == pytest.approx(0.1 * 0.5 / 2.0)
        assert registry.get_spec("pgd40:eps=0.1").eps == 0.1  # a spec's own override wins
        assert registry.get_spec("cw_l2").eps is None       # unbounded attacks stay unbounded
        seen = []
        worker = threading.Thread(target=lambda: seen.append(registry.get_spec("pgd40").eps))
        worker.start()
        worker.join()
        assert seen == [pytest.approx(8 / 255)]  # the attack cache crafts in a thread
        assert "8/255" in registry.active_threat_model().describe()
    assert registry.get_spec("pgd40") == mnist["pgd40"]  # restored on exit


# ---------------------------------------------------------------- models
def test_image_folder_shapes_choose_the_family_and_the_classes():
    rgb = build_models("image_folder", width=0.125, input_shape=(32, 32, 3), num_classes=3)
    assert rgb.target.output_shape == (None, 3) and rgb.classifier.output_shape == (None, 3)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in rgb.student_encoder.layers)
    x = tf.random.uniform((2, 32, 32, 3))
    out = rgb.student_encoder(x)
    assert rgb.decoder([out["features"]]).shape == (2, 32, 32, 3)
    gray = build_models("image_folder", width=0.125, input_shape=(28, 28, 1), num_classes=10)
    assert gray.target.input_shape == (None, 28, 28, 1)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_models("image_folder", input_shape=(30, 30, 3), num_classes=3)


# ---------------------------------------------------------------- BatchNorm in the meta step
def test_second_order_gradient_is_exact_through_batchnorm(float64):
    """ResNet encoder with BatchNorm in training mode: the batch statistics depend on θ and on θ', and the
    outer gradient still equals a central difference of J(θ) = L_train(θ) + β L_test(θ − α ∇L_train(θ)).
    8x8 images keep the ReLU kinks a finite difference may cross few (at 32x32 the difference itself is noisy)."""
    keras.utils.set_random_seed(3)
    models = build_models("image_folder", width=1 / 16, input_shape=(8, 8, 3), num_classes=10)
    from mid_tf.compat.batchnorm import has_exact_moments
    bns = [la for la in models.student_encoder.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bns and all(has_exact_moments(la) for la in bns)
    x, y = tf.random.uniform((4, 8, 8, 3), dtype=tf.float64), tf.constant([1, 2, 3, 4])
    rng = np.random.default_rng(0)
    for alpha in (0.05, 0.5):
        mid = _mid(models, FixedPool(), alpha=alpha, beta=1.0, meta_order=2)
        first = _mid(models, FixedPool(), alpha=alpha, beta=1.0, meta_order=1)
        assert any("bn" in v.path for v in mid.student_variables)
        g2, *_ = mid.meta_gradients(x, y, 0)
        g1, *_ = first.meta_gradients(x, y, 0)
        theta = [v.value for v in mid.student_variables]
        d = [tf.constant(rng.standard_normal(t.shape)) for t in theta]
        norm = float(tf.sqrt(sum(tf.reduce_sum(di * di) for di in d)))
        d = [di / norm for di in d]
        eps = 1e-5
        jp = mid.meta_objective(x, y, 0, [t + eps * di for t, di in zip(theta, d)])
        jm = mid.meta_objective(x, y, 0, [t - eps * di for t, di in zip(theta, d)])
        fd = float(jp - jm) / (2 * eps)
        assert abs(_directional(g2, d) - fd) <= 1e-6 * abs(fd), alpha
        assert abs(_directional(g1, d) - fd) > 1e-2 * abs(fd), alpha  # the second-order term is there


def test_meta_step_updates_moving_statistics_from_the_theta_pass_only():
    keras.utils.set_random_seed(4)
    models = build_models("cifar10", width=1 / 16)
    mid = _mid(models, FixedPool(), alpha=1e-2, beta=1.0, meta_order=2)
    mid.compile(optimizer=keras.optimizers.Adam(1e-3))
    moving = [v for v in models.student_encoder.non_trainable_variables if "moving_mean" in v.path]
    teacher_moving = [v.numpy().copy() for v in models.teacher_encoder.non_trainable_variables]
    before = [v.numpy().copy() for v in moving]
    x, y = tf.random.uniform((8, 32, 32, 3)), tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    tf.function(lambda: mid.train_step((x, y)))()
    assert moving and all(np.max(np.abs(v.numpy() - b)) > 0 for v, b in zip(moving, before))
    # the frozen teacher's statistics never move (it runs in inference mode)
    for v, b in zip(models.teacher_encoder.non_trainable_variables, teacher_moving):
        np.testing.assert_array_equal(v.numpy(), b)


# ---------------------------------------------------------------- augmentation
def test_augmentation_is_seeded_per_batch_and_resumes_exactly():
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10, "test")
    images = tf.constant(split.images[:8], tf.float32) / 255
    a = augment_batch(images, tf.constant([1, 2]))
    assert a.shape == images.shape
    np.testing.assert_array_equal(a.numpy(), augment_batch(images, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a.numpy(), augment_batch(images, tf.constant([1, 3])).numpy())
    assert not np.array_equal(a.numpy(), images.numpy())
    full = [b[0].numpy() for b in train_stream(split, 16, seed=5, augment=True).take(6)]
    resumed = [b[0].numpy() for b in train_stream(split, 16, seed=5, start_batch=4, augment=True).take(2)]
    np.testing.assert_array_equal(full[4], resumed[0])
    np.testing.assert_array_equal(full[5], resumed[1])
    plain = [b[0].numpy() for b in train_stream(split, 16, seed=5).take(1)]
    assert plain[0].shape == full[0].shape and not np.array_equal(plain[0], full[0])


# ---------------------------------------------------------------- a tiny image folder, end to end
CLASSES = ("cat", "dog", "ship")


def _write_folder(root, per_class=(24, 8)):
    """Three colour classes a small network separates at once: mostly red, green or blue JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(n):
                img = rng.integers(0, 90, (32, 32, 3))
                img[..., c] += 160
                Image.fromarray(img.astype(np.uint8)).save(root / split / name / f"{i:03d}.jpg", quality=90)


def _run(*argv, timeout=600):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_image_folder_trains_exports_and_serves_class_names(tmp_path):
    from serving_standin import StandInServer

    from mid_tf.serving import client

    _write_folder(tmp_path / "data")
    run = tmp_path / "run"
    proc = _run("train.py", "--dataset=image_folder", f"--data_dir={tmp_path / 'data'}", f"--model_dir={run}",
                "--stages=target,teacher,mid", "--width=0.125", "--batch_size=8", "--target_epochs=2",
                "--teacher_epochs=2", "--mid_epochs=1", "--mid_batch_size=8", "--num_meta_train=1",
                "--attack_pool=clean,pgd5,fgsm", "--augment", "--val_examples=0", "--verbose=0",
                "--stage1_precision=float32", "--mid_precision=float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "threat model=rgb: L-inf eps 0.03137 (8/255), L2 eps 0.5" in proc.stdout, proc.stdout
    export = tmp_path / "exports" / "mid_folder"
    proc = _run("export.py", f"--model_dir={run}", f"--export_base={export}", "--allow_unevaluated")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jpeg = tmp_path / "data" / "test" / "ship" / "000.jpg"
    with StandInServer(str(export), "mid_folder", lifetime_s=120) as server:
        c = client.GrpcClient(server.target, timeout=30)
        try:
            out = c.predict("mid_folder", "classify_encoded", [jpeg.read_bytes()])
        finally:
            c.close()
    names = [n.decode() for n in out["class_names"]]
    assert names[0] in CLASSES and names[0] == CLASSES[int(out["classes"][0])]
    card = (export / "1" / "assets.extra" / "model_card.json").read_text()
    assert all(f'"{n}"' in card for n in CLASSES)
