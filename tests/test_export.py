"""Export for TF Serving: signatures and names, fresh-process equality with Keras, atomic versions,
warmup records, models.config, request limits, the model card, cleanup after killed exports, and the
export.py CLI (refusals included)."""

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
from mid_tf.export import (ExportError, ServingLimits, build_card, clean_stale, export_model, next_version,
                           read_export_json, read_model_card, verify_export)
from mid_tf.export import card as card_lib
from mid_tf.export import publish, savedmodel, warmup
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


def unevaluated(models, base, **kwargs):
    """An export of the tiny untrained models: no eval stage ran, so it must be asked for."""
    return export_model(models, base, allow_unevaluated=True, **kwargs)


def images01(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28, 1)) / 255.0).astype(np.float32)


def done_run(model_dir: str):
    """A model_dir with all three stages marked done (tiny, untrained weights); returns its models."""
    models = tiny_models()
    artifacts.check_run_identity(model_dir, IDENTITY)
    for stage in ("target", "teacher", "mid"):
        artifacts.mark_done(model_dir, stage, models, {})
    return models


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model_dir with all three stages done and its models."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    return model_dir, done_run(model_dir)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model_dir, models = trained
    base = str(tmp_path_factory.mktemp("exports") / "mid_mnist")
    # With the compiled training kernels on whatever this CPU's default (kernels/xla.py): the export
    # must still trace the stock ones (test_served_graph_holds_standard_kernels_only).
    from mid_tf.kernels import xla
    previous = xla.configure("on")
    try:
        path = export_model(models, base, metadata={"source_model_dir": model_dir, "dataset": "mnist"},
                            allow_unevaluated=True)
    finally:
        xla.configure(previous)
    return base, path, models


def test_signatures_have_stable_names_and_no_output_0(exported):
    _, path, _ = exported
    loaded = tf.saved_model.load(path)
    sigs = loaded.signatures
    assert {"serving_default", "regenerate", "classify_encoded"} <= set(sigs.keys())
    for name in ("serving_default", "classify_encoded"):
        assert set(sigs[name].structured_outputs) == {"logits", "probabilities", "classes", "class_names"}
        assert sigs[name].structured_outputs["class_names"].dtype == tf.string
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
        assert all(np.all(np.isfinite(v.numpy())) for v in outputs.values() if v.dtype != tf.string)


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
    assert unevaluated(models, base) == os.path.join(base, "1")
    assert unevaluated(models, base) == os.path.join(base, "2")
    assert next_version(base) == 3
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        unevaluated(models, base, version=2)
    marker = os.path.join(base, "2", "assets.extra", "export.json")
    before = os.path.getmtime(marker)
    assert unevaluated(models, base, version=2, overwrite=True) == os.path.join(base, "2")
    assert os.path.getmtime(marker) >= before and read_export_json(os.path.join(base, "2"))["version"] == 2
    assert sorted(n for n in os.listdir(base) if not n.startswith(".")) == ["1", "2", "models.config"]
    with pytest.raises(ExportError, match="positive integer"):
        unevaluated(models, base, version=0)


def test_interrupted_export_leaves_no_version_and_no_temp_dir(trained, tmp_path, monkeypatch):
    _, models = trained
    base = str(tmp_path / "m")
    unevaluated(models, base)
    seen = {}

    def interrupted(path, *args, **kwargs):  # runs after the SavedModel is written into the temp dir
        seen["tmp"] = os.path.dirname(os.path.dirname(path))
        seen["had_savedmodel"] = os.path.isfile(os.path.join(seen["tmp"], "saved_model.pb"))
        raise KeyboardInterrupt

    monkeypatch.setattr(warmup, "write_warmup_requests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unevaluated(models, base)
    assert seen["had_savedmodel"] and os.path.basename(seen["tmp"]).startswith(".tmp-")
    assert not os.path.exists(seen["tmp"])
    assert sorted(os.listdir(base)) == ["1", "models.config"]


REPORT = {  # the eval report's shape (mid_tf/evaluation/writers.py), numbers made up
    "schema": "mid_tf.eval_report/1", "created": "2026-01-02T03:04:05+00:00", "dataset": "mnist", "examples": 500,
    "models": ["target", "mid"], "pool": ["clean", "pgd10"],
    "attacks": {"fgsm": {"eps": 0.3, "examples": 500, "group": "unknown", "method": "fgm", "norm": "inf",
                         "spec": "fgsm", "targeted": False},
                "pgd40": {"eps": 0.3, "examples": 500, "group": "known", "method": "pgd", "norm": "inf",
                          "spec": "pgd40", "targeted": False},
                "cw_l2": {"eps": None, "examples": 100, "group": "unknown", "method": "cw_l2", "norm": 2.0,
                          "spec": "cw_l2", "targeted": False}},
    "clean": {"target": 0.991, "mid": 0.987},
    "transfer": {"fgsm": {"target": 0.02, "mid": 0.958}, "pgd40": {"target": 0.0, "mid": 0.994}},
    "whitebox": {"pgd40": {"target": 0.0, "mid": 0.031}, "cw_l2": {"target": 0.0, "mid": 0.0}},
    "summary": {"transfer": {"mid": {"worst": 0.958, "worst_attack": "fgsm"}}},
    "sanity": [{"flag": "whitebox_above_transfer", "model": "mid", "message": "made up", "numbers": {}}],
}
CONFIG = {"data": {"dataset": "mnist"}, "mid": {"pool": "clean,pgd10", "epochs": 1}, "width": 0.25}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A model_dir like `trained`, whose eval stage wrote its report and the run summary."""
    model_dir = str(tmp_path_factory.mktemp("evaluated"))
    done_run(model_dir)
    artifacts.write_json_atomic(os.path.join(model_dir, "eval", "report.json"), REPORT)
    artifacts.write_json_atomic(os.path.join(model_dir, "summary.json"), {"config": CONFIG, "stages": {}})
    return model_dir


def test_model_card_holds_config_commit_threat_model_and_headline(evaluated):
    card = build_card(evaluated)
    assert card["config"] == CONFIG and card["dataset"] == "mnist" and card["class_names"] == list("0123456789")
    assert card["source"]["model_dir"] == os.path.abspath(evaluated) and card["source"]["run"] == IDENTITY
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert card["source"]["commit"] == (head or "unknown")
    ev, threat = card["evaluation"], card["threat_model"]
    assert ev["status"] == "evaluated" and ev["source"] == "eval/report.json"
    assert ev["clean"] == REPORT["clean"] and ev["transfer"] == REPORT["transfer"]
    assert ev["whitebox"] == REPORT["whitebox"]
    assert threat["eps_by_norm"] == {"L2": ["no bound"], "Linf": ["0.3"]}
    assert threat["training_pool"] == ["clean", "pgd10"] and threat["attacks"]["pgd40"]["group"] == "known"
    text = card_lib.format_card(card)
    assert "| clean | 99.10 | 98.70 |" in text and "| white-box pgd40 (Linf eps=0.3, known) | 0.00 | 3.10 |" in text
    assert "whitebox_above_transfer (mid): made up" in text


def test_model_card_falls_back_to_the_summary_and_refuses_unevaluated_runs(trained, tmp_path):
    model_dir, _ = trained
    with pytest.raises(ExportError, match="has not been evaluated.*--stages=eval.*--allow_unevaluated"):
        build_card(model_dir)
    assert build_card(model_dir, allow_unevaluated=True)["evaluation"] == {"status": card_lib.NOT_EVALUATED}
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "run.json").write_text(json.dumps(IDENTITY))
    stage = {k: REPORT[k] for k in ("clean", "transfer", "whitebox", "summary", "examples")}
    (run / "summary.json").write_text(json.dumps({"config": CONFIG, "stages": {"eval": dict(stage, models="target,mid")}}))
    card = build_card(str(run))
    assert card["evaluation"]["clean"] == REPORT["clean"] and card["evaluation"]["models"] == ["target", "mid"]
    assert sorted(card["threat_model"]["attacks"]) == ["cw_l2", "fgsm", "pgd40"]
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps(dict(REPORT, dataset="cifar10")))
    with pytest.raises(ExportError, match="belongs to another run"):
        build_card(str(run))
    (run / "eval" / "report.json").write_text(json.dumps(dict(REPORT, models=["target", "trades"])))
    with pytest.raises(ExportError, match=r"not the MID pipeline.*rerun the eval stage \(--stages=eval\)"):
        build_card(str(run))
    (run / "eval" / "report.json").write_text(json.dumps({"clean": []}))
    with pytest.raises(ExportError, match="not an eval report"):
        build_card(str(run))
    (run / "run.json").write_text("{}")
    with pytest.raises(ExportError, match="names no known dataset"):
        build_card(str(run))


def test_limits_reject_oversized_requests_with_invalid_argument(trained, tmp_path):
    """In-process, the SavedModel's own signatures: InvalidArgumentError is what TF Serving turns into
    INVALID_ARGUMENT (over the wire: tests/test_serving.py)."""
    _, models = trained
    limits = ServingLimits(max_batch=4, max_image_bytes=2048)
    path = unevaluated(models, str(tmp_path / "m"), limits=limits)
    assert read_export_json(path)["limits"] == {"max_batch": 4, "max_image_bytes": 2048}
    assert read_model_card(path)["input"]["limits"] == read_export_json(path)["limits"]
    sigs = tf.saved_model.load(path).signatures
    rng = np.random.default_rng(0)

    def png(h, w):
        return warmup.png_bytes(rng.uniform(0, 1, size=(h, w, 1)))

    jpeg = tf.io.encode_jpeg(np.zeros((28, 28, 1), np.uint8)).numpy()
    assert sigs["classify_encoded"](image_bytes=tf.constant([png(28, 28), jpeg]))["classes"].shape == (2,)
    bomb = png(28, 28)[:16] + (30000).to_bytes(4, "big") * 2 + png(28, 28)[24:]  # declares 30000x30000
    cases = [("serving_default", {"image": tf.constant(images01(5))}, "at most 4 images"),
             ("regenerate", {"image": tf.constant(images01(5))}, "at most 4 images"),
             ("classify_encoded", {"image_bytes": tf.constant([png(28, 28)] * 5)}, "at most 4 images"),
             ("classify_encoded", {"image_bytes": tf.constant([png(28, 28), png(80, 80)])}, "1 to 2048 bytes"),
             ("classify_encoded", {"image_bytes": tf.constant([png(32, 32)])}, "must be 28x28 pixels"),
             ("classify_encoded", {"image_bytes": tf.constant([bomb])}, "[30000] [widths] [30000]"),
             ("classify_encoded", {"image_bytes": tf.constant([b"GIF89a" + b"\0" * 40])}, "PNG or JPEG files"),
             ("classify_encoded", {"image_bytes": tf.constant([], tf.string)}, "1 or more")]
    for signature, inputs, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            sigs[signature](**inputs)
        assert message in info.value.message, (signature, message, info.value.message[:300])
    with pytest.raises(ExportError, match="max_image_bytes=100 is below"):
        unevaluated(models, str(tmp_path / "m"), limits=ServingLimits(max_image_bytes=100))
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        ServingLimits(max_batch=0)


def test_exports_refuse_a_missing_or_unevaluated_card(trained, tmp_path):
    _, models = trained
    with pytest.raises(ExportError, match="no model card"):
        export_model(models, str(tmp_path / "m"))
    with pytest.raises(ExportError, match="not evaluated"):
        export_model(models, str(tmp_path / "m"), model_card=card_lib.unevaluated_card("mnist"))
    assert not os.path.exists(tmp_path / "m" / "1")


def test_leftovers_of_killed_exports_are_cleaned_up(trained, tmp_path):
    """A SIGKILLed export leaves `.tmp-<pid>-*` and `<N>.old-<pid>`: the next export removes those of dead
    processes (or of a pid reused since), restores a version caught between its two renames, and leaves
    a running export's work alone."""
    _, models = trained
    base = tmp_path / "m"
    unevaluated(models, str(base))  # version 1
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "120"])
    try:
        for name in (f".tmp-{dead.pid}-2", f".tmp-{alive.pid}-3", f".tmp-{alive.pid}-4", f"1.old-{dead.pid}"):
            os.makedirs(base / name)
        (base / f".tmp-{dead.pid}-abc.config").write_text("partial")
        os.rename(base / "1", base / f"7.old-{dead.pid}")  # killed after moving 7 aside: 7 is missing
        hour_ago = os.path.getmtime(base / f".tmp-{alive.pid}-4") - 3600
        os.utime(base / f".tmp-{alive.pid}-4", (hour_ago, hour_ago))  # older than the process with that pid
        actions = clean_stale(str(base))
        assert sorted(os.listdir(base)) == [f".tmp-{alive.pid}-3", "7", "models.config"], actions
        assert any(a.startswith("restored") for a in actions) and len(actions) == 5
        assert os.path.isfile(base / "7" / "saved_model.pb")
        assert publish.owner_is_gone(dead.pid, 0.0) and not publish.owner_is_gone(alive.pid, 1e12)
        (base / f".tmp-{dead.pid}-9").mkdir()
        assert unevaluated(models, str(base)) == str(base / "8")  # export_model cleans up first
        assert not (base / f".tmp-{dead.pid}-9").exists() and (base / f".tmp-{alive.pid}-3").exists()
    finally:
        alive.kill()
        alive.wait()


def _cli(args, timeout=300, module=None):
    cmd = [sys.executable, *(["-m", module] if module else [os.path.join(REPO, "export.py")]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_export_cli_writes_the_card_and_verifies(evaluated, tmp_path):
    base = str(tmp_path / "mid_mnist")
    proc = _cli([f"--model_dir={evaluated}", f"--export_base={base}", "--max_batch=128"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported mid_mnist version 1" in proc.stdout and "limits per request: 128 images" in proc.stdout
    diff = float(proc.stdout.split("max |SavedModel - Keras| = ")[1].split()[0])
    assert diff <= 1e-5
    info = read_export_json(os.path.join(base, "1"))
    assert info["verification"]["classes_match"] is True and info["limits"]["max_batch"] == 128
    assert info["model_card"]["evaluated"] is True
    card = read_model_card(os.path.join(base, "1"))
    assert card["config"] == CONFIG and card["evaluation"]["clean"] == REPORT["clean"]
    assert card["input"]["image"]["shape"] == [-1, 28, 28, 1] and card["input"]["limits"]["max_batch"] == 128
    proc = _cli(["--info", f"--export_dir={base}"], timeout=120, module="mid_tf.serving.client")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# Model card: MID on mnist" in proc.stdout and "| clean | 99.10 | 98.70 |" in proc.stdout
    assert "at most 128 images" in proc.stdout and os.path.join(base, "1") in proc.stdout


def test_export_cli_refusals_are_one_line_and_status_2(trained, tmp_path):
    model_dir, _ = trained
    base = str(tmp_path / "mid_mnist")
    os.makedirs(os.path.join(base, "1"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    cases = [([f"--model_dir={model_dir}"], "has not been evaluated"),
             ([f"--model_dir={model_dir}", "--allow_unevaluated", "--version=1"], "already exists"),
             (["--model_dir=/nonexistent"], "no run.json"),
             ([f"--model_dir={empty}"], "names no known dataset"),
             ([f"--model_dir={model_dir}", "--allow_unevaluated", "--max_image_bytes=50"], "is below the size")]
    for extra, message in cases:
        proc = _cli([f"--export_base={base}", *extra], timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and err and err[-1].startswith("error:") and message in err[-1], proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(base)) == ["1"]
