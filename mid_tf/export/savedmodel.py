"""The deployed MID model as a TF-Serving SavedModel, written atomically as `<export_base>/<version>/`.

Why a hand-written `tf.Module` rather than `model.export()`: Keras names the outputs `output_0`, has
one endpoint per model, and validates nothing. TF Serving clients need stable, named tensors, several
signatures over the same weights, and errors that say what was wrong with the request:

  serving_default   image float32 [batch, H, W, C] in [0, 1] -> logits, probabilities, classes (int64),
                                                                class_names (string: the class's name)
  regenerate        image                                    -> image  (D_s(E_s(x)), clipped to [0, 1]; D_s = D_t
                                                                      unless stage regen fitted it)
  classify_encoded  image_bytes string [batch] (PNG/JPEG)    -> logits, probabilities, classes, class_names

The `image` input is declared [-1, -1, -1, -1] on purpose: a wrong height, width or channel count then
reaches the in-graph checks (export/checks.py) and comes back as INVALID_ARGUMENT with a message naming
the expected shape, instead of an opaque error from deep inside a convolution. The same checks cap the
batch and the encoded images (`ServingLimits`). The contract is in `assets.extra/export.json`, in the
model card beside it (export/card.py), and in docs/serving.md. Publishing rules: export/publish.py.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from mid_tf.export import card as card_lib
from mid_tf.export import checks, publish
from mid_tf.export import warmup as warmup_lib
from mid_tf.export.errors import ExportError
from mid_tf.export.limits import ServingLimits, input_spec
from mid_tf.export.verify import verify_export
from mid_tf.kernels import xla
from mid_tf.models import build_pipeline, build_regenerator

SIGNATURES = ("serving_default", "regenerate", "classify_encoded")
CLASSIFY_OUTPUTS = ("logits", "probabilities", "classes", "class_names")
EXPORT_JSON = "export.json"
ASSETS_EXTRA = "assets.extra"


class MIDServingModule(tf.Module):
    """Holds the variables and the three signature functions (inference only, no training flags)."""

    def __init__(self, pipeline, regenerator, input_shape, num_classes, limits: ServingLimits | None = None,
                 class_names=None):
        super().__init__(name="mid_serving")
        names = [str(n) for n in class_names] if class_names else [str(i) for i in range(int(num_classes))]
        if len(names) != int(num_classes):
            raise ExportError(f"{len(names)} class names for a model with {num_classes} classes: {names}")
        self.class_names = names
        name_table = tf.constant(names)
        shape = tuple(int(d) for d in input_shape)
        limits = limits or ServingLimits()
        seen, variables = set(), []
        for v in list(pipeline.weights) + list(regenerator.weights):  # E_s is shared: track it once
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v.value if hasattr(v, "value") else v)
        self.model_variables = variables  # every variable the functions capture must be tracked
        self.input_shape = list(shape)
        self.num_classes = int(num_classes)
        self.limits = limits

        def classify_outputs(image):
            logits = tf.cast(pipeline(image, training=False), tf.float32)
            classes = tf.argmax(logits, axis=-1, output_type=tf.int64)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1), "classes": classes,
                    "class_names": tf.gather(name_table, classes)}

        image_spec = tf.TensorSpec([None, None, None, None], tf.float32, name="image")
        bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")

        @tf.function(input_signature=[image_spec])
        def classify(image):
            return classify_outputs(checks.checked_image(image, shape, limits))

        @tf.function(input_signature=[image_spec])
        def regenerate(image):
            out = regenerator(checks.checked_image(image, shape, limits), training=False)
            return {"image": tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 1.0)}

        @tf.function(input_signature=[bytes_spec])
        def classify_encoded(image_bytes):
            return classify_outputs(checks.decoded_images(image_bytes, shape, limits))

        self.classify = classify
        self.regenerate = regenerate
        self.classify_encoded = classify_encoded

    def signatures(self) -> dict:
        return {"serving_default": self.classify.get_concrete_function(),
                "regenerate": self.regenerate.get_concrete_function(),
                "classify_encoded": self.classify_encoded.get_concrete_function()}


def build_serving_module(models, limits: ServingLimits | None = None, class_names=None) -> MIDServingModule:
    """The deployed MID model: C_s(E_s(x)) for classification, D_s(E_s(x)) for regeneration; `class_names`
    (label order; default "0", "1", ...) become the `class_names` output."""
    return MIDServingModule(build_pipeline(models.student_encoder, models.student_classifier, name="mid_pipeline"),
                            build_regenerator(models.student_encoder, models.student_decoder, name="mid_regenerator"),
                            models.input_shape, models.num_classes, limits, class_names)


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


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def _write_assets_extra(path: str, module: MIDServingModule, model_name: str, version: int,
                        metadata: dict, card: dict) -> None:
    extra = os.path.join(path, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    # The server replays these at load time: they must pass the limits, or the version never loads.
    warmup_lib.write_warmup_requests(os.path.join(extra, warmup_lib.WARMUP_FILE), model_name,
                                     tuple(module.input_shape), batch_size=min(2, module.limits.max_batch))
    spec = input_spec(module.input_shape, module.limits)
    card_lib.write_card(extra, dict(card, input=spec))
    _write_json(os.path.join(extra, EXPORT_JSON), {
        "model_name": model_name, "version": version, "input_shape": module.input_shape,
        "num_classes": module.num_classes, "class_names": module.class_names, "value_range": [0.0, 1.0], "limits": spec["limits"],
        "model_card": {"files": [card_lib.CARD_JSON, card_lib.CARD_MD], "evaluated": card_lib.is_evaluated(card),
                       "commit": card["source"]["commit"]},
        "signatures": signature_summary(path), "tensorflow_version": tf.__version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    })


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving loads <base>/<int>/), got {version!r}")
    return int(version)


def _check_limits_fit(input_shape, limits: ServingLimits) -> None:
    """A cap below what a valid image of the model's size can take would refuse legitimate requests."""
    noise = np.random.default_rng(0).uniform(0.0, 1.0, size=tuple(input_shape))  # hardly compressible
    needed = len(warmup_lib.png_bytes(noise))
    if limits.max_image_bytes < needed:
        raise ExportError(f"max_image_bytes={limits.max_image_bytes} is below the size of a PNG of the model's "
                          f"input size ({needed} bytes for random pixels): such images would be refused. "
                          f"Raise --max_image_bytes to at least {needed}.")


def _card_for(model_card: dict | None, allow_unevaluated: bool, metadata: dict) -> dict:
    """The card to write; an export without an evaluated card only with `allow_unevaluated`."""
    if model_card is None:
        if not allow_unevaluated:
            raise ExportError("no model card: pass model_card=mid_tf.export.build_card(model_dir), or "
                              "allow_unevaluated=True for an export whose card says \"not evaluated\"")
        return card_lib.unevaluated_card(metadata.get("dataset"))
    if not card_lib.is_evaluated(model_card) and not allow_unevaluated:
        raise ExportError("the model card says the model was not evaluated: run the eval stage first, or pass "
                          "allow_unevaluated=True (--allow_unevaluated)")
    return model_card


def export_model(models, export_base: str, version: int | None = None, *, overwrite: bool = False,
                 model_name: str | None = None, metadata: dict | None = None,
                 version_policy: str = "latest", serving_base_path: str | None = None,
                 version_labels: dict | None = None, verify: bool = False, tolerance: float = 1e-5,
                 model_card: dict | None = None, allow_unevaluated: bool = False,
                 limits: ServingLimits | None = None) -> str:
    """Writes `<export_base>/<version>/` (default: next free version) atomically; returns its path.

    `models` is an `MIDModels` with trained student encoder, classifier and decoder. `metadata` goes
    into `assets.extra/export.json` (e.g. the source model_dir); `model_card` (card.build_card) into
    `assets.extra/model_card.{json,md}`: without one, or with an unevaluated one, the export is refused
    unless `allow_unevaluated`. `limits` caps each request (ServingLimits' defaults if None). With
    `verify`, the SavedModel is checked against the Keras models in a fresh TensorFlow-only process
    *before* it is published (the report lands in export.json under "verification"); a mismatch above
    `tolerance` publishes nothing. Leftovers of killed exports are cleaned up first (publish.clean_stale).
    Also (re)writes `<export_base>/models.config` for `--model_config_file`.
    """
    metadata, limits = dict(metadata or {}), limits or ServingLimits()
    card = _card_for(model_card, allow_unevaluated, metadata)
    _check_limits_fit(models.input_shape, limits)
    export_base = os.path.abspath(export_base)
    model_name = model_name or os.path.basename(export_base.rstrip(os.sep))
    os.makedirs(export_base, exist_ok=True)
    publish.clean_stale(export_base)
    version = publish.next_version(export_base) if version is None else _check_version(version)
    final = os.path.join(export_base, str(version))
    if os.path.exists(final) and not overwrite:
        raise ExportError(f"{final} already exists; TF Serving may be serving it. Export a new version "
                          f"(omit --version to use {publish.next_version(export_base)}) or pass --overwrite.")
    tmp = publish.tmp_path(export_base, version)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with xla.stock_ops():  # the served graph: standard kernels only, nothing for Serving to JIT
            module = build_serving_module(models, limits, card.get("class_names"))
            tf.saved_model.save(module, tmp, signatures=module.signatures())
        _write_assets_extra(tmp, module, model_name, version, metadata, card)
        if verify:
            _verify_before_publishing(tmp, models, tolerance, limits)
        publish.move_into_place(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warmup_lib.write_models_config(export_base, model_name, policy=version_policy,
                        base_path=serving_base_path or f"/models/{model_name}", version_labels=version_labels)
    return final


def read_export_json(path: str) -> dict:
    with open(os.path.join(path, ASSETS_EXTRA, EXPORT_JSON)) as f:
        return json.load(f)


def read_model_card(path: str) -> dict:
    with open(os.path.join(path, ASSETS_EXTRA, card_lib.CARD_JSON)) as f:
        return json.load(f)


def _verify_before_publishing(path: str, models, tolerance: float, limits: ServingLimits) -> None:
    report = verify_export(path, models, num_images=min(8, limits.max_batch))
    meta = read_export_json(path)
    meta["verification"] = dict(report, tolerance=tolerance, process="fresh, TensorFlow only")
    _write_json(os.path.join(path, ASSETS_EXTRA, EXPORT_JSON), meta)
    if report["max_abs_diff"] > tolerance or not report["classes_match"]:
        raise ExportError(f"the SavedModel disagrees with the Keras models (max |diff| = {report['max_abs_diff']:.3g} "
                          f"> {tolerance:g}, classes match: {report['classes_match']}); nothing was published. "
                          "Check for training-only layers (dropout/BN in training mode) in the deployed networks.")
