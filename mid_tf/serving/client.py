"""Client for the exported MID model on TF Serving: gRPC (port 8500) or REST (`--rest`, port 8501).

  python -m mid_tf.serving.client --server=localhost:8500 --model_name=mid_mnist --inputs=digits/ \
      [--signature=classify|regenerate|classify_encoded] [--model_version=N | --version_label=L] [--output=x.npz]
  python -m mid_tf.serving.client --metadata            # what the server serves (gRPC GetModelMetadata)
  python -m mid_tf.serving.client --info --export_dir=exports/mid_mnist   # the export's model card

This is the client side: it imports nothing from the rest of mid_tf beyond mid_tf/serving/local.py
(inputs and model cards read from disk), only TensorFlow Serving's API protos (gRPC), or nothing beyond
the standard library, NumPy and absl (its flags) for REST with encoded images. Every
failure is one line naming the likely fix (`ServingError`), because a stack trace from grpc tells a
user nothing about a wrong model name or a server that is not running.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import urllib.error
import urllib.request

import numpy as np
from absl import flags

from mid_tf.serving.local import load_inputs, model_card_text, version_dir  # noqa: F401  (library API)

# CLI signature name -> (SavedModel signature key, input tensor name, outputs in display order)
SIGNATURES = {
    "classify": ("serving_default", "image", ("logits", "probabilities", "classes", "class_names")),
    "regenerate": ("regenerate", "image", ("image",)),
    "classify_encoded": ("classify_encoded", "image_bytes", ("logits", "probabilities", "classes", "class_names")),
}
_FIXES = {
    "NOT_FOUND": "check --model_name (the name in models.config) and --model_version/--version_label: only "
                 "versions the server has loaded are served (see the version policy in models.config)",
    "INVALID_ARGUMENT": "check --signature and the inputs: 'image' is float32 [batch, H, W, C] in [0, 1], "
                        "'image_bytes' holds PNG/JPEG files of the model's size; requests are capped (lower "
                        "--batch_size); --metadata shows the signatures, --info --export_dir=... the limits",
    "UNAVAILABLE": "is the model server running and reachable at {target}? gRPC is port 8500, REST 8501 "
                   "(docs/serving.md has the docker run command); for a TLS server pass --tls_ca",
    "DEADLINE_EXCEEDED": "raise --timeout (now {timeout:g}s) or send fewer images per request (--batch_size)",
    "RESOURCE_EXHAUSTED": "the message is too large: lower --batch_size or raise --max_message_mb",
    "FAILED_PRECONDITION": "the model is not ready (still loading, or failed to load): check the server log",
    "UNIMPLEMENTED": "the server does not implement this call: is {target} TF Serving's gRPC port (8500)?",
    "UNAUTHENTICATED": "the server wants credentials: check --tls_ca and the server's TLS setup",
}


class ServingError(RuntimeError):
    """A failed request, as one line: status code, what the server said, and the likely fix."""

    def __init__(self, code: str, details: str, target: str, timeout: float = 0.0):
        self.code, self.details = code, " ".join(str(details).split())
        fix = _FIXES.get(code, "see the server log").format(target=target, timeout=timeout)
        short = self.details if len(self.details) <= 400 else self.details[:400] + "..."
        super().__init__(f"{code} from {target}: {short} -> {fix}")


def _batches(values, batch_size):
    for start in range(0, len(values), batch_size):
        yield values[start:start + batch_size]


# ----------------------------------------------------------------------------------------------- gRPC

class GrpcClient:
    """PredictionService over gRPC, through the tensorflow-serving-api stubs."""

    def __init__(self, target: str, timeout: float = 10.0, max_message_mb: int = 64, tls_ca: str | None = None):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.target, self.timeout, self._grpc = target, timeout, grpc
        limit = int(max_message_mb * 1024 * 1024)
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        if tls_ca:
            with open(tls_ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def _spec(self, spec, model_name, signature_key, version, version_label):
        spec.name = model_name
        if signature_key:
            spec.signature_name = signature_key
        if version is not None:
            spec.version.value = int(version)
        elif version_label:
            spec.version_label = version_label

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise ServingError(e.code().name, e.details() or "", self.target, self.timeout) from None

    def predict(self, model_name, signature, inputs, version=None, version_label=None) -> dict:
        """inputs: float32 array (image) or list of bytes (image_bytes) -> {output name: np.ndarray}."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        key, input_name, _ = SIGNATURES[signature]
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model_name, key, version, version_label)
        if input_name == "image_bytes":
            proto = tf.make_tensor_proto(list(inputs), dtype=tf.string, shape=[len(inputs)])
        else:
            proto = tf.make_tensor_proto(np.asarray(inputs, np.float32))
        request.inputs[input_name].CopyFrom(proto)
        response = self._call(self.stub.Predict, request)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def metadata(self, model_name, version=None, version_label=None) -> dict:
        from tensorflow_serving.apis import get_model_metadata_pb2
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model_name, None, version, version_label)
        response = self._call(self.stub.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        return {"model": response.model_spec.name, "version": response.model_spec.version.value,
                "signatures": {name: _describe_signature(d) for name, d in sorted(sig_map.signature_def.items())
                               if not name.startswith("__")}}


def _describe_signature(sig_def) -> dict:
    import tensorflow as tf

    def tensors(infos):
        return {k: {"dtype": tf.dtypes.as_dtype(v.dtype).name, "shape": [d.size for d in v.tensor_shape.dim]}
                for k, v in sorted(infos.items())}
    return {"inputs": tensors(sig_def.inputs), "outputs": tensors(sig_def.outputs)}


def format_metadata(meta: dict) -> str:
    """One line per signature: `name: input dtype[shape] -> output dtype[shape], ...`."""
    def side(tensors):
        return ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in tensors.items())
    lines = [f"model {meta['model']} version {meta['version']}"]
    lines += [f"  {name}: {side(s['inputs'])} -> {side(s['outputs'])}" for name, s in meta["signatures"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- REST

def rest_url(server: str, model_name: str, version=None, version_label=None, verb: str | None = "predict",
             tls: bool = False) -> str:
    """TF Serving REST: http://host:8501/v1/models/<name>[/versions/N|/labels/L][:predict | /metadata]."""
    base = server if "://" in server else f"{'https' if tls else 'http'}://{server}"
    url = f"{base.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    elif version_label:
        url += f"/labels/{version_label}"
    if verb == "metadata":
        return url + "/metadata"
    return url + (f":{verb}" if verb else "")


def rest_predict_body(signature: str, inputs) -> dict:
    """The row-format request: {"signature_name", "instances": [{input name: value}]}; bytes go as {"b64": ...}."""
    key, input_name, _ = SIGNATURES[signature]
    if input_name == "image_bytes":
        instances = [{input_name: {"b64": base64.b64encode(b).decode("ascii")}} for b in inputs]
    else:
        instances = [{input_name: img.tolist()} for img in np.asarray(inputs, np.float32)]
    return {"signature_name": key, "instances": instances}


def parse_rest_predictions(signature: str, payload: dict) -> dict:
    """Row-format response -> {output: np.ndarray}. A single-output signature returns bare values."""
    predictions = payload.get("predictions")
    if predictions is None:
        raise ValueError(f"REST response has no 'predictions': {str(payload)[:200]}")
    outputs = SIGNATURES[signature][2]
    if predictions and isinstance(predictions[0], dict):
        return {k: np.asarray([p[k] for p in predictions]) for k in predictions[0]}
    return {outputs[0]: np.asarray(predictions)}


class RestClient:
    """TF Serving's JSON API with urllib only (no extra dependency)."""

    _HTTP_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED",
                   503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

    def __init__(self, server: str, timeout: float = 10.0, tls_ca: str | None = None):
        self.server, self.timeout, self.tls_ca = server, timeout, tls_ca
        self.context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None

    def _request(self, url, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                text = json.loads(text).get("error", text)
            except ValueError:
                pass
            raise ServingError(self._HTTP_CODES.get(e.code, f"HTTP_{e.code}"), f"{text} (POST/GET {url})",
                               self.server, self.timeout) from None
        except (TimeoutError, OSError) as e:  # URLError is an OSError; a read timeout is TimeoutError
            reason = getattr(e, "reason", e)
            code = "DEADLINE_EXCEEDED" if isinstance(reason, TimeoutError) or "timed out" in str(reason) \
                else "UNAVAILABLE"
            raise ServingError(code, f"{reason} ({url})", self.server, self.timeout) from None

    def predict(self, model_name, signature, inputs, version=None, version_label=None) -> dict:
        url = rest_url(self.server, model_name, version, version_label, tls=bool(self.tls_ca))
        return parse_rest_predictions(signature, self._request(url, rest_predict_body(signature, inputs)))

    def metadata(self, model_name, version=None, version_label=None) -> dict:
        """GET .../metadata; the JSON SignatureDefMap is parsed back into the proto, as over gRPC."""
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2
        payload = self._request(rest_url(self.server, model_name, version, version_label, verb="metadata",
                                         tls=bool(self.tls_ca)))
        sig_map = json_format.ParseDict(payload["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap(),
                                        ignore_unknown_fields=True)
        return {"model": payload["model_spec"]["name"], "version": int(payload["model_spec"].get("version", 0)),
                "signatures": {name: _describe_signature(d) for name, d in sorted(sig_map.signature_def.items())
                               if not name.startswith("__")}}


# ----------------------------------------------------------------------------------------------- CLI

PROG = "python -m mid_tf.serving.client"


def flag_values() -> flags.FlagValues:
    """The CLI's absl flags, in a FlagValues of their own: `main(argv)` is also a library call, so it
    must neither read nor collide with the flags of the program that calls it."""
    fv = flags.FlagValues()
    s, i, f, b = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_bool
    s("server", None, "host:port (default localhost:8500, or localhost:8501 with --rest)", flag_values=fv)
    s("model_name", "mid_mnist", "model name as in models.config", flag_values=fv)
    flags.DEFINE_enum("signature", "classify", sorted(SIGNATURES), "classify (serving_default), regenerate, or "
                      "classify_encoded (PNG/JPEG bytes)", flag_values=fv)
    flags.DEFINE_multi_string("inputs", [], ".npy arrays [N,H,W(,C)], image files, or directories (repeat the flag, "
                              "or list more after it)", flag_values=fv)
    i("model_version", None, "serve this version (default: latest)", flag_values=fv)
    s("version_label", None, "serve the version with this label (models.config)", flag_values=fv)
    flags.mark_flags_as_mutual_exclusive(["model_version", "version_label"], flag_values=fv)
    f("timeout", 10.0, "seconds per request", flag_values=fv)
    i("max_message_mb", 64, "gRPC max send/receive message size in MiB", flag_values=fv)
    i("batch_size", 64, "images per request", flag_values=fv)
    i("channels", 0, "decode images to this many channels (0: as stored)", flag_values=fv)
    s("tls_ca", None, "PEM CA bundle: use TLS (gRPC ssl_channel_credentials / https)", flag_values=fv)
    b("rest", False, "use the REST API (port 8501) instead of gRPC", flag_values=fv)
    b("metadata", False, "print the served signatures (GetModelMetadata) and exit", flag_values=fv)
    b("info", False, "print the model card of the export in --export_dir (no server needed) and exit",
      flag_values=fv)
    s("export_dir", None, "for --info: an export base (exports/mid_mnist: its newest version, or --model_version) "
      "or one version directory", flag_values=fv)
    s("output", None, "write outputs: .npz (all outputs) or .npy (probabilities, or the regenerated images)",
      flag_values=fv)
    return fv


def usage(fv: flags.FlagValues) -> str:
    summary = __doc__.split("\n\n")[0]
    return f"{summary}\n\nusage: {PROG} [flags] [more inputs]\n\n{fv.get_help(include_special_flags=False)}"


def _write_output(path, signature, outputs):
    if path.endswith(".npz"):
        np.savez(path, **outputs)
    else:
        np.save(path, outputs["image" if signature == "regenerate" else "probabilities"])


def run(args, extra_inputs=()) -> int:
    """The CLI's work for parsed flags `args`; `extra_inputs`: more input paths (positional arguments)."""
    if args.info:
        if not args.export_dir:
            raise ValueError("--info reads the model card from an export: pass --export_dir=exports/mid_mnist "
                             "(the --export_base of mid-export)")
        print(model_card_text(args.export_dir, args.model_version))
        return 0
    if args.batch_size < 1 or args.timeout <= 0:
        raise ValueError("--batch_size must be >= 1 and --timeout > 0")
    paths = [*args.inputs, *extra_inputs]
    if not paths and not args.metadata:
        raise ValueError("nothing to send: pass --inputs (files or directories), or --metadata")
    # Inputs first: a bad file fails before any connection (and before the gRPC stubs load TensorFlow).
    names, inputs = load_inputs(paths, args.signature, args.channels) if not args.metadata else (None, None)
    server = args.server or ("localhost:8501" if args.rest else "localhost:8500")
    client = RestClient(server, args.timeout, args.tls_ca) if args.rest else \
        GrpcClient(server, args.timeout, args.max_message_mb, args.tls_ca)
    try:
        if args.metadata:
            print(format_metadata(client.metadata(args.model_name, args.model_version, args.version_label)))
            return 0
        parts = [client.predict(args.model_name, args.signature, chunk, args.model_version, args.version_label)
                 for chunk in _batches(inputs, args.batch_size)]
    finally:
        if hasattr(client, "close"):
            client.close()
    outputs = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    if "classes" in outputs:
        labels = outputs.get("class_names", [None] * len(names))
        for name, cls, label, probs in zip(names, outputs["classes"], labels, outputs["probabilities"]):
            label = f" ({label.decode() if isinstance(label, bytes) else label})" if label is not None else ""
            print(f"{name}\tclass {int(cls)}{label}\tp={float(np.max(probs)):.4f}")
    else:
        print(f"regenerated {len(names)} images, shape {outputs['image'].shape[1:]}, "
              f"range [{outputs['image'].min():.3f}, {outputs['image'].max():.3f}]")
    if args.output:
        _write_output(args.output, args.signature, outputs)
        print(f"outputs written to {args.output}")
    return 0


def main(argv=None) -> int:
    """The CLI: `argv` without the program name (default: sys.argv[1:]). Returns the exit status: 0, or
    2 with one line `error: ...` on stderr (a bad flag, a bad input, or a failed request)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = flag_values()
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
        print(usage(fv))
        return 0
    try:
        positional = fv([PROG, *argv])[1:]
        return run(fv, positional)
    except (flags.Error, ServingError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
