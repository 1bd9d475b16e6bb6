"""Safe runs: configuration fingerprints, --retrain, the model_dir lock, the NaN/Inf guard, bad --model_dir."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mid_tf import artifacts, stages
from mid_tf.config import DataConfig, MIDStageConfig, RunConfig, StageTrainConfig
from mid_tf.training.resumable import NonFiniteError, fit_resumable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = "clean,fgsm,pgd10:nb_iter=2"


def _tiny(model_dir, data_dir, **kw) -> RunConfig:
    """Every stage of target, teacher, mid with 0 epochs: the whole pipeline in seconds."""
    base = dict(model_dir=str(model_dir), verbose=0, width=0.25, stages=("target", "teacher", "mid"),
                data=DataConfig(data_dir=data_dir, train_examples=256, eval_examples=64),
                target=StageTrainConfig(epochs=0, batch_size=64), teacher=StageTrainConfig(epochs=0, batch_size=64),
                mid=MIDStageConfig(epochs=0, batch_size=64, val_examples=0, pool=POOL))
    base.update(kw)
    return RunConfig(**base)


def _cli(*args, timeout=180):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def _cli_args(model_dir, data_dir):
    return [f"--model_dir={model_dir}", f"--data_dir={data_dir}", "--dataset=mnist", "--train_examples=256",
            "--eval_examples=64", "--width=0.25", "--batch_size=64", "--verbose=0", "--stage1_precision=float32",
            "--mid_precision=float32", f"--attack_pool={POOL}", "--val_examples=0"]


def test_fingerprint_fields_are_what_the_stage_depends_on():
    cfg = RunConfig(model_dir="m")
    target, mid = stages.fingerprint(cfg, "target"), stages.fingerprint(cfg, "mid")
    assert target["target.epochs"] == cfg.target.epochs and target["seed"] == 0 and "data.data_dir" not in target
    assert "target.reconstruction_weight" not in target and "checkpoint_every" not in target
    assert set(target) <= set(mid) and "teacher.epochs" in mid and "mid.alpha" in mid  # built on target, teacher
    assert mid["mid.train_weights"] == [1.0, 1.5, 0.8]  # as JSON reads it back
    for logging_only in ("mid.val_examples", "mid.val_attacks", "mid.log_every_steps", "mid.attack_cache_overlap"):
        assert logging_only not in mid
    assert "baseline.trades_beta" in stages.fingerprint(cfg, "trades")
    assert "baseline.trades_beta" not in stages.fingerprint(cfg, "pgd_at")
    assert set(stages.FINGERPRINT_FIELDS) == set(stages.STAGES)
    assert stages.dependents("target") == ("mid", "regen") and stages.dependents("mid") == ("regen",)
    assert stages.dependents("regen") == ()


def test_changed_setting_of_a_done_stage_fails_before_training_and_names_the_fix(tmp_path, mnist_data_dir):
    model_dir = tmp_path / "run"
    stages.run(_tiny(model_dir, mnist_data_dir))
    before = (model_dir / "target" / "done.json").read_text()
    assert json.loads(before)["fingerprint"]["target.epochs"] == 0
    proc = _cli(*_cli_args(model_dir, mnist_data_dir), "--stages=target,teacher,mid", "--target_epochs=4",
                "--teacher_epochs=0", "--mid_epochs=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr[proc.stderr.index("error: "):]
    assert "target.epochs 0 -> 4 (--target_epochs)" in err
    assert "--retrain=target" in err and "new --model_dir" in err and "also discards mid" in err
    assert "teacher" not in err  # unchanged stages are not listed
    assert (model_dir / "target" / "done.json").read_text() == before  # nothing ran
    assert not (model_dir / "target" / "ckpt").exists()


def test_retrain_discards_the_stage_and_those_built_on_it(tmp_path, mnist_data_dir):
    cfg = _tiny(tmp_path, mnist_data_dir)
    stages.run(cfg)
    changed = dataclasses.replace(cfg, stages=("target",), target=StageTrainConfig(epochs=1, batch_size=64))
    with pytest.raises(artifacts.FingerprintError) as info:
        stages.run(changed)
    assert info.value.mismatches == {"target": {"target.epochs": (0, 1)}}  # mid is not used by this run
    summary = stages.run(changed, retrain=("target",))
    assert summary["stages"]["target"]["epochs"] == 1
    assert artifacts.read_done(str(tmp_path), "target")["fingerprint"]["target.epochs"] == 1
    assert not os.path.exists(tmp_path / "mid")  # built on the old target: discarded
    assert artifacts.is_done(str(tmp_path), "teacher")  # not built on it: kept
    with pytest.raises(Exception, match="does not include 'teacher'"):
        stages.run(changed, retrain=("teacher",))


def test_started_stage_with_other_settings_is_refused_and_old_done_json_is_accepted(
        tmp_path, mnist_data_dir, monkeypatch, capsys):
    from mid_tf.training import stage1

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed()

    cfg = _tiny(tmp_path, mnist_data_dir, stages=("target",), target=StageTrainConfig(epochs=1, batch_size=64))
    monkeypatch.setattr(stage1, "train_target", killed)
    with pytest.raises(Killed):
        stages.run(cfg)  # the stage started (its config recorded), then died
    monkeypatch.undo()
    other = dataclasses.replace(cfg, target=StageTrainConfig(epochs=1, batch_size=64, learning_rate=0.01))
    with pytest.raises(artifacts.FingerprintError) as info:
        stages.run(other)
    assert info.value.in_progress == {"target"} and "started, not done" in str(info.value)
    assert "target.learning_rate 0.001 -> 0.01" in str(info.value)
    stages.run(cfg)  # the same settings resume it
    # A done.json from before fingerprints: reused as it is, with a note.
    done = artifacts.read_done(str(tmp_path), "target")
    del done["fingerprint"]
    artifacts.write_json_atomic(str(tmp_path / "target" / "done.json"), done)
    os.remove(tmp_path / "target" / "config.json")
    capsys.readouterr()
    stages.run(other)
    assert "before configurations were recorded" in capsys.readouterr().out
    assert "fingerprint" not in artifacts.read_done(str(tmp_path), "target")  # not vouched for afterwards


def test_train_clock_counts_each_interrupted_run_up_to_its_last_checkpoint(tmp_path):
    model_dir, ckpt = str(tmp_path), tmp_path / "target" / "ckpt"
    assert artifacts.start_train_clock(model_dir, "target", now=1000.0) == 0.0  # fresh: nothing before
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint").write_text("model_checkpoint_path: \"ckpt-8\"\n")
    os.utime(ckpt / "checkpoint", (1100.0, 1100.0))  # the first run's last checkpoint; killed at 1130 (unseen)
    assert artifacts.start_train_clock(model_dir, "target", now=2000.0) == 100.0
    # The second run is killed before its first checkpoint: it kept nothing, the first run's 100 s stay.
    assert artifacts.start_train_clock(model_dir, "target", now=3000.0) == 100.0
    os.utime(ckpt / "checkpoint", (3050.0, 3050.0))
    assert artifacts.start_train_clock(model_dir, "target", now=4000.0) == 150.0
    # Checkpoints from before the clock existed: the earlier time is unknown, and stays unknown.
    (tmp_path / "target" / "train_clock.json").unlink()
    assert artifacts.start_train_clock(model_dir, "target", now=5000.0) is None
    assert artifacts.start_train_clock(model_dir, "target", now=6000.0) is None


def test_a_second_process_on_a_model_dir_fails_fast_and_a_dead_ones_lock_is_taken_over(tmp_path, mnist_data_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mid_tf import artifacts\n"
         "with artifacts.lock_model_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(300)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _cli(*_cli_args(tmp_path, mnist_data_dir), "--stages=target", "--target_epochs=0")
        assert proc.returncode == 2 and f"in use by another mid_tf process (pid {holder.pid})" in proc.stderr
        with pytest.raises(artifacts.ArtifactError, match=f"pid {holder.pid}"):
            with artifacts.lock_model_dir(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").read_text().strip() == str(holder.pid)  # left behind by the dead holder
    with artifacts.lock_model_dir(str(tmp_path)):  # taken over
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_eval_helpers_work_under_the_main_process_lock(tmp_path, mnist_data_dir):
    cfg = _tiny(tmp_path, mnist_data_dir, eval_attacks=("fgsm",), eval_whitebox_attacks=(), eval_eps_sweep=())
    stages.run(cfg)
    helper = dataclasses.replace(cfg, stages=("eval",), eval_helper=True)
    with artifacts.lock_model_dir(str(tmp_path)):  # as the main process holds it while its helpers run
        with pytest.raises(artifacts.ArtifactError, match=f"pid {os.getpid()}"):
            stages.run(dataclasses.replace(cfg, stages=("eval",)))
        assert stages.run(helper)["stages"]["eval"]["helper"] is True


def test_model_dir_naming_a_file_is_a_clear_error(tmp_path, mnist_data_dir):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    proc = _cli(*_cli_args(path, mnist_data_dir), "--stages=target", "--target_epochs=0")
    assert proc.returncode == 2 and f"{path} is a file, not a directory" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(artifacts.ArtifactError, match=f"{path} is a file, not a directory"):
        artifacts.check_model_dir(str(path / "below"))
    artifacts.check_model_dir(str(tmp_path / "new" / "dir"))  # missing directories are fine: they are created


def test_diverging_stage_stops_with_a_clear_error_and_writes_no_nan_checkpoint(tmp_path, mnist_data_dir):
    proc = _cli(*_cli_args(tmp_path, mnist_data_dir), "--stages=target", "--target_epochs=2", "--target_lr=1e30",
                "--checkpoint_every=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage target diverged at step" in proc.stderr
    assert "lower the learning rate (--target_lr, target.learning_rate, now 1e+30)" in proc.stderr
    assert "--retrain=target" in proc.stderr and not artifacts.is_done(str(tmp_path), "target")
    ckpt_dir = tmp_path / "target" / "ckpt"
    paths = tf.train.get_checkpoint_state(str(ckpt_dir)).all_model_checkpoint_paths
    assert paths  # the checkpoints before the divergence (every step here) are kept
    for path in paths:
        reader = tf.train.load_checkpoint(path)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(name)).all(), (path, name)


class _Poison(keras.callbacks.Callback):
    """After step `at` (behind the checkpointing callback): NaN into the kernel or into Adam's first moment."""

    def __init__(self, at: int, where: str):
        super().__init__()
        self.at, self.where, self.snapshots = at, where, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.snapshots[step] = self.model.layers[0].kernel.numpy().copy()
        if step == self.at:
            var = self.model.layers[0].kernel
            if self.where == "optimizer":
                var = next(v for v in self.model.optimizer.variables if "momentum" in v.path and "kernel" in v.path)
            var.assign(np.full(var.shape, np.nan, np.float32))


@pytest.mark.parametrize("where,at,stops_at,reason", [("weights", 5, 6, "loss is nan"),
                                                       ("optimizer", 3, 4, "holds NaN/Inf")])
def _dense():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("where,at,stops_at,reason", [("weights", 5, 6, "loss is nan"),
                                                       ("optimizer", 3, 4, "holds NaN/Inf")])
def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, where, at, stops_at, reason):
    keras.utils.set_random_seed(0)
    model, poison = _dense(), _Poison(at, where)
    x, y = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32), np.zeros((64, 3), np.float32)
    with pytest.raises(NonFiniteError, match=reason) as info:
        fit_resumable(model, lambda start: tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(),
                      epochs=2, steps_per_epoch=8, ckpt_dir=str(tmp_path), checkpoint_every=2, callbacks=[poison],
                      verbose=0)
    good = stops_at - 2  # the checkpoint before the poison took effect
    assert info.value.step == stops_at and info.value.last_checkpoint.endswith(f"ckpt-{good}")
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith(f"ckpt-{good}")
    restored = _dense()
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(str(tmp_path / f"ckpt-{good}"))
    np.testing.assert_array_equal(restored.layers[0].kernel.numpy(), poison.snapshots[good])  # intact
    assert all(np.isfinite(v.numpy()).all() for v in restored.optimizer.variables)


def test_the_decoders_unpooling_is_fixed_for_a_model_dir_and_reloaded_with_it(tmp_path, mnist_data_dir):
    model_dir = tmp_path / "nearest"
    stages.run(_tiny(model_dir, mnist_data_dir, decoder_unpool="nearest"))
    assert json.loads((model_dir / "run.json").read_text())["decoder_unpool"] == "nearest"
    models = artifacts.load_models(str(model_dir), stages=("target", "teacher", "mid"))
    assert models.decoder_unpool == "nearest" and models.student_decoder is not None
    # Resuming with the default (switches) would load these weights into another decoder: refused, exit 2.
    proc = _cli(*_cli_args(model_dir, mnist_data_dir), "--stages=target", "--target_epochs=0")
    assert proc.returncode == 2 and "decoder_unpool" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # A model_dir of the default records nothing new in run.json and still resumes with the default.
    stages.run(_tiny(tmp_path / "switches", mnist_data_dir))
    assert "decoder_unpool" not in json.loads((tmp_path / "switches" / "run.json").read_text())
    stages.run(_tiny(tmp_path / "switches", mnist_data_dir))
    proc = _cli(*_cli_args(tmp_path / "x", mnist_data_dir), "--stages=target", "--decoder_unpool=bilinear")
    assert proc.returncode == 2 and "decoder_unpool must be one of switches, nearest" in proc.stderr, proc.stderr
    identity = json.loads((model_dir / "run.json").read_text())
    (model_dir / "run.json").write_text(json.dumps({**identity, "decoder_unpool": "bilinear"}))
    with pytest.raises(artifacts.ArtifactError, match="unknown decoder_unpool 'bilinear'"):
        artifacts.load_models(str(model_dir))
