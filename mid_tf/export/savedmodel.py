"""The deployed MID model as a TF-Serving SavedModel, written atomically as `<export_base>/<version>/`.

Why a hand-written `tf.Module` rather than `model.export()`: Keras names the outputs `output_0`, has
one endpoint per model, and validates nothing. TF Serving clients need stable, named tensors, several
signatures over the same weights, and errors that say what was wrong with the request:

  serving_default   image float32 [batch, H, W, C] in [0, 1] -> logits, probabilities, classes (int64)
  regenerate        image                                    -> image  (D_t(E_s(x)), clipped to [0, 1])
  classify_encoded  image_bytes string [batch] (PNG/JPEG)    -> logits, probabilities, classes

The `image` input is declared [-1, -1, -1, -1] on purpose: a wrong height, width or channel count then
reaches the in-graph checks and comes back as INVALID_ARGUMENT with a message naming the expected
shape, instead of an opaque error from deep inside a convolution. The expected shape is in the
messages, in `assets.extra/export.json`, and in docs/serving.md.

TF Serving loads any integer-named directory it sees, so a version is written into a temporary
sibling (`.tmp-<pid>-<version>`, not an integer) and renamed into place only once it is complete.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from mid_tf.export import warmup as warmup_lib
from mid_tf.kernels import xla
from mid_tf.models import build_pipeline, build_regenerator

SIGNATURES = ("serving_default", "regenerate", "classify_encoded")
CLASSIFY_OUTPUTS = ("logits", "probabilities", "classes")
EXPORT_JSON = "export.json"
ASSETS_EXTRA = "assets.extra"


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the fix."""


def _input_message(shape) -> str:
    h, w, c = shape
    return f"image must be float32 [batch, {h}, {w}, {c}] with values in [0, 1]"


def _checked_image(image, shape):
    """Asserts rank, H/W/C and the value range in-graph, then pins the static shape for the model."""
    h, w, c = shape
    message = _input_message(shape)
    dims = tf.shape(image)
    padded = tf.concat([dims, tf.zeros([4], tf.int32)], axis=0)[:4]  # no out-of-range slice for rank < 4
    # batch >= 1 too: an empty batch would otherwise fail obscurely inside the convolutions.
    shape_ok = tf.logical_and(tf.logical_and(tf.equal(tf.size(dims), 4), padded[0] > 0),
                              tf.reduce_all(tf.equal(padded[1:], tf.constant([h, w, c], tf.int32))))
    check_shape = tf.debugging.Assert(shape_ok, [message + "; got shape", dims], summarize=8,
                                      name="check_image_shape")
    with tf.control_dependencies([check_shape]):
        # `x >= 0 and x <= 1` is false for NaN, so NaN/inf are rejected as out of range too.
        in_range = tf.reduce_all(tf.logical_and(image >= 0.0, image <= 1.0))
        check_range = tf.debugging.Assert(
            in_range, [message + "; got min", tf.reduce_min(image), "max", tf.reduce_max(image)],
            name="check_image_range")
    with tf.control_dependencies([check_range]):
        image = tf.identity(image)
    return tf.ensure_shape(image, [None, h, w, c])


def _decode_images(image_bytes, shape):
    """PNG/JPEG bytes [batch] -> float32 [batch, H, W, C] in [0, 1], decoded and resized in-graph."""
    h, w, c = shape
    check = tf.debugging.Assert(tf.reduce_all(tf.strings.length(image_bytes) > 0),
                                ["image_bytes must hold encoded PNG or JPEG images (one per entry, "
                                 "none empty)"], name="check_image_bytes")

    def decode_one(data):
        img = tf.io.decode_image(data, channels=c, dtype=tf.float32, expand_animations=False)
        img = tf.image.resize(img, [h, w])
        return tf.ensure_shape(tf.clip_by_value(img, 0.0, 1.0), [h, w, c])

    with tf.control_dependencies([check]):
        image_bytes = tf.identity(image_bytes)
    return tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))


class MIDServingModule(tf.Module):
    """Holds the variables and the three signature functions (inference only, no training flags)."""

    def __init__(self, pipeline, regenerator, input_shape, num_classes):
        super().__init__(name="mid_serving")
        shape = tuple(int(d) for d in input_shape)
        seen, variables = set(), []
        for v in list(pipeline.weights) + list(regenerator.weights):  # E_s is shared: track it once
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v.value if hasattr(v, "value") else v)
        self.model_variables = variables  # every variable the functions capture must be tracked
        self.input_shape = list(shape)
        self.num_classes = int(num_classes)

        def classify_outputs(image):
            logits = tf.cast(pipeline(image, training=False), tf.float32)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}

        image_spec = tf.TensorSpec([None, None, None, None], tf.float32, name="image")
        bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")

        @tf.function(input_signature=[image_spec])
        def classify(image):
            return classify_outputs(_checked_image(image, shape))

        @tf.function(input_signature=[image_spec])
        def regenerate(image):
            out = regenerator(_checked_image(image, shape), training=False)
            return {"image": tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0)}

        @tf.function(input_signature=[bytes_spec])
        def classify_encoded(image_bytes):
            return classify_outputs(_decode_images(image_bytes, shape))

        self.classify = classify
        self.regenerate = regenerate
        self.classify_encoded = classify_encoded

    def signatures(self) -> dict:
        return {"serving_default": self.classify.get_concrete_function(),
                "regenerate": self.regenerate.get_concrete_function(),
                "classify_encoded": self.classify_encoded.get_concrete_function()}


def build_serving_module(models) -> MIDServingModule:
    """The deployed MID model: C(E_s(x)) for classification, D_t(E_s(x)) for regeneration."""
    return MIDServingModule(build_pipeline(models.student_encoder, models.student_classifier, name="mid_pipeline"),
                            build_regenerator(models.student_encoder, models.decoder, name="mid_regenerator"),
                            models.input_shape, models.num_classes)


def existing_versions(export_base: str) -> list[int]:
    """Integer-named subdirectories: what TF Serving would consider versions."""
    if not os.path.isdir(export_base):
        return []
    return sorted(int(n) for n in os.listdir(export_base)
                  if n.isdigit() and os.path.isdir(os.path.join(export_base, n)))


def next_version(export_base: str) -> int:
    versions = existing_versions(export_base)
    return versions[-1] + 1 if versions else 1


def signature_summary(path: str) -> dict:
    """{signature: {inputs: {name: [dtype, shape]}, outputs: {...}}} read back from the written SavedModel."""
    from tensorflow.core.protobuf import saved_model_pb2
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())

    def tensors(infos):
        return {k: {"dtype": tf.dtypes.as_dtype(v.dtype).name, "shape": [d.size for d in v.tensor_shape.dim]}
                for k, v in sorted(infos.items())}

    defs = sm.meta_graphs[0].signature_def
    return {name: {"inputs": tensors(d.inputs), "outputs": tensors(d.outputs)}
            for name, d in sorted(defs.items()) if not name.startswith("__")}


def _save_savedmodel(module: MIDServingModule, path: str) -> None:
    tf.saved_model.save(module, path, signatures=module.signatures())


def _write_assets_extra(path: str, module: MIDServingModule, model_name: str, version: int,
                        metadata: dict) -> None:
    extra = os.path.join(path, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    warmup_lib.write_warmup_requests(os.path.join(extra, warmup_lib.WARMUP_FILE), model_name,
                                     tuple(module.input_shape))
    payload = {
        "model_name": model_name, "version": version, "input_shape": module.input_shape,
        "num_classes": module.num_classes, "value_range": [0.0, 1.0],
        "signatures": signature_summary(path), "tensorflow_version": tf.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    }
    with open(os.path.join(extra, EXPORT_JSON), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving loads <base>/<int>/), got {version!r}")
    return int(version)


def export_model(models, export_base: str, version: int | None = None, *, overwrite: bool = False,
                 model_name: str | None = None, metadata: dict | None = None,
                 version_policy: str = "latest", serving_base_path: str | None = None,
                 version_labels: dict | None = None, verify: bool = False, tolerance: float = 1e-5) -> str:
    """Writes `<export_base>/<version>/` (default: next free version) atomically; returns its path.

    `models` is an `MIDModels` with trained student encoder, classifier and decoder. `metadata` goes
    into `assets.extra/export.json` (e.g. the source model_dir). With `verify`, the SavedModel is
    checked against the Keras models in a fresh TensorFlow-only process *before* it is published
    (the report lands in export.json under "verification"); a mismatch above `tolerance` publishes
    nothing. Also (re)writes `<export_base>/models.config` for `--model_config_file`.
    """
    export_base = os.path.abspath(export_base)
    model_name = model_name or os.path.basename(export_base.rstrip(os.sep))
    os.makedirs(export_base, exist_ok=True)
    version = next_version(export_base) if version is None else _check_version(version)
    final = os.path.join(export_base, str(version))
    if os.path.exists(final) and not overwrite:
        raise ExportError(f"{final} already exists; TF Serving may be serving it. Export a new version "
                          f"(omit --version to use {next_version(export_base)}) or pass --overwrite.")
    tmp = os.path.join(export_base, f".tmp-{os.getpid()}-{version}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with xla.stock_ops():  # the served graph: standard kernels only, nothing for Serving to JIT
            module = build_serving_module(models)
            _save_savedmodel(module, tmp)
        _write_assets_extra(tmp, module, model_name, version, dict(metadata or {}))
        if verify:
            _verify_before_publishing(tmp, models, tolerance)
        _move_into_place(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warmup_lib.write_models_config(export_base, model_name, policy=version_policy,
                        base_path=serving_base_path or f"/models/{model_name}", version_labels=version_labels)
    return final


def read_export_json(path: str) -> dict:
    with open(os.path.join(path, ASSETS_EXTRA, EXPORT_JSON)) as f:
        return json.load(f)


def _verify_before_publishing(path: str, models, tolerance: float) -> None:
    report = verify_export(path, models)
    meta = read_export_json(path)
    meta["verification"] = dict(report, tolerance=tolerance, process="fresh, TensorFlow only")
    with open(os.path.join(path, ASSETS_EXTRA, EXPORT_JSON), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    if report["max_abs_diff"] > tolerance or not report["classes_match"]:
        raise ExportError(f"the SavedModel disagrees with the Keras models (max |diff| = {report['max_abs_diff']:.3g} "
                          f"> {tolerance:g}, classes match: {report['classes_match']}); nothing was published. "
                          "Check for training-only layers (dropout/BN in training mode) in the deployed networks.")


def _move_into_place(tmp: str, final: str, overwrite: bool) -> None:
    """rename(2) is atomic: TF Serving sees either no version directory or a complete one."""
    old = None
    if os.path.exists(final):
        if not overwrite:  # another exporter won the race for this version number
            raise ExportError(f"{final} appeared while exporting; rerun to export the next version")
        old = f"{final}.old-{os.getpid()}"  # not an integer: TF Serving ignores it
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if old is not None:
            os.rename(old, final)
        raise ExportError(f"could not move the export into {final}: {e}; rerun to export the next version") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Runs in a fresh interpreter that imports only TensorFlow and NumPy: what TF Serving (C++, no Keras,
# no mid_tf) sees. It fails if loading the SavedModel drags in keras or mid_tf.
FRESH_PROCESS_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
def foreign():  # `import tensorflow` itself loads a few keras.src modules; nothing beyond them may load
    return {m for m in sys.modules if m.split(".")[0] in ("keras", "mid_tf", "tf_keras")}
baseline = foreign()
export_dir, data_path, out_path = sys.argv[1:4]
data = np.load(data_path)
blob, offsets = data["png_blob"].tobytes(), data["png_offsets"]
pngs = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
sigs = tf.saved_model.load(export_dir).signatures
out = {}
for name, kwargs in [("classify", {"image": tf.constant(data["image"])}),
                     ("regenerate", {"image": tf.constant(data["image"])}),
                     ("classify_encoded", {"image_bytes": tf.constant(pngs)})]:
    fn = sigs["serving_default" if name == "classify" else name]
    for key, value in fn(**kwargs).items():
        out[name + "/" + key] = value.numpy()
leaked = sorted(foreign() - baseline)
if leaked:
    raise SystemExit("the SavedModel needed Python modules TF Serving does not have: " + ", ".join(leaked[:5]))
np.savez(out_path, **out)
"""


def verify_export(path: str, models, num_images: int = 8, seed: int = 0, timeout_s: float = 300.0) -> dict:
    """Loads the export in a fresh Python process (TensorFlow only) and compares it with the Keras models.

    Returns {"max_abs_diff": float, "<signature>": float, ..., "classes_match": bool}. Raises ExportError
    if the fresh process fails. Images are multiples of 1/255 so the PNG round trip is exact.
    """
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 256, size=(num_images, *models.input_shape)) / 255.0).astype(np.float32)
    pngs = [warmup_lib.png_bytes(img) for img in images]
    offsets = np.cumsum([0] + [len(p) for p in pngs])
    pipeline = build_pipeline(models.student_encoder, models.student_classifier)
    regenerator = build_regenerator(models.student_encoder, models.decoder)
    # The reference runs the ops the export traced (stock kernels, see `export`): this checks what
    # serialization kept. The compiled kernels agree with them to float32 round-off (tests/test_fast_ops.py),
    # but the decoder's max-unpooling switches are discontinuous: a ReLU output of ~1e-7 against an exact 0
    # in an otherwise zero window moves a regenerated pixel by up to ~0.008 (measured on a white-box run).
    with xla.stock_ops():
        logits = np.asarray(pipeline(images, training=False))
        regenerated = np.asarray(regenerator(images, training=False))
    expected = {
        "classify/logits": logits, "classify_encoded/logits": logits,
        "classify/probabilities": np.asarray(tf.nn.softmax(logits)),
        "classify_encoded/probabilities": np.asarray(tf.nn.softmax(logits)),
        "regenerate/image": np.clip(regenerated, 0.0, 1.0),
    }
    with tempfile.TemporaryDirectory(prefix="mid-verify-") as work:
        data_path, out_path = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(data_path, image=images, png_blob=np.frombuffer(b"".join(pngs), np.uint8), png_offsets=offsets)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, path, data_path, out_path], cwd=work,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportError(f"the export at {path} failed to load or run in a fresh TensorFlow-only process: "
                              + " | ".join(tail))
        got = dict(np.load(out_path))
    report = {}
    for key, want in expected.items():
        sig = key.split("/")[0]
        report[sig] = max(report.get(sig, 0.0), float(np.max(np.abs(got[key] - want))))
    report["max_abs_diff"] = max(report.values())
    report["classes_match"] = bool(all(np.array_equal(got[f"{s}/classes"], logits.argmax(-1))
                                       for s in ("classify", "classify_encoded")))
    return report
