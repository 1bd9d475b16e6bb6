"""Export for TF Serving: signatures and names, fresh-process equality with Keras, atomic versions,
warmup records, models.config, and the export.py CLI."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from mid_tf import artifacts
from mid_tf.export import ExportError, export_model, next_version, read_export_json, verify_export
from mid_tf.export import savedmodel, warmup
from mid_tf.models import build_models, build_pipeline, build_regenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENTITY = {"dataset": "mnist", "width": 0.25, "seed": 0}


def tiny_models(seed=0):
    keras.utils.set_random_seed(seed)
    return build_models("mnist", width=0.25)


def keras_outputs(models, images):
    logits = np.asarray(build_pipeline(models.student_encoder, models.classifier)(images))
    regen = np.clip(np.asarray(build_regenerator(models.student_encoder, models.decoder)(images)), 0, 1)
    return logits, regen


def images01(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28, 1)) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model_dir with all three stages marked done (tiny, untrained weights) and its models."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    models = tiny_models()
    artifacts.check_run_identity(model_dir, IDENTITY)
    for stage in ("target", "teacher", "mid"):
        artifacts.mark_done(model_dir, stage, models, {})
    return model_dir, models


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model_dir, models = trained
    base = str(tmp_path_factory.mktemp("exports") / "mid_mnist")
    # With the compiled training kernels on whatever this CPU's default (kernels/xla.py): the export
    # must still trace the stock ones (test_served_graph_holds_standard_kernels_only).
    from mid_tf.kernels import xla
    previous = xla.configure("on")
    try:
        path = export_model(models, base, metadata={"source_model_dir": model_dir, "dataset": "mnist"})
    finally:
        xla.configure(previous)
    return base, path, models


def test_signatures_have_stable_names_and_no_output_0(exported):
    _, path, _ = exported
    loaded = tf.saved_model.load(path)
    sigs = loaded.signatures
    assert {"serving_default", "regenerate", "classify_encoded"} <= set(sigs.keys())
    assert set(sigs["serving_default"].structured_outputs) == {"logits", "probabilities", "classes"}
    assert set(sigs["classify_encoded"].structured_outputs) == {"logits", "probabilities", "classes"}
    assert set(sigs["regenerate"].structured_outputs) == {"image"}
    assert list(sigs["serving_default"].structured_input_signature[1]) == ["image"]
    assert list(sigs["classify_encoded"].structured_input_signature[1]) == ["image_bytes"]
    assert sigs["serving_default"].structured_outputs["classes"].dtype == tf.int64
    summary = savedmodel.signature_summary(path)  # what `saved_model_cli show --all` prints
    assert summary["serving_default"]["outputs"]["logits"] == {"dtype": "float32", "shape": [-1, 10]}
    assert summary["regenerate"]["outputs"]["image"]["shape"] == [-1, 28, 28, 1]
    assert summary["classify_encoded"]["inputs"]["image_bytes"] == {"dtype": "string", "shape": [-1]}
    assert "output_0" not in json.dumps(summary)


def test_served_graph_holds_standard_kernels_only(exported):
    """Training uses XLA-compiled pooling/conv kernels (kernels/xla.py); the export must not."""
    from tensorflow.core.protobuf import saved_model_pb2
    _, path, _ = exported
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    library = sm.meta_graphs[0].graph_def.library
    compiled = [f.signature.name for f in library.function if f.attr["_XlaMustCompile"].b]
    op_types = {n.op for f in library.function for n in f.node_def}
    assert not compiled, f"XLA-compiled functions in the SavedModel: {compiled}"
    assert "MaxPool" in op_types  # the stock pooling, i.e. the switch really applied while tracing


def test_fresh_tensorflow_only_process_matches_keras(exported, tmp_path):
    _, path, models = exported
    images = images01()
    pngs = {f"png_{i}": np.frombuffer(warmup.png_bytes(img), np.uint8) for i, img in enumerate(images)}
    np.savez(tmp_path / "in.npz", image=images, **pngs)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fresh_process_check.py"), path,
                           str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    logits, regen = keras_outputs(models, images)
    for sig in ("serving_default", "classify_encoded"):
        assert np.max(np.abs(got[f"{sig}/logits"] - logits)) <= 1e-5
        assert np.max(np.abs(got[f"{sig}/probabilities"] - tf.nn.softmax(logits).numpy())) <= 1e-5
        np.testing.assert_array_equal(got[f"{sig}/classes"], logits.argmax(-1))
    assert np.max(np.abs(got["regenerate/image"] - regen)) <= 1e-5
    assert got["regenerate/image"].min() >= 0.0 and got["regenerate/image"].max() <= 1.0


def test_verification_catches_a_model_that_differs(exported):
    _, path, _ = exported  # (that it passes for the right models: the export.py test below)
    other = tiny_models(seed=123)  # same architecture, other weights: must not pass as equal
    report = verify_export(path, other, num_images=4)
    assert report["max_abs_diff"] > 1e-3


def test_warmup_file_holds_a_predict_request_per_signature_that_runs(exported):
    _, path, _ = exported
    logs = warmup.read_warmup_requests(os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))
    assert 1 <= len(logs) <= 1000
    requests = [log.predict_log.request for log in logs]
    assert sorted(r.model_spec.signature_name for r in requests) == ["classify_encoded", "regenerate",
                                                                     "serving_default"]
    signatures = tf.saved_model.load(path).signatures
    for r in requests:  # replay them as the model server does at load time
        outputs = signatures[r.model_spec.signature_name](
            **{k: tf.constant(tf.make_ndarray(v)) for k, v in r.inputs.items()})
        assert all(np.all(np.isfinite(v.numpy())) for v in outputs.values())


def test_models_config_and_export_json(exported, trained):
    base, path, _ = exported
    config = text_format.Parse(open(os.path.join(base, "models.config")).read(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("mid_mnist", "/models/mid_mnist", "tensorflow")
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    text = warmup.models_config_text("m", "/models/m", policy="all", version_labels={"stable": 1})
    parsed = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config[0]
    assert parsed.model_version_policy.WhichOneof("policy_choice") == "all"
    assert dict(parsed.version_labels) == {"stable": 1}
    info = read_export_json(path)
    assert info["source_model_dir"] == trained[0] and info["dataset"] == "mnist" and info["version"] == 1
    assert sorted(info["signatures"]) == ["classify_encoded", "regenerate", "serving_default"]
    assert info["input_shape"] == [28, 28, 1]


def test_versions_are_numbered_refused_when_taken_and_overwritable(trained, tmp_path):
    _, models = trained
    base = str(tmp_path / "m")
    os.makedirs(os.path.join(base, ".tmp-999-7"))  # a leftover temp dir is not a version
    assert export_model(models, base) == os.path.join(base, "1")
    assert export_model(models, base) == os.path.join(base, "2")
    assert next_version(base) == 3
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_model(models, base, version=2)
    marker = os.path.join(base, "2", "assets.extra", "export.json")
    before = os.path.getmtime(marker)
    assert export_model(models, base, version=2, overwrite=True) == os.path.join(base, "2")
    assert os.path.getmtime(marker) >= before and read_export_json(os.path.join(base, "2"))["version"] == 2
    assert sorted(n for n in os.listdir(base) if not n.startswith(".")) == ["1", "2", "models.config"]
    with pytest.raises(ExportError, match="positive integer"):
        export_model(models, base, version=0)


def test_interrupted_export_leaves_no_version_and_no_temp_dir(trained, tmp_path, monkeypatch):
    _, models = trained
    base = str(tmp_path / "m")
    export_model(models, base)
    seen = {}

    def interrupted(path, *args, **kwargs):  # runs after the SavedModel is written into the temp dir
        seen["tmp"] = os.path.dirname(os.path.dirname(path))
        seen["had_savedmodel"] = os.path.isfile(os.path.join(seen["tmp"], "saved_model.pb"))
        raise KeyboardInterrupt

    monkeypatch.setattr(warmup, "write_warmup_requests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(models, base)
    assert seen["had_savedmodel"] and os.path.basename(seen["tmp"]).startswith(".tmp-")
    assert not os.path.exists(seen["tmp"])
    assert sorted(os.listdir(base)) == ["1", "models.config"]


def test_export_cli_verifies_and_refuses_an_existing_version(trained, tmp_path):
    model_dir, _ = trained
    base = str(tmp_path / "mid_mnist")
    cmd = [sys.executable, os.path.join(REPO, "export.py"), f"--model_dir={model_dir}", f"--export_base={base}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported mid_mnist version 1" in proc.stdout
    diff = float(proc.stdout.split("max |SavedModel - Keras| = ")[1].split()[0])
    assert diff <= 1e-5
    assert read_export_json(os.path.join(base, "1"))["verification"]["classes_match"] is True
    for extra, message in [(["--version=1"], "already exists"), (["--model_dir=/nonexistent"], "no run.json")]:
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr
    assert sorted(os.listdir(base)) == ["1", "models.config"]
