"""deploy/: the compose file, batching and monitoring configs agree with each other and with the export layout.

No Docker daemon and no tensorflow_model_server here, so this checks what can be checked statically: the
compose file parses (as JSON, and as YAML where PyYAML is installed), its ports and flags agree, every
config file it mounts exists, the server's view of the export base (after the volume mounts) holds what
mid_tf.export writes (models.config naming the same model and base path, an integer version with a
SavedModel), and the two text protos parse against mirrors of TF Serving's messages (tensorflow-serving-api
ships neither), so a misspelt field fails here rather than at server start.
"""

import json
import os
import re

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from mid_tf.export import ServingLimits, export_model
from test_export import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
VAR_RE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(text: str, env: dict) -> str:
    """Compose's `${VAR:-default}`: the value from `env`, else the default."""
    return VAR_RE.sub(lambda m: env.get(m.group(1), m.group(2) or ""), text)


def load_compose() -> dict:
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        text = f.read()
    compose = json.loads(text)
    try:
        import yaml
    except ImportError:  # JSON is YAML: what docker compose reads is what json just read
        return compose
    assert yaml.safe_load(text) == compose
    return compose


def flags_of(service: dict, env: dict) -> dict:
    return dict(interpolate(arg, env).lstrip("-").split("=", 1) for arg in service["command"])


def mounts_of(service: dict, env: dict) -> dict:
    """container path -> host path (relative sources resolved against deploy/, as compose does)."""
    mounts = {}
    for volume in service["volumes"]:
        source, target, *mode = interpolate(volume, env).split(":")
        assert mode in ([], ["ro"]), volume
        mounts[target] = os.path.normpath(os.path.join(DEPLOY, source))
    return mounts


def host_path(mounts: dict, container_path: str) -> str:
    for target, source in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source + container_path[len(target):]
    raise AssertionError(f"{container_path} is not under any volume the server mounts: {sorted(mounts)}")


def _mirror_messages():
    """BatchingParameters and MonitoringConfig as in tensorflow/serving's session_bundle_config.proto and
    config/monitoring_config.proto (the fields deploy/ uses and their neighbours)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="deploy_mirror.proto", package="deploy_mirror", syntax="proto3",
                                             dependency=["google/protobuf/wrappers.proto"])
    F = descriptor_pb2.FieldDescriptorProto
    batching = fdp.message_type.add(name="BatchingParameters")
    for number, name in enumerate(("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                                   "num_batch_threads"), start=1):
        batching.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                           type_name=".google.protobuf.Int64Value")
    batching.field.add(name="thread_pool_name", number=5, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                       type_name=".google.protobuf.StringValue")
    batching.field.add(name="allowed_batch_sizes", number=6, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    batching.field.add(name="pad_variable_length_inputs", number=7, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
    prometheus = fdp.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_BOOL)
    prometheus.field.add(name="path", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    monitoring = fdp.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                         type_name=".deploy_mirror.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(fdp.SerializeToString())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"deploy_mirror.{name}"))
            for name in ("BatchingParameters", "MonitoringConfig")}


MESSAGES = _mirror_messages()


def parse_text_proto(path: str, message: str):
    with open(path) as f:
        return text_format.Parse(f.read(), MESSAGES[message]())


@pytest.fixture(scope="module")
def server():
    compose = load_compose()
    service = compose["services"]["tfserving"]
    return compose, service


def test_ports_and_image(server):
    _, service = server
    assert service["image"].startswith("tensorflow/serving:")
    flags = flags_of(service, {})
    published = dict(p.split(":")[::-1] for p in service["ports"])  # container port -> host port
    assert published == {flags["port"]: "8500", flags["rest_api_port"]: "8501"}
    assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"


def test_mounted_config_files_exist_and_parse(server):
    _, service = server
    flags, mounts = flags_of(service, {}), mounts_of(service, {})
    batching = parse_text_proto(host_path(mounts, flags["batching_parameters_file"]), "BatchingParameters")
    monitoring = parse_text_proto(host_path(mounts, flags["monitoring_config_file"]), "MonitoringConfig")
    assert flags["enable_batching"] == "false"  # off unless MID_ENABLE_BATCHING=true (docs/serving.md)
    assert flags_of(service, {"MID_ENABLE_BATCHING": "true"})["enable_batching"] == "true"
    assert batching.num_batch_threads.value >= 1 and batching.batch_timeout_micros.value > 0
    # Merged batches reach the export's in-graph batch check: they must pass it.
    assert 1 <= batching.max_batch_size.value <= ServingLimits().max_batch
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path.startswith("/monitoring/")


def test_a_misspelt_field_would_fail(tmp_path):
    """The mirrors are strict: what the server would refuse at start, they refuse here."""
    bad = tmp_path / "batching.txt"
    bad.write_text("max_batch_sise { value: 64 }\n")
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        parse_text_proto(str(bad), "BatchingParameters")


@pytest.mark.parametrize("model_name", ["mid_mnist", "digits_canary"])
def test_server_sees_the_export_layout(server, tmp_path, model_name):
    """MID_EXPORTS / MID_MODEL_NAME point the server at an export base; the name is mid-export's default
    model name (the base's basename) in every place the server reads it."""
    _, service = server
    exports = tmp_path / "exports"
    env = {"MID_EXPORTS": str(exports), "MID_MODEL_NAME": model_name}
    export_model(tiny_models(), str(exports / model_name), allow_unevaluated=True, metadata={"dataset": "mnist"})
    flags, mounts = flags_of(service, env), mounts_of(service, env)
    config_path = host_path(mounts, flags["model_config_file"])
    with open(config_path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == model_name and model.model_platform == "tensorflow"
    base = host_path(mounts, model.base_path)
    assert os.path.samefile(base, exports / model_name)
    versions = [n for n in os.listdir(base) if n.isdigit()]
    assert versions == ["1"]
    for name in ("saved_model.pb", "assets.extra/tf_serving_warmup_requests", "assets.extra/model_card.json"):
        assert os.path.isfile(os.path.join(base, "1", name)), name
    limits = json.load(open(os.path.join(base, "1", "assets.extra", "export.json")))["limits"]
    batching = parse_text_proto(host_path(mounts, flags["batching_parameters_file"]), "BatchingParameters")
    assert batching.max_batch_size.value <= limits["max_batch"]


def test_default_mount_is_where_mid_export_writes(server):
    """Without variables the server mounts <repo>/exports/mid_mnist: `python export.py` from the repository
    root writes there by default (mid_tf/cli/export.py: exports/mid_<dataset>)."""
    _, service = server
    mounts = mounts_of(service, {})
    assert mounts["/models/mid_mnist"] == os.path.join(REPO, "exports", "mid_mnist")
    assert flags_of(service, {})["model_config_file"] == "/models/mid_mnist/models.config"
    assert all(os.path.isfile(p) for t, p in mounts.items() if t.startswith("/config/"))


def test_docs_say_it_was_not_run():
    with open(os.path.join(REPO, "docs", "serving.md")) as f:
        text = f.read()
    assert "deploy/compose.yaml" in text
    assert "**Not run here.**" in text and "no Docker daemon" in text
