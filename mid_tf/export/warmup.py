"""The files TF Serving reads besides the SavedModel: warmup requests and `models.config`.

Warmup (`<version>/assets.extra/tf_serving_warmup_requests`): a TFRecord of `PredictionLog`s that
the model server replays at load time (`--enable_model_warmup`, on by default), so the first real
request does not pay for lazy initialisation. One record per signature; TF Serving allows <= 1000.

`models.config` (`<export_base>/models.config`): the ModelServerConfig text proto for
`--model_config_file`, built through the real proto so a field-name typo cannot slip in.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

WARMUP_FILE = "tf_serving_warmup_requests"
MODELS_CONFIG = "models.config"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def png_bytes(image01: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.constant(np.round(image01 * 255).astype(np.uint8))).numpy()


def warmup_requests(model_name: str, input_shape, batch_size: int = 2, seed: int = 0) -> list:
    """Representative PredictRequests: random images in [0, 1] for every signature."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, size=(batch_size, *input_shape)).astype(np.float32)
    encoded = [png_bytes(img) for img in images]
    inputs = {
        "serving_default": ("image", tf.make_tensor_proto(images)),
        "regenerate": ("image", tf.make_tensor_proto(images)),
        "classify_encoded": ("image_bytes", tf.make_tensor_proto(encoded, dtype=tf.string, shape=[batch_size])),
    }
    requests = []
    for signature, (key, proto) in inputs.items():
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name,
                                                                              signature_name=signature))
        request.inputs[key].CopyFrom(proto)
        requests.append(request)
    return requests


def write_warmup_requests(path: str, model_name: str, input_shape, batch_size: int = 2) -> int:
    """Writes the warmup TFRecord; returns the number of records."""
    requests = warmup_requests(model_name, input_shape, batch_size)
    assert len(requests) <= MAX_WARMUP_RECORDS
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(requests)


def read_warmup_requests(path: str) -> list:
    """Parses the warmup file back into PredictionLog protos (for tests and inspection)."""
    logs = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    return logs


def models_config_text(model_name: str, base_path: str, policy: str = "latest",
                       version_labels: dict | None = None) -> str:
    """ModelServerConfig text proto: one model, platform "tensorflow", version policy `latest` or `all`."""
    if policy not in ("latest", "all"):
        raise ValueError(f"version policy must be 'latest' or 'all', got {policy!r}")
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = model_name, base_path, "tensorflow"
    if policy == "all":
        model.model_version_policy.all.SetInParent()
    else:
        model.model_version_policy.latest.num_versions = 1
    for label, version in sorted((version_labels or {}).items()):
        model.version_labels[label] = int(version)
    return text_format.MessageToString(config)


def write_models_config(export_base: str, model_name: str, base_path: str, policy: str = "latest",
                        version_labels: dict | None = None) -> str:
    """(Re)writes `<export_base>/models.config` atomically; returns its path."""
    text = models_config_text(model_name, base_path, policy, version_labels)
    path = os.path.join(export_base, MODELS_CONFIG)
    # `.tmp-<pid>-`: the pattern publish.clean_stale recognises, should this process be killed right here.
    fd, tmp = tempfile.mkstemp(dir=export_base, prefix=f".tmp-{os.getpid()}-", suffix=".config")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the model server may run as another user
    os.replace(tmp, path)
    return path
