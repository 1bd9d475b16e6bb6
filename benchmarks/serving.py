"""Serving speed of the exported SavedModel against the Keras pipeline it was exported from, same run.

    python benchmarks/serving.py --export=exports/mid_mnist/1 --model_dir=runs/mnist
        [--requests=300] [--batch=256] [--server=localhost:8500 --model_name=mid_mnist] [--xla_kernels=auto]

For each path it prints batch-1 latency (p50 / p99 over --requests calls, after warm-up) and batch-B
throughput (images/s):
  savedmodel   tf.saved_model.load(...).signatures['serving_default'] in this process: the graph
               TF Serving runs, with its input checks (what a server adds on top is RPC + batching)
  keras eager  the Keras pipeline C(E_s(x)) called directly, model(x)
  keras graph  the same pipeline inside tf.function (the fastest in-process Keras path)
With --server it also times Predict over gRPC against a running TF Serving (`docker run
tensorflow/serving`, see docs/serving.md); nothing here starts a server. `--xla_kernels` picks the
kernels the Keras paths trace (the SavedModel always holds the stock ones).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FLAGS, configure_xla_kernels, define_xla_kernels_flag, fail, parse_flags  # noqa: E402

flags.DEFINE_string("export", None, "A SavedModel version directory written by export.py.")
flags.DEFINE_string("model_dir", None, "The train.py model_dir the export came from.")
flags.mark_flags_as_required(["export", "model_dir"])
flags.DEFINE_integer("requests", 300, "Batch-1 calls per path for the latency percentiles.", lower_bound=1)
flags.DEFINE_integer("batch", 256, "Images per call for the throughput.", lower_bound=1)
flags.DEFINE_string("server", None, "host:port of a running TF Serving gRPC endpoint (optional).")
flags.DEFINE_string("model_name", None, "Model name on --server (default: the export's parent directory).")
define_xla_kernels_flag()


def latency(fn, n: int, warmup: int = 10) -> tuple[float, float]:
    """(p50, p99) milliseconds of `fn()` over n calls."""
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3)


def throughput(fn, batch: int, min_seconds: float = 3.0) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return batch * n / (time.perf_counter() - t0)


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    if not os.path.exists(os.path.join(FLAGS.export, "saved_model.pb")):
        return fail(f"--export {FLAGS.export} has no saved_model.pb; run `python export.py --model_dir=... "
                    "--export_base=...`")
    paths, x1, xb = build_paths()
    print(f"{'path':14s} {'b1 p50 ms':>10s} {'b1 p99 ms':>10s} {'b' + str(FLAGS.batch) + ' img/s':>12s}")
    base = None
    for name, fn in paths.items():
        p50, p99 = latency(lambda: fn(x1), FLAGS.requests)
        thr = throughput(lambda: fn(xb), FLAGS.batch)
        base = base or (p50, thr)
        print(f"{name:14s} {p50:10.2f} {p99:10.2f} {thr:12.0f}   (p50 x{base[0] / p50:.2f}, "
              f"throughput x{thr / base[1]:.2f} vs savedmodel)", flush=True)
    return 0


def build_paths():
    """({path name: fn(images) -> logits}, a batch-1 input, a batch-B input); prints the setup."""
    import tensorflow as tf
    from mid_tf.artifacts import load_models
    from mid_tf.models import build_pipeline

    print(f"tensorflow {tf.__version__}  cores {os.cpu_count()}  export {FLAGS.export}")
    print(configure_xla_kernels())
    sig = tf.saved_model.load(FLAGS.export).signatures["serving_default"]
    models = load_models(FLAGS.model_dir)
    pipe = build_pipeline(models.student_encoder, models.student_classifier)  # the exported pipeline
    pipe_graph = tf.function(lambda z: pipe(z, training=False))
    rng = np.random.default_rng(0)
    x1 = tf.constant(rng.random((1, *models.input_shape), np.float32))
    xb = tf.constant(rng.random((FLAGS.batch, *models.input_shape), np.float32))
    diff = float(np.abs(sig(image=xb)["logits"].numpy() - pipe(xb).numpy()).max())

    paths = {
        "savedmodel": lambda z: sig(image=z)["logits"].numpy(),
        "keras eager": lambda z: pipe(z, training=False).numpy(),
        "keras graph": lambda z: pipe_graph(z).numpy(),
    }
    if FLAGS.server:
        from mid_tf.serving.client import GrpcClient
        served = FLAGS.model_name or os.path.basename(os.path.dirname(os.path.abspath(FLAGS.export)))
        client = GrpcClient(FLAGS.server)
        paths["grpc predict"] = lambda z: client.predict(served, "classify", z.numpy())

    print(f"max |savedmodel - keras| logits on {FLAGS.batch} images: {diff:.2e}\n")
    return paths, x1, xb


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
