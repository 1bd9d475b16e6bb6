"""Attack throughput on the MNIST target, and the training pool: our runner vs CleverHans one by one.

    python benchmarks/attacks.py --data_dir=../shared/data/mnist [--model_dir=runs/x] [--batch=256]
        [--attacks=fgsm,pgd40,...] [--slow_batch=16] [--min_seconds=3] [--pool_only] [--xla_kernels=auto]

Target: official LeNet (width 1) from `<model_dir>/target/model.weights.h5`, else trained here for
one epoch. Graph-safe attacks are timed inside `tf.function` at `--batch`; eager-only ones (CW-L2,
SPSA, ART) on `--slow_batch` images with shortened settings (printed). The pool comparison crafts the
official pool (clean, pgd40, pgd40_t0, mim40, mim40_t0) on one batch three ways, in the same run:
  A  AttackPool.craft_all in tf.function (one batched 40-step loop for the 4 attacks)
  B  the same CleverHans functions called one after another eagerly
  C  the CleverHans functions one after another inside one tf.function (the non-batched pool)
and prints the ratios B/A and C/A.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FLAGS, configure_xla_kernels, define_xla_kernels_flag, fail, parse_flags  # noqa: E402
from mid_tf.attacks import get_spec, make_attack  # noqa: E402
from mid_tf.attacks.pool import AttackPool  # noqa: E402
from mid_tf.attacks.registry import split_attack_list  # noqa: E402
from mid_tf.attacks.table import load_or_train_target  # noqa: E402
from mid_tf.data.datasets import load_split  # noqa: E402

DEFAULT = ("fgsm,bim40,pgd40,pgd40_t0,mim40,mim40_t0,pgd_l2,cw_l2:max_iterations=100,spsa:nb_iter=20,"
           "autoattack:max_iter=20,square_max_iter=100,square:max_iter=100,deepfool:max_iter=20,spatial,jsma_t0")

flags.DEFINE_string("data_dir", os.environ.get("MID_DATA_DIR"), "MNIST directory (IDX files); default $MID_DATA_DIR.")
flags.DEFINE_string("model_dir", None, "A model_dir with target/model.weights.h5 (else one epoch is trained here).")
flags.DEFINE_integer("batch", 256, "Images per graph-safe attack call and for the pool comparison.", lower_bound=1)
flags.DEFINE_integer("slow_batch", 16, "Images per eager-only attack call.", lower_bound=1)
flags.DEFINE_string("attacks", DEFAULT, "Registry attack list for the per-attack table.")
flags.DEFINE_float("min_seconds", 3.0, "Time each graph-safe attack for at least this long.", lower_bound=0.0)
flags.DEFINE_bool("pool_only", False, "Skip the per-attack table.")
define_xla_kernels_flag()


def timeit(fn, min_seconds: float, warmup: int = 1) -> float:
    """Seconds per call (after `warmup` untimed calls), over >= min_seconds and >= 2 calls."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    try:
        groups = [get_spec(name) for name in split_attack_list(FLAGS.attacks)]
    except ValueError as e:
        return fail(f"--attacks: {e}")
    print(configure_xla_kernels())
    model = load_or_train_target(FLAGS.model_dir, FLAGS.data_dir, epochs=1)
    fn = lambda z: model(z, training=False)  # noqa: E731
    test = load_split("mnist", "test", FLAGS.data_dir, limit=FLAGS.batch)
    x = tf.constant(test.images.astype(np.float32) / 255.0)
    y = tf.constant(test.labels.astype(np.int64))
    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}  batch {FLAGS.batch}")
    if not FLAGS.pool_only:
        attack_table(groups, fn, x, y)
    pool_comparison(fn, x, y)
    return 0


def attack_table(specs, fn, x, y) -> None:
    print(f"\n{'attack':52s} {'images':>6s} {'img/s':>9s}")
    for spec in specs:
        attack = make_attack(spec)
        if spec.graph_safe:
            g = tf.function(lambda _f=attack: _f(fn, x, y, seed=tf.constant([0, 1], tf.int64)), autograph=False)
            sec, n = timeit(lambda: g().numpy(), FLAGS.min_seconds), FLAGS.batch
        else:
            xs, ys = x[:FLAGS.slow_batch], y[:FLAGS.slow_batch]
            sec, n = timeit(lambda: np.asarray(attack(fn, xs, ys, seed=1)), 0.0, warmup=0), FLAGS.slow_batch
        print(f"{spec.name:52s} {n:6d} {n / sec:9.1f}")


def pool_comparison(fn, x, y) -> None:
    """The official pool crafted three ways (module docstring), timed in this run."""
    pool = AttackPool(seed=0, batched_runner=True)
    step = tf.constant(1, tf.int64)
    runner = tf.function(lambda: pool.craft_all(fn, x, y, step), autograph=False)
    seq_pool = AttackPool(seed=0, batched_runner=False)
    seq_graph = tf.function(lambda: seq_pool.craft_all(fn, x, y, step), autograph=False)
    fns = [make_attack(s) for s in pool.specs]
    seeds = [pool.task_seed(step, i) for i in range(pool.num_tasks)]

    def eager_sequential():
        return tf.stack([f(fn, x, y, seed=s) for f, s in zip(fns, seeds)])

    ta = timeit(lambda: runner().numpy(), FLAGS.min_seconds)
    tb = timeit(lambda: eager_sequential().numpy(), FLAGS.min_seconds)
    tc = timeit(lambda: seq_graph().numpy(), FLAGS.min_seconds)
    same = float(np.abs(runner().numpy() - eager_sequential().numpy()).max())
    print(f"\ntraining pool {list(pool.names)} on {FLAGS.batch} images (4 attacks x 40 steps):")
    print(f"  A pool runner (batched, tf.function)       {ta * 1e3:8.0f} ms/batch  {FLAGS.batch / ta:7.1f} img/s")
    print(f"  B CleverHans one after another, eager     {tb * 1e3:8.0f} ms/batch  {FLAGS.batch / tb:7.1f} img/s")
    print(f"  C CleverHans one after another, tf.function {tc * 1e3:6.0f} ms/batch  {FLAGS.batch / tc:7.1f} img/s")
    print(f"  speed-up B/A = {tb / ta:.2f}x   C/A = {tc / ta:.2f}x   max|A - B| = {same:.2e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
