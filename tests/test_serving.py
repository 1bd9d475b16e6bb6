"""The serving contract end to end: export -> a TF Serving stand-in (gRPC + REST) -> mid_tf.serving.client.

Round trips equal the Keras outputs; bad requests (and requests over the export's limits) come back
INVALID_ARGUMENT with the in-graph message and the server keeps serving; unknown models/versions are
NOT_FOUND; the CLI turns status codes and bad local inputs into one-line messages with the fix, and
prints the export's model card (--info).
"""

import os
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from mid_tf.export import ServingLimits
from mid_tf.serving import client
from serving_standin import StandInServer
from test_export import images01, keras_outputs, tiny_models, unevaluated

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_MESSAGE = "image must be float32 [batch, 28, 28, 1] with values in [0, 1]"
LIMITS = ServingLimits(max_batch=8, max_image_bytes=4096)  # small, so a test can exceed them cheaply


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tiny_models()
    base = str(tmp_path_factory.mktemp("exports") / "mid_mnist")
    unevaluated(models, base, limits=LIMITS, metadata={"dataset": "mnist"})
    with StandInServer(base, "mid_mnist", lifetime_s=300, rest=True) as server:
        yield server, models, base


@pytest.fixture(scope="module")
def grpc_client(served):
    c = client.GrpcClient(served[0].target, timeout=30)
    yield c
    c.close()


def _pngs(images):
    return [tf.io.encode_png(np.round(img * 255).astype(np.uint8)).numpy() for img in images]


@pytest.mark.parametrize("mode", ["grpc", "rest"])
def test_round_trip_of_every_signature_equals_keras(served, grpc_client, mode):
    server, models, _ = served
    c = grpc_client if mode == "grpc" else client.RestClient(server.rest_target, timeout=30)
    images = images01(5)
    logits, regen = keras_outputs(models, images)
    for signature, inputs in [("classify", images), ("classify_encoded", _pngs(images))]:
        out = c.predict("mid_mnist", signature, inputs)
        assert set(out) == {"logits", "probabilities", "classes", "class_names"}
        assert np.max(np.abs(out["logits"] - logits)) <= 1e-5
        np.testing.assert_array_equal(out["classes"], logits.argmax(-1))
        names = [n.decode() if isinstance(n, bytes) else n for n in out["class_names"]]
        assert names == [str(c) for c in logits.argmax(-1)]  # MNIST's class names are its digits
    out = c.predict("mid_mnist", "regenerate", images)
    assert set(out) == {"image"} and out["image"].shape == (5, 28, 28, 1)
    assert np.max(np.abs(out["image"] - regen)) <= 1e-5


def test_rest_request_body_and_urls():
    body = client.rest_predict_body("classify_encoded", [b"\x89PNG"])
    assert body == {"signature_name": "classify_encoded", "instances": [{"image_bytes": {"b64": "iVBORw=="}}]}
    body = client.rest_predict_body("classify", np.zeros((2, 28, 28, 1), np.float32))
    assert body["signature_name"] == "serving_default" and len(body["instances"]) == 2
    assert np.asarray(body["instances"][0]["image"]).shape == (28, 28, 1)
    assert client.rest_url("h:8501", "m") == "http://h:8501/v1/models/m:predict"
    assert client.rest_url("h:8501", "m", version=3) == "http://h:8501/v1/models/m/versions/3:predict"
    assert client.rest_url("h:8501", "m", version_label="stable", tls=True) == \
        "https://h:8501/v1/models/m/labels/stable:predict"
    assert client.rest_url("h:8501", "m", verb="metadata") == "http://h:8501/v1/models/m/metadata"
    parsed = client.parse_rest_predictions("regenerate", {"predictions": [[[0.5]]]})
    assert list(parsed) == ["image"] and parsed["image"].shape == (1, 1, 1)


def _raw_predict(target, inputs, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "mid_mnist", signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    with grpc.insecure_channel(target) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


BAD_REQUESTS = {
    "wrong input name": ({"img": np.zeros((1, 28, 28, 1), np.float32)}, "input tensor alias not found"),
    "wrong shape": ({"image": np.zeros((2, 32, 32, 1), np.float32)}, EXPECTED_MESSAGE),
    "missing channel axis": ({"image": np.zeros((2, 28, 28), np.float32)}, EXPECTED_MESSAGE),
    "wrong dtype": ({"image": np.zeros((1, 28, 28, 1), np.float64)}, "double"),
    "out of range": ({"image": np.full((1, 28, 28, 1), 255.0, np.float32)}, EXPECTED_MESSAGE),
    "NaN": ({"image": np.full((1, 28, 28, 1), np.nan, np.float32)}, EXPECTED_MESSAGE),
    "batch over the cap": ({"image": np.zeros((9, 28, 28, 1), np.float32)}, "at most 8 images"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(served, case):
    server, _, _ = served
    inputs, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        _raw_predict(server.target, inputs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    ok = _raw_predict(server.target, {"image": images01(1)})  # the next good request still works
    assert tf.make_ndarray(ok.outputs["probabilities"]).shape == (1, 10)


def test_bad_encoded_image_is_invalid_argument(grpc_client):
    with pytest.raises(client.ServingError) as info:
        grpc_client.predict("mid_mnist", "classify_encoded", [b"not an image"])
    assert info.value.code == "INVALID_ARGUMENT" and "image" in info.value.details.lower()


def _noise_pngs(n, size):
    rng = np.random.default_rng(3)
    return _pngs(rng.integers(0, 256, size=(n, size, size, 1)) / 255.0)


@pytest.mark.parametrize("mode", ["grpc", "rest"])
@pytest.mark.parametrize("case, message", [("too many", "at most 8 images"), ("too large", "1 to 4096 bytes"),
                                           ("wrong size", "must be 28x28 pixels")])
def test_encoded_requests_over_the_limits_are_invalid_argument(served, grpc_client, mode, case, message):
    server, _, _ = served
    c = grpc_client if mode == "grpc" else client.RestClient(server.rest_target, timeout=30)
    inputs = {"too many": _noise_pngs(9, 28), "too large": _noise_pngs(1, 28) + _noise_pngs(1, 72),
              "wrong size": _noise_pngs(1, 32)}[case]
    if case == "too large":
        assert len(inputs[1]) > LIMITS.max_image_bytes
    with pytest.raises(client.ServingError) as info:
        c.predict("mid_mnist", "classify_encoded", inputs)
    assert info.value.code == "INVALID_ARGUMENT" and message in info.value.details
    assert "--batch_size" in str(info.value)  # the fix names the client's knob
    assert c.predict("mid_mnist", "classify_encoded", _noise_pngs(8, 28))["classes"].shape == (8,)


def test_metadata_over_grpc_and_rest(served, grpc_client):
    server, _, _ = served
    for meta in (grpc_client.metadata("mid_mnist"), client.RestClient(server.rest_target).metadata("mid_mnist")):
        assert meta["version"] == 1
        assert sorted(meta["signatures"]) == ["classify_encoded", "regenerate", "serving_default"]
        assert meta["signatures"]["serving_default"]["inputs"]["image"]["dtype"] == "float32"
        assert sorted(meta["signatures"]["serving_default"]["outputs"]) == ["class_names", "classes", "logits",
                                                                            "probabilities"]
    assert "serving_default: image float32[-1, -1, -1, -1] ->" in client.format_metadata(meta)


class _SlowPredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers Predict only after 3 s, so a short client deadline always expires first."""

    def Predict(self, request, context):
        import time
        time.sleep(3.0)
        return predict_pb2.PredictResponse()


def test_deadline_exceeded_is_explained():
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_SlowPredictionService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        c = client.GrpcClient(f"127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(client.ServingError) as info:
            c.predict("mid_mnist", "classify", images01(2))
        c.close()
    finally:
        server.stop(grace=None)
    assert info.value.code == "DEADLINE_EXCEEDED" and "--timeout" in str(info.value)


def test_latest_version_is_served_and_others_are_not_found(served, tmp_path):
    _, models, _ = served
    base = str(tmp_path / "mid_mnist")
    unevaluated(models, base)
    unevaluated(tiny_models(seed=7), base)  # version 2, other weights
    with StandInServer(base, "mid_mnist", lifetime_s=120) as server:
        c = client.GrpcClient(server.target, timeout=30)
        latest = c.predict("mid_mnist", "classify", images01(2))
        assert np.array_equal(latest["logits"], c.predict("mid_mnist", "classify", images01(2), version=2)["logits"])
        with pytest.raises(client.ServingError, match="Servable not found for request: Specific"):
            c.predict("mid_mnist", "classify", images01(2), version=1)
        c.close()
    with StandInServer(base, "mid_mnist", versions=[1], lifetime_s=120) as server:
        c = client.GrpcClient(server.target, timeout=30)
        first = c.predict("mid_mnist", "classify", images01(2), version=1)
        assert np.max(np.abs(first["logits"] - latest["logits"])) > 1e-4  # really a different version
        c.close()


def test_cli_classifies_a_png_directory_and_writes_outputs(served, tmp_path, capsys):
    server, models, _ = served
    images = images01(3)
    os.makedirs(tmp_path / "pngs")
    for i, data in enumerate(_pngs(images)):
        (tmp_path / "pngs" / f"{i}.png").write_bytes(data)
    out = str(tmp_path / "out.npz")
    rc = client.main([f"--server={server.target}", "--signature=classify_encoded", f"--inputs={tmp_path / 'pngs'}",
                      f"--output={out}", "--batch_size=2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    logits, _ = keras_outputs(models, images)
    assert [ln.split("\t")[:2] for ln in lines[:3]] == [[f"{i}.png", f"class {c} ({c})"]
                                                         for i, c in enumerate(logits.argmax(-1))]
    assert np.max(np.abs(np.load(out)["logits"] - logits)) <= 1e-5
    np.save(tmp_path / "x.npy", images[..., 0])  # [N, 28, 28] grayscale
    rc = client.main(["--rest", f"--server={server.rest_target}", "--signature=regenerate",
                      f"--inputs={tmp_path / 'x.npy'}", f"--output={tmp_path / 'regen.npy'}"])
    assert rc == 0 and np.load(tmp_path / "regen.npy").shape == (3, 28, 28, 1)


@pytest.mark.parametrize("mode", ["grpc", "rest"])
def test_cli_not_found_message_names_the_fix(served, tmp_path, capsys, mode):
    server, _, _ = served
    np.save(tmp_path / "x.npy", images01(1))
    args = ["--model_name=nope", f"--inputs={tmp_path / 'x.npy'}"]
    args += [f"--server={server.target}"] if mode == "grpc" else ["--rest", f"--server={server.rest_target}"]
    assert client.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: NOT_FOUND")
    assert "Servable not found for request: Latest(nope)" in err and "--model_name" in err


def test_cli_unavailable_when_nothing_listens(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago, and nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    np.save(tmp_path / "x.npy", images01(1))
    for extra in ([], ["--rest"]):
        proc = subprocess.run([sys.executable, "-m", "mid_tf.serving.client", f"--server=127.0.0.1:{port}",
                               f"--inputs={tmp_path / 'x.npy'}", *extra], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.returncode == 2
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "UNAVAILABLE" in err[0] and "is the model server running" in err[0]
        assert "8500" in err[0]


@pytest.mark.parametrize("argv, needle", [(["--model_version=1", "--version_label=stable"], "At most one of"),
                                          (["--signature=nope"], "--signature"), (["--bogus"], "bogus"),
                                          (["--batch_size=0", "--inputs=x.npy"], "--batch_size"), ([], "nothing to send")])
def test_cli_bad_input_is_one_line_and_status_2(argv, needle, capsys):
    """absl flags in a FlagValues of the call's own: every call starts from the defaults, and a bad flag
    ends like any other failure (no request is sent for these)."""
    assert client.main(["--server=127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_cli_bad_local_inputs_are_one_line_and_status_2(tmp_path, capsys):
    """Nothing is sent for these (the server address is never contacted)."""
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "cut.png").write_bytes(_pngs(images01(1))[0][:40])  # a PNG signature, then truncated
    with open(tmp_path / "arrays.npy", "wb") as f:
        np.savez(f, x=images01(1))  # an .npz archive under a .npy name
    (tmp_path / "empty").mkdir()
    cases = [("notes.png", "classify", "is not a PNG or JPEG image"),
             ("notes.png", "classify_encoded", "is not a PNG or JPEG image"),
             ("cut.png", "classify", "could not be decoded as an image"),
             ("arrays.npy", "classify", "numeric .npy array"),
             ("empty", "classify", "holds no .npy, .png or .jpg files")]
    for name, signature, needle in cases:
        assert client.main(["--server=127.0.0.1:1", f"--signature={signature}", f"--inputs={tmp_path / name}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (name, err)


def test_a_directory_of_npy_arrays_is_read(tmp_path):
    os.makedirs(tmp_path / "arrays")
    np.save(tmp_path / "arrays" / "a.npy", images01(2))
    np.save(tmp_path / "arrays" / "b.npy", (images01(3, seed=4)[..., 0] * 255).astype(np.uint8))  # [N,H,W] uint8
    names, batch = client.load_inputs([str(tmp_path / "arrays")], "classify")
    assert names == ["a.npy[0]", "a.npy[1]", "b.npy[0]", "b.npy[1]", "b.npy[2]"]
    assert batch.shape == (5, 28, 28, 1) and batch.dtype == np.float32 and batch.max() <= 1.0
    names, blobs = client.load_inputs([str(tmp_path / "arrays")], "classify_encoded")
    assert len(blobs) == 5 and all(b.startswith(b"\x89PNG") for b in blobs)


def test_cli_info_prints_the_model_card(served, tmp_path, capsys):
    _, _, base = served
    assert client.main(["--info", f"--export_dir={base}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(os.path.join(base, "1")) and "# Model card: MID on mnist" in out
    assert "not evaluated" in out and "at most 8 images, each encoded image at most 4096 bytes" in out
    assert client.main(["--info", f"--export_dir={os.path.join(base, '1')}"]) == 0  # a version directory
    assert "# Model card" in capsys.readouterr().out
    for argv, needle in [(["--info"], "pass --export_dir"), (["--info", f"--export_dir={tmp_path}"], "no SavedModel"),
                         (["--info", f"--export_dir={base}", "--model_version=5"], "versions there: [1]")]:
        assert client.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_cli_help_lists_the_flags(capsys):
    assert client.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--server" in out and "--version_label" in out and "--inputs" in out and "--info" in out
