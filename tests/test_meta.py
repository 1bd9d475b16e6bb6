"""The MID meta step: exact second-order gradient, frozen teacher, held-out task, white-box source, resume."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from interrupt import Kill, KillAfter
import tensorflow as tf

from mid_tf.attacks.pool import AttackPool
from mid_tf.config import ConfigError, MIDStageConfig
from mid_tf.models import build_models
from mid_tf.training.meta import MetaInvarianceDefense, Tasks

HERE = os.path.dirname(os.path.abspath(__file__))


class FixedPool(AttackPool):
    """Deterministic stand-in tasks (smooth distortions of x) and a fixed held-out index; the rest
    (`craft_step`: which rows, no warm-up) is the real pool's."""

    def __init__(self, num_tasks=3, held_out=1):
        super().__init__(("clean", "fgsm", "fgsm_rs", "pgd3")[:num_tasks], batched_runner=False)
        self.held_out, self.sources = held_out, []

    def craft_all(self, model_fn, x, y, step, replica_id=None):
        self.sources.append(model_fn)
        return tf.stack([x] + [tf.clip_by_value(x + 0.1 * (i + 1) * tf.sin(x * (i + 3)), 0, 1)
                               for i in range(self.num_tasks - 1)])

    def sample_tf(self, step):
        idx = [i for i in range(self.num_tasks) if i != self.held_out]
        return tf.constant(idx, tf.int32), tf.constant(self.held_out, tf.int32)


def _mid(models, pool, train_head=False, **cfg):
    return MetaInvarianceDefense(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                                 decoder=models.decoder, classifier=models.classifier, target=models.target,
                                 pool=pool, config=MIDStageConfig(**cfg),
                                 student_classifier=models.student_classifier if train_head else None)


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # Keras caches the global policy at first use
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def _directional(g, d):
    return float(sum(tf.reduce_sum(gi * di) for gi, di in zip(g, d)))


def _tiny_float64(seed):
    """A width-1/8 model set and a float64 batch of 4 (inside the float64 fixture)."""
    keras.utils.set_random_seed(seed)
    return build_models("mnist", width=0.125), tf.random.uniform((4, 28, 28, 1), dtype=tf.float64), tf.constant([1, 2, 3, 4])


def test_outer_gradient_is_the_exact_second_order_derivative(float64):
    models, x, y = _tiny_float64(1)
    second = _mid(models, FixedPool(), alpha=0.5, beta=1.0, meta_order=2)
    first = _mid(models, FixedPool(), alpha=0.5, beta=1.0, meta_order=1)
    g2, *_ = second.meta_gradients(x, y, 0)
    g1, *_ = first.meta_gradients(x, y, 0)
    theta = [v.value for v in models.student_encoder.trainable_variables]
    rng = np.random.default_rng(0)
    for _ in range(2):
        d = [tf.constant(rng.standard_normal(t.shape)) for t in theta]
        eps = 1e-6  # J(θ) = L_train(θ) + β L_test(θ − α∇L_train(θ)), central difference
        jp = second.meta_objective(x, y, 0, [t + eps * di for t, di in zip(theta, d)])
        jm = second.meta_objective(x, y, 0, [t - eps * di for t, di in zip(theta, d)])
        fd = float(jp - jm) / (2 * eps)
        assert abs(_directional(g2, d) - fd) <= 1e-6 * abs(fd)
        assert abs(_directional(g1, d) - fd) > 1e-3 * abs(fd)  # the first-order approximation is not it


def test_train_head_gradient_is_exact_for_encoder_and_head(float64):
    """--train_head: θ = (E_s, C_s); the second-order gradient still matches a central difference of J,
    in directions that move the encoder and the head together, and has non-zero head entries."""
    models, x, y = _tiny_float64(7)
    mid = _mid(models, FixedPool(), train_head=True, alpha=0.5, beta=1.0, meta_order=2)
    theta = [v.value for v in mid.student_variables]
    n_enc = len(models.student_encoder.trainable_variables)
    assert len(theta) == n_enc + len(models.student_classifier.trainable_variables) > n_enc
    g, *_ = mid.meta_gradients(x, y, 0)
    assert all(float(tf.reduce_max(tf.abs(gi))) > 0 for gi in g[n_enc:])
    rng = np.random.default_rng(1)
    for head_only in (False, True):
        d = [tf.constant(rng.standard_normal(t.shape)) * (1.0 if i >= n_enc or not head_only else 0.0)
             for i, t in enumerate(theta)]
        eps = 1e-6
        jp = mid.meta_objective(x, y, 0, [t + eps * di for t, di in zip(theta, d)])
        jm = mid.meta_objective(x, y, 0, [t - eps * di for t, di in zip(theta, d)])
        fd = float(jp - jm) / (2 * eps)
        assert abs(_directional(g, d) - fd) <= 1e-6 * abs(fd)


def test_first_order_path_equals_the_taped_first_order_gradient(float64):
    """meta_order=1 does not ask the outer tape; its gradient ∇θ L_train + β ∇θ' L_test must equal what the
    second-order path computes (a tape over the whole objective J) once ∇θ L_train is stopped in θ'."""
    models, x, y = _tiny_float64(4)
    first = _mid(models, FixedPool(), alpha=0.5, beta=0.7, meta_order=1)
    g_fast, logs, *_ = first.meta_gradients(x, y, 0)
    tasks = first.sample_tasks(x, y, 0)
    assert isinstance(tasks, Tasks) and int(tasks.held_out) == 1 and float(tasks.k) == 2
    state = [v.value for v in models.student_encoder.non_trainable_variables]
    theta = [v.value for v in models.student_encoder.trainable_variables]
    with tf.GradientTape() as tape:  # J of the first-order objective (θ' with a stopped inner gradient)
        tape.watch(theta)
        total = first._meta_objective(theta, state, tasks)[1]["loss"]
    g_ref = tape.gradient(total, theta)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    assert float(logs["loss"]) == pytest.approx(float(total), rel=1e-12)


def test_both_orders_agree_without_an_inner_step(float64):
    """α = 0: θ' = θ, the inner-gradient term vanishes, and the two gradient paths (outer tape; two tapes)
    give the same ∇θ [L_train(θ) + β L_test(θ)]; with α > 0 they differ by that term."""
    models, x, y = _tiny_float64(9)

    def grads(alpha, order):
        return _mid(models, FixedPool(), alpha=alpha, beta=0.7, meta_order=order).meta_gradients(x, y, 0)[0]

    for a, b in zip(grads(0.0, 1), grads(0.0, 2)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grads(0.5, 1), grads(0.5, 2))) > 1e-6


def test_held_out_task_is_the_one_used_in_meta_test():
    keras.utils.set_random_seed(2)
    models = build_models("mnist", width=0.25)
    x, y = tf.random.uniform((8, 28, 28, 1)), tf.constant(np.arange(8) % 10)
    pool = FixedPool(num_tasks=4, held_out=2)
    mid = _mid(models, pool, alpha=1e-3, test_weights=(1.0, 1.0, 1.0))
    _, logs, _, held = mid.meta_gradients(x, y, 0)
    assert int(held) == 2
    # Recompute L_test by hand at θ' on each candidate task: only task 2 matches.
    batch = mid.sample_tasks(x, y, 0)
    tasks = pool.craft_all(None, x, y, 0)
    np.testing.assert_array_equal(batch.x_test, tasks[2])
    np.testing.assert_array_equal(batch.x_train, tf.reshape(tf.gather(tasks, [0, 1, 3]), [-1, 28, 28, 1]))
    theta = [v.value for v in models.student_encoder.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(theta)
        terms, _ = mid._loss(theta, [], batch.x_train, batch.x_clean_train, batch.f_t_train, batch.y_train,
                             mid.train_weights)
        L_train = batch.k * terms["total"]
    theta_p = [w - 1e-3 * g for w, g in zip(theta, tape.gradient(L_train, theta))]
    by_task = [float(mid._loss(theta_p, [], tasks[t], x, batch.f_t, y, mid.test_weights)[0]["total"])
               for t in range(4)]
    np.testing.assert_allclose(float(logs["L_test"]), by_task[2], rtol=1e-5)
    assert all(abs(by_task[t] - by_task[2]) > 1e-6 for t in (0, 1, 3))
    np.testing.assert_allclose(float(logs["L_train"]), float(L_train), rtol=1e-5)


def _small_pool(seed=0):
    return AttackPool("clean,fgsm,pgd40:nb_iter=3,eps_iter=0.1,mim40_t0:nb_iter=3,eps_iter=0.1", seed=seed)


def test_teacher_and_target_stay_bit_identical_while_the_student_moves():
    keras.utils.set_random_seed(3)
    models = build_models("mnist", width=0.25)
    frozen = {n: [w.numpy().copy() for w in getattr(models, n).weights]
              for n in ("teacher_encoder", "decoder", "classifier", "target")}
    student_before = [w.numpy().copy() for w in models.student_encoder.weights]
    mid = _mid(models, _small_pool())
    mid.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    y = np.arange(64) % 10
    hist = mid.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(mid.optimizer.iterations.numpy()) == 4
    assert np.isfinite(hist.history["loss"][-1])
    assert hist.history["held_out"][-1] == mid.pool.sample(3)[1]  # the last step's held-out task
    assert mid.trainable_variables and all(
        any(v is s for s in models.student_encoder.trainable_variables) for v in mid.trainable_variables)
    for name, before in frozen.items():
        for a, b in zip(before, getattr(models, name).weights):
            np.testing.assert_array_equal(a, b.numpy())
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(student_before, models.student_encoder.weights))


def test_whitebox_source_attacks_the_current_student():
    keras.utils.set_random_seed(4)
    models = build_models("mnist", width=0.25)
    pool = _small_pool()
    mid = _mid(models, pool, attack_source="student")
    x = tf.random.uniform((16, 28, 28, 1))
    y = tf.constant(np.arange(16) % 10)
    source = mid._attack_source()
    np.testing.assert_allclose(source(x), mid(x), atol=1e-6)  # the source is C(E_s(·)), not the target
    assert not np.allclose(source(x), models.target(x), atol=1e-3)
    before = pool.craft_all(source, x, y, 0)
    models.student_encoder.set_weights([w * 1.5 for w in models.student_encoder.get_weights()])
    after = pool.craft_all(mid._attack_source(), x, y, 0)  # same seed, other student weights
    assert float(tf.reduce_max(tf.abs(before[2] - after[2]))) > 1e-3
    mid.compile(optimizer=keras.optimizers.Adam(1e-3))
    w0 = [w.copy() for w in models.student_encoder.get_weights()]
    mid.fit(x.numpy(), y.numpy(), batch_size=8, epochs=1, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(w0, models.student_encoder.get_weights()))


def test_whitebox_step_crafts_only_its_tasks_on_the_student():
    """With k + 1 < T tasks per step the MID step crafts just those (AttackPool.craft_tasks), on the
    current C(E_s(·)): the step's inputs are the rows of craft_all on the student, and they move when
    the student's weights move; the frozen head stays bit-identical through the steps."""
    keras.utils.set_random_seed(5)
    models = build_models("mnist", width=0.25)
    pool = AttackPool("clean,fgsm_rs,pgd3,pgd_l2_5", seed=1, num_meta_train=1, batched_runner=False)
    mid = _mid(models, pool, attack_source="student", meta_order=1)
    x = tf.random.uniform((16, 28, 28, 1))
    y = tf.constant(np.arange(16) % 10)
    prepare = tf.function(lambda a, b, s: mid.sample_tasks(a, b, s))
    for step in (0, 1, 2):
        batch = prepare(x, y, tf.constant(step, tf.int64))
        full = pool.craft_all(mid._attack_source(), x, y, step).numpy()
        mt, ho = pool.sample(step)
        np.testing.assert_allclose(batch.x_train.numpy(), full[list(mt)].reshape(-1, 28, 28, 1), atol=1e-6)
        np.testing.assert_allclose(batch.x_test.numpy(), full[ho], atol=1e-6)
        assert int(batch.held_out) == ho
    attacked = next(s for s in range(20) if pool.sample(s)[1] == 2)  # a step whose held-out task is pgd3
    before = prepare(x, y, tf.constant(attacked, tf.int64)).x_test.numpy()
    head = [w.copy() for w in models.classifier.get_weights()]
    mid.compile(optimizer=keras.optimizers.Adam(1e-2))
    mid.fit(x.numpy(), y.numpy(), batch_size=8, epochs=2, verbose=0)
    after = prepare(x, y, tf.constant(attacked, tf.int64)).x_test.numpy()
    assert np.abs(after - before).max() > 1e-3  # same seed, moved student: other adversarials
    for a, b in zip(head, models.classifier.get_weights()):
        np.testing.assert_array_equal(a, b)  # the teacher head C is never trained


@pytest.mark.parametrize("meta_order", [1, 2])
def test_train_head_trains_the_student_head_and_never_the_teacher_head(meta_order):
    """White-box MID with --train_head: the attacks are crafted on C_s(E_s(·)), the optimizer moves E_s
    and C_s, and the teacher head C (and the rest of the teacher, and the target) stay bit-identical."""
    keras.utils.set_random_seed(6)
    models = build_models("mnist", width=0.25)
    np.testing.assert_array_equal(models.student_classifier.get_weights()[0], models.classifier.get_weights()[0])
    frozen = {n: [w.copy() for w in getattr(models, n).get_weights()]
              for n in ("teacher_encoder", "decoder", "classifier", "target")}
    head0 = [w.copy() for w in models.student_classifier.get_weights()]
    enc0 = [w.copy() for w in models.student_encoder.get_weights()]
    pool = AttackPool("fgsm_rs,pgd3,pgd_l2_5", seed=1, num_meta_train=1)
    mid = _mid(models, pool, train_head=True, attack_source="student", meta_order=meta_order)
    x = tf.random.uniform((16, 28, 28, 1))
    y = tf.constant(np.arange(16) % 10)
    mid.compile(optimizer=keras.optimizers.Adam(1e-2))
    mid.fit(x.numpy(), y.numpy(), batch_size=8, epochs=2, verbose=0)
    assert int(mid.optimizer.iterations.numpy()) == 4
    for name, before in frozen.items():
        for a, b in zip(before, getattr(models, name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(head0, models.student_classifier.get_weights()))
    assert any(not np.allclose(a, b) for a, b in zip(enc0, models.student_encoder.get_weights()))
    deployed = models.student_classifier(models.student_encoder(x)["features"])
    np.testing.assert_allclose(mid(x), deployed, atol=1e-5)  # the deployed pipeline is C_s(E_s(·))
    np.testing.assert_allclose(mid._attack_source()(x), deployed, atol=1e-5)  # and the attacks target it
    assert not np.allclose(mid(x), models.classifier(models.student_encoder(x)["features"]), atol=1e-4)


def test_train_head_refuses_the_frozen_head_itself():
    models = build_models("mnist", width=0.125)
    with pytest.raises(ValueError, match="copy of the teacher head"):
        MetaInvarianceDefense(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                              decoder=models.decoder, classifier=models.classifier, target=models.target,
                              pool=FixedPool(), student_classifier=models.classifier)


def _run_script(name, *args, timeout=420):
    proc = subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_mirrored_step_equals_single_device():
    out = _run_script("distributed_meta_check.py", "mirrored")
    assert "MIRRORED_OK" in out, out


def test_multi_worker_keeps_workers_identical():
    out = _run_script("distributed_meta_check.py", "multi_worker")
    assert "MULTI_WORKER_OK" in out, out



def test_mid_stage_resumes_after_a_kill(tmp_path, mnist_small):
    from mid_tf.config import MIDStageConfig
    from mid_tf.data import Split
    from mid_tf.training.mid_stage import train_mid

    train = Split(mnist_small[0].images[:256], mnist_small[0].labels[:256], "test")
    cfg = MIDStageConfig(epochs=2, batch_size=64, learning_rate=1e-3, val_examples=0,
                         pool="clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15")  # 4 steps per epoch

    def run(callbacks=()):
        keras.utils.set_random_seed(5)
        models = build_models("mnist", width=0.25)
        mid, resumed = train_mid(models, train, cfg, seed=5, model_dir=str(tmp_path), checkpoint_every=2,
                                 verbose=0, callbacks=callbacks)
        return mid, resumed

    with pytest.raises(Kill):
        run([KillAfter(5)])
    mid, resumed = run()
    assert resumed == 4  # the checkpoint at step 4 (end of epoch 1), not a fresh start
    assert int(mid.optimizer.iterations.numpy()) == 8


def test_flagfiles_parse():
    repo = os.path.dirname(HERE)
    cases = {("configs/mnist.flags",): "target,teacher,mid,eval",
             ("configs/mnist.flags", "configs/mnist_eval.flags"): "target,teacher,pgd_at,trades,mid,eval",
             ("configs/mnist_whitebox.flags",): "target,teacher,mid,regen,eval",
             ("configs/mnist_whitebox_encoder.flags",): "target,teacher,mid,regen,eval",
             ("configs/mnist_whitebox_pixel.flags",): "target,teacher,mid,regen,eval",
             ("configs/mnist_whitebox_nearest.flags",): "target,teacher,mid,eval",
             ("configs/mnist_whitebox.flags", "configs/mnist_headline_eval.flags", "configs/mnist_whitebox_trades.flags"):
                 "target,trades,eval"}
    for flagfiles, stages in cases.items():
        argv = ", ".join(repr(f"--flagfile={f}") for f in flagfiles)
        proc = subprocess.run([sys.executable, "-c", (
            "import sys; sys.argv=['train.py', %s]; import train; "
            "from absl import flags; flags.FLAGS(sys.argv); cfg = train.build_config(); cfg.validate(); "
            "print('STAGES', ','.join(cfg.stages), 'POOL', cfg.mid.pool, 'SOURCE', cfg.mid.attack_source, "
            "'BATCH', cfg.mid.batch_size, cfg.mid.num_meta_train, 'OVERLAP', cfg.mid.attack_cache_overlap, "
            "'PRECISION', cfg.target.precision, cfg.teacher.precision, cfg.mid.precision, "
            "'WARMUP', cfg.mid.eps_warmup_epochs, 'HEAD', cfg.mid.train_head, 'DIR', cfg.model_dir, "
            "'PIXEL', cfg.mid.pixel_weight, 'BASELINE', cfg.baseline.attack, cfg.baseline.epochs, cfg.baseline.precision, 'UNPOOL', cfg.decoder_unpool)"
            % argv)],
            cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"STAGES {stages}" in proc.stdout, proc.stdout
        if "whitebox" in flagfiles[0]:  # nested flagfiles, then their overrides
            assert "POOL pgd5,pgd10,pgd20,pgd_l2_5 SOURCE student BATCH 128 2" in proc.stdout, proc.stdout
            assert "WARMUP 1.0" in proc.stdout, proc.stdout
            encoder_alone = "encoder" in flagfiles[0]  # --notrain_head overrides the nested flagfile's --train_head
            suffix = flagfiles[0].split("whitebox", 1)[1].removesuffix(".flags")  # "", _encoder, _pixel, _nearest
            assert f"HEAD {not encoder_alone} DIR runs/mnist_whitebox{suffix} " in proc.stdout, proc.stdout
        else:  # the MID stage's own batch size and meta-train count, the cache crafted while training
            assert "SOURCE target BATCH 128 2 OVERLAP True" in proc.stdout, proc.stdout
        # only the pixel flagfile and the one nesting it turn the pixel consistency on (default 0: the official loss)
        pixel = "pixel" in flagfiles[0] or "nearest" in flagfiles[0]
        assert f"PIXEL {1.0 if pixel else 0.0}" in proc.stdout, proc.stdout
        # only the nearest flagfile builds D_t without pooling switches
        assert f"UNPOOL {'nearest' if 'nearest' in flagfiles[0] else 'switches'}" in proc.stdout, proc.stdout
        # --*_precision=auto is resolved for this machine before the config is built
        from mid_tf.training.precision import resolve
        auto = resolve("auto")[0]
        assert f"PRECISION {auto} {auto} {auto}" in proc.stdout, proc.stdout
        assert "--mid_precision=auto -> " + auto in proc.stdout, proc.stdout
        if "configs/mnist_whitebox_trades.flags" in flagfiles:  # TRADES at MID's time: its own attack, epochs, dtype
            assert f"BASELINE pgd20 30 {auto}" in proc.stdout, proc.stdout


@pytest.mark.parametrize("flagfile, expected", [
    ("configs/cifar10.flags", "STAGES target,teacher,mid,pgd_at,trades,eval DATASET image_folder WIDTH 0.25 AUGMENT True "
                              "SOURCE target BATCH 128 2 CACHE 3 DIR runs/cifar10"),
    ("configs/cifar10_whitebox.flags", "STAGES target,teacher,mid,pgd_at,trades,eval DATASET image_folder WIDTH 0.25 "
                                       "AUGMENT True SOURCE student BATCH 128 2 CACHE 0 DIR runs/cifar10_whitebox"),
    ("configs/cifar10_gpu.flags", "STAGES target,teacher,mid,pgd_at,trades,eval DATASET image_folder WIDTH 1.0 "
                                  "AUGMENT True SOURCE target BATCH 256 4 CACHE 0 DIR runs/cifar10_gpu")])
def test_cifar10_flagfiles_parse(flagfile, expected):
    proc = subprocess.run([sys.executable, "-c", (
        "import sys; sys.argv=['train.py', '--flagfile=%s']; import train; "
        "from absl import flags; flags.FLAGS(sys.argv); cfg = train.build_config(); cfg.validate(); "
        "print('STAGES', ','.join(cfg.stages), 'DATASET', cfg.data.dataset, 'WIDTH', cfg.width, 'AUGMENT', "
        "cfg.target.augment and cfg.teacher.augment and cfg.baseline.augment, 'SOURCE', cfg.mid.attack_source, "
        "'BATCH', cfg.mid.batch_size, cfg.mid.num_meta_train, 'CACHE', cfg.mid.attack_cache_epochs, "
        "'DIR', cfg.model_dir)" % flagfile)], cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout


def test_student_init_from_teacher_and_validation(tmp_path, mnist_small):
    from mid_tf.config import ConfigError, MIDStageConfig
    from mid_tf.data import Split
    from mid_tf.training.mid_stage import train_mid

    with pytest.raises(ConfigError, match=r"^mid\.student_init "):
        MIDStageConfig(student_init="imagenet").validate()
    with pytest.raises(ConfigError, match=r"^mid\.attack_cache_epochs needs mid\.attack_source=target"):
        MIDStageConfig(attack_cache_epochs=2, attack_source="student").validate()
    keras.utils.set_random_seed(6)
    models = build_models("mnist", width=0.25)
    teacher = [w.copy() for w in models.teacher_encoder.get_weights()]
    train = Split(mnist_small[0].images[:128], mnist_small[0].labels[:128], "test")
    cfg = MIDStageConfig(epochs=1, batch_size=64, learning_rate=1e-3, val_examples=0, student_init="teacher",
                         attack_cache_epochs=1, pool="clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15")
    mid, _ = train_mid(models, train, cfg, seed=6, model_dir=str(tmp_path), checkpoint_every=100, verbose=0)
    student = models.student_encoder.get_weights()
    # Started at the teacher's weights (2 small Adam steps away), the teacher itself untouched.
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(student, teacher)) < 5e-3
    assert any(not np.array_equal(a, b) for a, b in zip(student, teacher))
    for a, b in zip(teacher, models.teacher_encoder.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_train_step_traces_once_across_steps_and_epochs():
    """No retracing inside the loop: the held-out index, the attack seeds and the step are tensors."""
    keras.utils.set_random_seed(2)
    models = build_models("mnist", width=0.125)
    traces = []

    class Counting(MetaInvarianceDefense):
        def train_step(self, data):
            traces.append(1)  # Python side effect: runs once per trace, not per step
            return super().train_step(data)

    mid = Counting(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                   decoder=models.decoder, classifier=models.classifier, target=models.target,
                   pool=AttackPool("clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15", seed=0))
    mid.compile(optimizer=keras.optimizers.Adam(1e-3))
    mid.optimizer.build(models.student_encoder.trainable_variables)  # as train_mid does: no variable
    # creation inside the first trace (tf.function would trace twice to lift the initializers)
    x = np.random.default_rng(0).random((24, 28, 28, 1)).astype(np.float32)
    y = np.arange(24) % 10
    mid.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert int(mid.optimizer.iterations.numpy()) == 6
    assert len(traces) == 1, f"train_step traced {len(traces)} times in 6 steps"


def test_mixed_bfloat16_step_keeps_float32_losses_and_moves_the_student():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(3)
        models = build_models("mnist", width=0.125)
        mid = _mid(models, FixedPool())
        mid.compile(optimizer=keras.optimizers.Adam(1e-2))
        w0 = [w.copy() for w in models.student_encoder.get_weights()]
        t0 = [w.copy() for w in models.teacher_encoder.get_weights()]
        x = tf.random.uniform((8, 28, 28, 1))
        logs = tf.function(lambda: mid.train_step((x, tf.range(8) % 10)))()
        assert logs["loss"].dtype == tf.float32 and np.isfinite(float(logs["loss"]))
        assert all(w.dtype == np.float32 for w in models.student_encoder.get_weights())
        assert any(not np.allclose(a, b) for a, b in zip(w0, models.student_encoder.get_weights()))
        assert all(np.array_equal(a, b) for a, b in zip(t0, models.teacher_encoder.get_weights()))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_kl_reductions_official_and_per_distribution():
    from mid_tf.training.losses import kl_divergence
    rng = np.random.default_rng(0)
    t, s = (tf.constant(rng.normal(size=(2, 3, 3, 8)), tf.float32) for _ in range(2))
    official = float(kl_divergence(t, s, -1, "elementwise_mean"))
    per_dist = float(kl_divergence(t, s, -1, "distribution_mean"))
    p, q = tf.nn.softmax(t), tf.nn.softmax(s)
    manual = float(tf.reduce_mean(tf.reduce_sum(p * (tf.math.log(p) - tf.math.log(q)), -1)))
    assert per_dist == pytest.approx(manual, rel=1e-5) and official == pytest.approx(manual / 8, rel=1e-5)
    with pytest.raises(ConfigError, match=r"^mid\.kl_reduction "):
        MIDStageConfig(kl_reduction="sum").validate()
    with pytest.raises(ConfigError, match=r"^mid\.kl_reduction "):  # the meta-learner validates its config
        _mid(build_models("mnist", width=0.125), FixedPool(), kl_reduction="sum")


def test_mid_stage_in_mixed_bfloat16_trains_a_twin_and_keeps_float32_outputs(tmp_path, mnist_data_dir):
    """--mid_precision=mixed_bfloat16: the student trained in bfloat16 lands in the float32 networks
    that are saved and evaluated, the teacher is untouched, and the global policy is restored."""
    from mid_tf import artifacts, stages
    from mid_tf.config import DataConfig, MIDStageConfig, RunConfig, StageTrainConfig

    cfg = RunConfig(model_dir=str(tmp_path / "run"), verbose=0, width=0.25, stages=("target", "teacher", "mid"),
                    data=DataConfig(data_dir=mnist_data_dir, train_examples=512, eval_examples=200),
                    target=StageTrainConfig(epochs=1, batch_size=64), teacher=StageTrainConfig(epochs=1, batch_size=64),
                    mid=MIDStageConfig(epochs=1, batch_size=64, learning_rate=1e-3, val_examples=32,
                                       val_attacks=("fgsm",), val_whitebox_attacks=("fgsm",),
                                       steps_per_epoch=3, attack_cache_epochs=1, precision="mixed_bfloat16",
                                       pool="clean,fgsm,pgd40:nb_iter=2,eps_iter=0.15"))
    summary = stages.run(cfg)
    assert keras.config.dtype_policy().name == "float32"
    mid = summary["stages"]["mid"]
    assert mid["precision"] == "mixed_bfloat16" and 0.0 <= mid["clean_accuracy"] <= 1.0
    models = artifacts.load_models(cfg.model_dir, ("target", "teacher", "mid"))
    assert models.student_encoder.compute_dtype == "float32"
    student = models.student_encoder.get_weights()
    assert all(w.dtype == np.float32 for w in student)
    keras.utils.set_random_seed(cfg.seed)  # as stages.run: rebuilds the student's initial weights
    initial = build_models("mnist", width=0.25).student_encoder.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(student, initial))  # the bf16 training reached it
    with pytest.raises(ConfigError, match=r"^mid\.precision "):
        MIDStageConfig(precision="float16").validate()


def test_train_head_stage_saves_and_loads_the_student_head(tmp_path, mnist_data_dir):
    """--train_head through the stages (white-box, bfloat16 twin): C_s is trained, copied back to float32,
    saved with the mid stage and loaded into the deployed pipeline; the teacher head C stays the stage-1 one.
    A mid stage saved without a head (before --train_head existed) loads with C_s = C."""
    import os

    from mid_tf import artifacts, stages
    from mid_tf.config import DataConfig, MIDStageConfig, RunConfig, StageTrainConfig
    from mid_tf.models import build_pipeline

    cfg = RunConfig(model_dir=str(tmp_path / "run"), verbose=0, width=0.25, stages=("target", "teacher", "mid"),
                    data=DataConfig(data_dir=mnist_data_dir, train_examples=256, eval_examples=100),
                    target=StageTrainConfig(epochs=1, batch_size=64), teacher=StageTrainConfig(epochs=1, batch_size=64),
                    mid=MIDStageConfig(epochs=1, batch_size=32, learning_rate=1e-2, val_examples=0, steps_per_epoch=3,
                                       attack_source="student", attack_cache_epochs=0, train_head=True,
                                       precision="mixed_bfloat16", num_meta_train=1, pool="fgsm_rs,pgd3,pgd_l2_5"))
    summary = stages.run(cfg)
    assert summary["stages"]["mid"]["train_head"] is True
    models = artifacts.load_models(cfg.model_dir, ("target", "teacher", "mid"))
    teacher = build_models("mnist", width=0.25)
    artifacts.load_stage(cfg.model_dir, "teacher", teacher)
    for a, b in zip(models.classifier.get_weights(), teacher.classifier.get_weights()):
        np.testing.assert_array_equal(a, b)  # C as stage 1 left it
    head = models.student_classifier.get_weights()
    assert all(w.dtype == np.float32 for w in head)
    assert any(not np.allclose(a, b) for a, b in zip(head, teacher.classifier.get_weights()))  # C_s trained
    x = tf.random.uniform((4, 28, 28, 1))
    pipeline = build_pipeline(models.student_encoder, models.student_classifier)
    acc = float(np.mean(np.argmax(pipeline(x), -1) == np.argmax(models.student_classifier(
        models.student_encoder(x)["features"]), -1)))
    assert acc == 1.0
    os.remove(artifacts.weights_path(cfg.model_dir, "mid", "student_classifier"))
    old = artifacts.load_models(cfg.model_dir, ("target", "teacher", "mid"))
    for a, b in zip(old.student_classifier.get_weights(), teacher.classifier.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_whitebox_validation_attacks_the_current_student():
    from mid_tf.attacks import make_attack
    from mid_tf.training.callbacks import AttackValidation

    keras.utils.set_random_seed(8)
    models = build_models("mnist", width=0.125)
    mid = _mid(models, FixedPool())
    x = tf.random.uniform((16, 28, 28, 1))
    y = tf.range(16) % 10
    cb = AttackValidation(x, y, {"fgsm": make_attack("fgsm")}, models.target, None,
                          whitebox_attacks={"fgsm": make_attack("fgsm")})
    cb.set_model(mid)
    logs = {}
    cb.on_epoch_end(0, logs)
    assert {"val_clean_accuracy", "val_fgsm_accuracy", "val_wb_fgsm_accuracy"} <= set(logs)
    first = cb._whitebox["fgsm"](x, y).numpy()
    models.student_encoder.set_weights([w + 0.05 for w in models.student_encoder.get_weights()])
    assert np.abs(cb._whitebox["fgsm"](x, y).numpy() - first).max() > 0.1  # recrafted on the new weights


@pytest.mark.parametrize("pool_names,k", [("clean,fgsm_rs,pgd3", 2), ("clean,fgsm_rs,pgd3,pgd_l2_5", 1)])
def test_eps_warmup_shrinks_the_pool_then_leaves_it_unchanged(pool_names, k):
    """--mid_eps_warmup_epochs: at step t every task lies within r·eps of x, r = (t + 1) / warmup steps,
    through both crafting paths (craft_all, craft_tasks); once r = 1 the tasks equal the un-warmed ones."""
    keras.utils.set_random_seed(6)
    models = build_models("mnist", width=0.25)
    pool = AttackPool(pool_names, seed=2, num_meta_train=k, batched_runner=False)
    plain = _mid(models, pool, attack_source="student", meta_order=1)
    warm = _mid(models, AttackPool(pool_names, seed=2, num_meta_train=k, batched_runner=False, eps_warmup_steps=4),
                attack_source="student", meta_order=1)
    x = tf.random.uniform((16, 28, 28, 1))
    y = tf.constant(np.arange(16) % 10)
    np.testing.assert_allclose(float(warm.pool.eps_fraction(tf.constant(0, tf.int64))), 0.25)
    assert float(pool.eps_fraction(tf.constant(0, tf.int64))) == 1.0
    for step in range(6):
        b_warm = warm.sample_tasks(x, y, tf.constant(step, tf.int64))
        b_plain = plain.sample_tasks(x, y, tf.constant(step, tf.int64))
        r = min(1.0, (step + 1) / 4)
        mt, ho = pool.sample(step)
        rows_warm = [*tf.split(b_warm.x_train, k), b_warm.x_test]
        rows_plain = [*tf.split(b_plain.x_train, k), b_plain.x_test]
        for task, a, b in zip([*mt, ho], rows_warm, rows_plain):
            name = pool.names[task]
            d_warm, d_plain = float(tf.reduce_max(tf.abs(a - x))), float(tf.reduce_max(tf.abs(b - x)))
            if name == "clean":
                assert d_warm == d_plain == 0.0  # the clean task stays the clean batch
            elif name != "pgd_l2_5":  # L-inf members (the L2 one is shrunk too, but bounded in L2)
                assert d_warm <= r * 0.3 + 1e-5, (step, name, d_warm)
                assert d_plain > 0.29, (step, name, d_plain)
            if r == 1.0:
                np.testing.assert_allclose(a, b, atol=1e-5)  # warm-up over: the same tasks
            elif name != "clean":
                l2_warm = float(tf.reduce_max(tf.norm(tf.reshape(a - x, [16, -1]), axis=1)))
                l2_plain = float(tf.reduce_max(tf.norm(tf.reshape(b - x, [16, -1]), axis=1)))
                assert l2_warm <= r * l2_plain * 1.5 + 1e-5 and l2_warm < l2_plain, (step, name)
    with pytest.raises(ConfigError, match=r"^mid\.eps_warmup_epochs "):
        MIDStageConfig(eps_warmup_epochs=-1).validate()
    from mid_tf.training.mid_stage import build_mid  # the stage counts the warm-up in optimizer steps
    cfg = MIDStageConfig(pool=pool_names, num_meta_train=k, eps_warmup_epochs=1.5)
    assert build_mid(models, cfg, seed=2, steps_per_epoch=4).pool.eps_warmup_steps == 6
    with pytest.raises(ConfigError, match=r"^mid\.eps_warmup_epochs needs the steps per epoch"):
        build_mid(models, cfg, seed=2)


def test_headline_eval_flagfile_changes_the_eval_stage_only():
    """configs/mnist_headline_eval.flags after a white-box flagfile: 10,000 images, PGD-100 x 5 (CE, margin) and
    standard AutoAttack; every training field as the white-box flagfile alone sets it."""
    repo = os.path.dirname(HERE)

    def config(*flagfiles):
        argv = ", ".join(repr(f"--flagfile={f}") for f in flagfiles)
        proc = subprocess.run([sys.executable, "-c", (
            "import sys, dataclasses, json; sys.argv=['train.py', %s, '--seed=1']; import train; "
            "from absl import flags; flags.FLAGS(sys.argv); cfg = train.build_config(); cfg.validate(); "
            "print('CFG=' + json.dumps(dataclasses.asdict(cfg), default=str))" % argv)],
            cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.split("CFG=", 1)[1])

    for base in ("configs/mnist_whitebox.flags", "configs/mnist_whitebox_encoder.flags"):
        alone, headline = config(base), config(base, "configs/mnist_headline_eval.flags")
        assert headline["data"]["eval_examples"] == 10000 and headline["eval_slow_examples"] == 10000
        assert headline["eval_whitebox_attacks"] == ["pgd100x5", "pgd100x5_margin", "autoattack"]
        assert headline["seed"] == 1
        for field in ("mid", "target", "teacher", "stages"):
            assert headline[field] == alone[field], field
