"""Stage 1 end to end on real MNIST, resumption after a kill, and the CLI's error paths."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from interrupt import Kill, KillAfter

from mid_tf import artifacts, stages
from mid_tf.config import ConfigError, DataConfig, RunConfig, StageTrainConfig
from mid_tf.models import build_models
from mid_tf.training import stage1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage1_in_mixed_bfloat16_lands_float32_networks(tmp_path, mnist_data_dir):
    """--stage1_precision=mixed_bfloat16 trains bfloat16 twins and copies them into the float32 networks,
    which are saved, reloaded and evaluated, as good as a float32 run; the global policy is restored."""
    def run(precision):
        c = dict(epochs=2, batch_size=64, precision=precision)
        cfg = RunConfig(model_dir=str(tmp_path / precision), verbose=0, width=0.25, stages=("target", "teacher"),
                        data=DataConfig(data_dir=mnist_data_dir, train_examples=3000, eval_examples=500),
                        target=StageTrainConfig(**c), teacher=StageTrainConfig(**c))
        return cfg, stages.run(cfg)["stages"]
    _, f32 = run("float32")
    cfg, bf16 = run("mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"
    assert bf16["target"]["precision"] == bf16["teacher"]["precision"] == "mixed_bfloat16"
    for stage in ("target", "teacher"):  # measured: 86.8 / 86.6% and 13.5 dB in both precisions
        assert bf16[stage]["clean_accuracy"] >= 0.8
        assert abs(bf16[stage]["clean_accuracy"] - f32[stage]["clean_accuracy"]) <= 0.03
    assert abs(bf16["teacher"]["reconstruction_psnr_db"] - f32["teacher"]["reconstruction_psnr_db"]) <= 1.0
    models = build_models("mnist", width=0.25)
    artifacts.load_stage(cfg.model_dir, "target", models)
    artifacts.load_stage(cfg.model_dir, "teacher", models)
    assert all(w.dtype == "float32" for net in (models.target, models.teacher_encoder, models.decoder)
               for w in net.weights)
    with pytest.raises(ConfigError, match="target.precision"):
        StageTrainConfig(precision="float16").validate("target")


def test_stage1_end_to_end_on_real_mnist(tmp_path, mnist_data_dir):
    cfg = RunConfig(model_dir=str(tmp_path / "run"), verbose=0, width=0.5,
                    data=DataConfig(data_dir=mnist_data_dir, train_examples=6000, eval_examples=1000),
                    target=StageTrainConfig(epochs=3, batch_size=64),
                    teacher=StageTrainConfig(epochs=3, batch_size=64))
    summary = stages.run(cfg)
    target, teacher = summary["stages"]["target"], summary["stages"]["teacher"]
    assert target["clean_accuracy"] >= 0.93
    assert teacher["clean_accuracy"] >= 0.90
    # 3 small epochs give ~20 dB (a decoder that learned nothing: ~11 dB); float round-off alone moves
    # it by ~0.2 dB (same maths, another summation order), so the bar sits below that noise.
    assert teacher["reconstruction_psnr_db"] >= 19.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["stages"]["teacher"]["clean_accuracy"] == teacher["clean_accuracy"]
    assert on_disk["eval_examples"] == 1000 and on_disk["dataset"] == "mnist"
    assert os.listdir(tmp_path / "run" / "logs" / "teacher")  # TensorBoard events
    # A rerun loads the completed stages instead of training them again.
    again = stages.run(cfg)
    assert again["stages"]["teacher"]["clean_accuracy"] == teacher["clean_accuracy"]
    assert again["stages"]["target"]["train_time_s"] == target["train_time_s"]



def _train(split, tmp, callbacks=()):
    keras.utils.set_random_seed(7)
    models = build_models("mnist", width=0.25)
    cfg = StageTrainConfig(epochs=2, batch_size=64)  # 16 steps per epoch on 1,024 examples
    resumed = stage1.train_target(models, split, cfg, seed=7, model_dir=str(tmp), checkpoint_every=5,
                                  verbose=0, callbacks=callbacks)
    return models, resumed


def test_interrupted_training_resumes_from_the_step_it_reached(tmp_path, mnist_small):
    from mid_tf.data import Split
    train = Split(mnist_small[0].images[:1024], mnist_small[0].labels[:1024], "test")
    with pytest.raises(Kill):
        _train(train, tmp_path / "a", callbacks=[KillAfter(23)])  # killed in epoch 2, after step 23
    models, resumed = _train(train, tmp_path / "a")  # "rerun the same command"
    assert resumed == 20  # last checkpoint before the kill, not 0
    assert int(models.target.optimizer.iterations.numpy()) == 32
    reference, fresh = _train(train, tmp_path / "b")  # never interrupted
    assert fresh == 0
    for a, b in zip(models.target.get_weights(), reference.target.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_validation_names_the_field(tmp_path):
    for cfg, field in ((RunConfig(model_dir=str(tmp_path), stages=("target", "bogus")), "stages"),
                       (RunConfig(model_dir=str(tmp_path), data=DataConfig(train_examples=0)), "data.train_examples"),
                       (RunConfig(model_dir=str(tmp_path), target=StageTrainConfig(learning_rate=-1.0)),
                        "target.learning_rate")):
        with pytest.raises(ConfigError) as info:
            cfg.validate()
        assert info.value.field == field and str(info.value).startswith(field)


def test_every_config_field_error_translates_to_a_flag():
    """The app names the flag for every field it sets (mid_tf/cli/train.py), and its flag defaults are the
    config's defaults: one home for each."""
    from absl import flags

    from mid_tf import config
    from mid_tf.cli import train as app
    err = config.ConfigError("mid.alpha", "must be >= 0, got -1")
    assert app.explain(err) == "--meta_alpha must be >= 0, got -1"
    assert app.explain(config.ConfigError("teacher.batch_size", "x")) == "--batch_size x"
    for flag, field in app.FIELDS.items():
        default = flags.FLAGS[flag].default
        expected = config.default(field)
        if isinstance(expected, tuple):
            expected = [str(v) for v in expected] if isinstance(default, list) else ",".join(map(str, expected))
        assert default == expected, (flag, default, expected)


def test_model_dir_of_another_run_is_refused(tmp_path):
    artifacts.check_run_identity(str(tmp_path), {"dataset": "mnist", "width": 1.0, "seed": 0})
    artifacts.check_run_identity(str(tmp_path), {"dataset": "mnist", "width": 1.0, "seed": 0})
    with pytest.raises(artifacts.ArtifactError, match="new --model_dir"):
        artifacts.check_run_identity(str(tmp_path), {"dataset": "mnist", "width": 0.5, "seed": 0})


def test_load_models_requires_completed_stages(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="not a mid_tf model_dir"):
        artifacts.load_models(str(tmp_path))
    artifacts.check_run_identity(str(tmp_path), {"dataset": "mnist", "width": 0.25, "seed": 0})
    with pytest.raises(artifacts.ArtifactError, match="has not completed"):
        artifacts.load_models(str(tmp_path), stages=("teacher",))


@pytest.mark.parametrize("args,needle", [(["--width=-1"], "--width must be positive"),
                                         (["--batch_size=0"], "--batch_size must be positive"),
                                         (["--meta_order=3"], "--meta_order must be one of 1, 2"),
                                         (["--attack_pool=clean,nonsense"], "--attack_pool"),
                                         (["--eval_attacks=fgsm,bogus"], "--eval_attacks has an attack"),
                                         (["--stages=target,bogus"], "--stages has unknown stage"),
                                         (["--regen_attack=bogus"], "--regen_attack has an attack"),
                                         (["--regen_attack=autoattack"], "--regen_attack must be a graph-safe")])
def test_cli_rejects_bad_flags(tmp_path, mnist_data_dir, args, needle):
    proc = subprocess.run([sys.executable, "train.py", "--flagfile=configs/mnist.flags",
                           f"--model_dir={tmp_path}", f"--data_dir={mnist_data_dir}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
