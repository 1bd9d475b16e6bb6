"""A TF Serving stand-in for tests: PredictionService (gRPC) and the REST predict API on 127.0.0.1.

There is no `tensorflow_model_server` binary on this machine, so the tests check the contract the
real server offers instead: it loads `<base>/<version>/` like TF Serving (the latest integer version
by default, or the versions asked for), answers Predict and GetModelMetadata with TF Serving's
status codes and wordings ("Servable not found for request: ..." -> NOT_FOUND, a TF op error ->
its code, normally INVALID_ARGUMENT), and stops itself after `lifetime_s` so a failing test never
leaves a server behind. A test fixture, not a product.

Manual use: python tests/serving_standin.py --base=exports/mid_mnist --port=8500 [--rest_port=8501]
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc


class StandInError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _clean_tf_message(message: str) -> str:
    """Drops eager-mode noise so the text reads like TF Serving's (the assertion, then the node)."""
    lines = [ln for ln in message.splitlines() if ln.strip() and not ln.startswith(
        ("Graph execution error", "Detected at node", "<stack traces unavailable>"))]
    return "\n".join(lines)


class Servables:
    """The loaded versions of one model, and TF Serving's request resolution rules."""

    def __init__(self, base_path: str, model_name: str, versions=None, version_labels=None):
        on_disk = sorted(int(n) for n in os.listdir(base_path) if n.isdigit())
        if not on_disk:
            raise FileNotFoundError(f"no integer version directories under {base_path}")
        wanted = [on_disk[-1]] if versions is None else list(versions)
        self.model_name, self.labels = model_name, dict(version_labels or {})
        self.loaded = {v: tf.saved_model.load(os.path.join(base_path, str(v))) for v in wanted}
        self.signature_defs = {}
        for v in wanted:
            sm = saved_model_pb2.SavedModel()
            with open(os.path.join(base_path, str(v), "saved_model.pb"), "rb") as f:
                sm.ParseFromString(f.read())
            self.signature_defs[v] = sm.meta_graphs[0].signature_def

    def resolve(self, name: str, version: int | None, label: str = "") -> int:
        if version is None and label:
            if label not in self.labels:
                raise StandInError(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
            version = self.labels[label]
        request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
        if name != self.model_name or (version is not None and version not in self.loaded):
            raise StandInError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")
        return max(self.loaded) if version is None else version

    def run(self, version: int, signature: str, inputs: dict) -> dict:
        signature = signature or "serving_default"
        signatures = self.loaded[version].signatures
        if signature not in signatures:
            raise StandInError(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{signature}" not found.')
        fn = signatures[signature]
        expected = sorted(fn.structured_input_signature[1])
        for alias in inputs:
            if alias not in expected:
                raise StandInError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input tensor alias not found in signature: {alias}. Inputs expected to be "
                                   f"in the set {{{','.join(expected)}}}.")
        missing = [k for k in expected if k not in inputs]
        if missing:
            raise StandInError(grpc.StatusCode.INVALID_ARGUMENT, f"Missing input(s) {missing} for signature "
                               f"{signature}; expected {expected}.")
        try:
            outputs = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except tf.errors.OpError as e:
            raise StandInError(_status(e), _clean_tf_message(e.message))
        except (TypeError, ValueError) as e:
            raise StandInError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return {k: v.numpy() for k, v in outputs.items()}


def _status(err: tf.errors.OpError) -> grpc.StatusCode:
    by_value = {code.value[0]: code for code in grpc.StatusCode}
    return by_value.get(err.error_code, grpc.StatusCode.UNKNOWN)


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, servables: Servables):
        self.servables = servables

    def _version(self, spec):
        return spec.version.value if spec.HasField("version") else None

    def Predict(self, request, context):
        try:
            version = self.servables.resolve(request.model_spec.name, self._version(request.model_spec),
                                             request.model_spec.version_label)
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = self.servables.run(version, request.model_spec.signature_name, inputs)
        except StandInError as e:
            context.abort(e.code, e.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        try:
            version = self.servables.resolve(request.model_spec.name, self._version(request.model_spec),
                                             request.model_spec.version_label)
        except StandInError as e:
            context.abort(e.code, e.message)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {list(request.metadata_field)} is "
                          "not supported")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in self.servables.signature_defs[version].items():
            if not name.startswith("__"):
                sig_map.signature_def[name].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(sig_map)
        return response


_REST_PATH = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?(:predict|/metadata)$")
_HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}


def _rest_handler(servables: Servables):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _reply(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, verb):
            m = _REST_PATH.match(self.path)
            if not m or m.group(4) != verb:
                raise StandInError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {self.command} {self.path}")
            version = int(m.group(2)) if m.group(2) else None
            return servables.resolve(m.group(1), version, m.group(3) or "")

        def do_POST(self):
            try:
                version = self._route(":predict")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                rows = body["instances"]
                inputs = {k: np.asarray([_rest_value(r[k]) for r in rows]) for k in rows[0]}
                inputs = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in inputs.items()}
                outputs = servables.run(version, body.get("signature_name", ""), inputs)
            except StandInError as e:
                return self._reply(_HTTP_STATUS.get(e.code, 500), {"error": e.message})
            except (KeyError, ValueError, IndexError, TypeError) as e:
                return self._reply(400, {"error": f"JSON Parse error / malformed request: {e}"})
            if len(outputs) == 1:
                predictions = _json_value(next(iter(outputs.values())))
            else:
                keys = sorted(outputs)
                predictions = [{k: _json_value(outputs[k][i]) for k in keys} for i in range(len(outputs[keys[0]]))]
            self._reply(200, {"predictions": predictions})

        def do_GET(self):
            try:
                version = self._route("/metadata")
            except StandInError as e:
                return self._reply(_HTTP_STATUS.get(e.code, 500), {"error": e.message})
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in servables.signature_defs[version].items():
                if not name.startswith("__"):
                    sig_map.signature_def[name].CopyFrom(sig)
            self._reply(200, {"model_spec": {"name": servables.model_name, "version": str(version)},
                              "metadata": {"signature_def": json_format.MessageToDict(sig_map)}})
    return Handler


def _json_value(value):
    """An output as TF Serving's REST API writes it: string tensors as UTF-8 strings (names not ending in
    `_bytes`), numbers as numbers."""
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind == "S":
        return np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])(value).tolist()
    return value.tolist()


def _rest_value(value):
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    return value


class StandInServer:
    """gRPC PredictionService (+ optional REST) for `<base_path>/<version>/`; stops after `lifetime_s`."""

    def __init__(self, base_path: str, model_name: str, versions=None, version_labels=None,
                 lifetime_s: float = 120.0, port: int = 0, rest: bool = False, rest_port: int = 0):
        self.servables = Servables(base_path, model_name, versions, version_labels)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Servicer(self.servables), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.target = f"127.0.0.1:{self.port}"
        self._http = ThreadingHTTPServer(("127.0.0.1", rest_port), _rest_handler(self.servables)) if rest else None
        self.rest_target = f"127.0.0.1:{self._http.server_address[1]}" if rest else None
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self.stopped = threading.Event()

    def start(self) -> "StandInServer":
        self._server.start()
        if self._http:
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._timer.start()
        return self

    def stop(self):
        if self.stopped.is_set():
            return
        self.stopped.set()
        self._timer.cancel()
        self._server.stop(grace=0)
        if self._http:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--model_name", default=None)
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--rest_port", type=int, default=None)
    parser.add_argument("--lifetime_s", type=float, default=600)
    a = parser.parse_args()
    server = StandInServer(a.base, a.model_name or os.path.basename(os.path.abspath(a.base)), lifetime_s=a.lifetime_s,
                           port=a.port, rest=a.rest_port is not None, rest_port=a.rest_port or 0).start()
    print(f"serving gRPC on {server.target}" + (f", REST on {server.rest_target}" if server.rest_target else "")
          + f" for {a.lifetime_s:g}s", flush=True)
    server.stopped.wait()
