"""Attack throughput on the MNIST target, and the training pool: our runner vs CleverHans one by one.

    python benchmarks/attacks.py --data_dir ../shared/data/mnist [--model_dir runs/x] [--batch 256]
        [--attacks fgsm,pgd40,...] [--slow_batch 16] [--min_seconds 3]

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

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mid_tf.attacks import get_spec, make_attack  # noqa: E402
from mid_tf.attacks.registry import split_attack_list  # noqa: E402
from mid_tf.attacks.pool import AttackPool  # noqa: E402
from mid_tf.attacks.table import load_or_train_target  # noqa: E402
from mid_tf.data.datasets import load_split  # noqa: E402

DEFAULT = ("fgsm,bim40,pgd40,pgd40_t0,mim40,mim40_t0,pgd_l2,cw_l2:max_iterations=100,spsa:nb_iter=20,"
           "autoattack:max_iter=20,square_max_iter=100,square:max_iter=100,deepfool:max_iter=20,spatial,jsma_t0")


def timeit(fn, min_seconds: float, warmup: int = 1) -> float:
    """Seconds per call (after `warmup` untimed calls), over >= min_seconds and >= 2 calls."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.environ.get("MID_DATA_DIR"))
    p.add_argument("--model_dir", default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--slow_batch", type=int, default=16)
    p.add_argument("--attacks", default=DEFAULT)
    p.add_argument("--min_seconds", type=float, default=3.0)
    p.add_argument("--pool_only", action="store_true", help="skip the per-attack table")
    a = p.parse_args(argv)

    model = load_or_train_target(a.model_dir, a.data_dir, epochs=1)
    fn = lambda z: model(z, training=False)  # noqa: E731
    test = load_split("mnist", "test", a.data_dir, limit=a.batch)
    x = tf.constant(test.images.astype(np.float32) / 255.0)
    y = tf.constant(test.labels.astype(np.int64))
    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}  batch {a.batch}")

    print(f"\n{'attack':52s} {'images':>6s} {'img/s':>9s}")
    groups = split_attack_list(a.attacks)
    for name in ([] if a.pool_only else groups):
        spec = get_spec(name)
        attack = make_attack(spec)
        if spec.graph_safe:
            g = tf.function(lambda _f=attack: _f(fn, x, y, seed=tf.constant([0, 1], tf.int64)), autograph=False)
            sec, n = timeit(lambda: g().numpy(), a.min_seconds), a.batch
        else:
            xs, ys = x[:a.slow_batch], y[:a.slow_batch]
            sec, n = timeit(lambda: np.asarray(attack(fn, xs, ys, seed=1)), 0.0, warmup=0), a.slow_batch
        print(f"{spec.name:52s} {n:6d} {n / sec:9.1f}")

    pool = AttackPool(seed=0, batched_runner=True)
    step = tf.constant(1, tf.int64)
    runner = tf.function(lambda: pool.craft_all(fn, x, y, step), autograph=False)
    seq_pool = AttackPool(seed=0, batched_runner=False)
    seq_graph = tf.function(lambda: seq_pool.craft_all(fn, x, y, step), autograph=False)
    fns = [make_attack(s) for s in pool.specs]
    seeds = [pool.task_seed(step, i) for i in range(pool.num_tasks)]

    def eager_sequential():
        return tf.stack([f(fn, x, y, seed=s) for f, s in zip(fns, seeds)])

    ta = timeit(lambda: runner().numpy(), a.min_seconds)
    tb = timeit(lambda: eager_sequential().numpy(), a.min_seconds)
    tc = timeit(lambda: seq_graph().numpy(), a.min_seconds)
    same = float(np.abs(runner().numpy() - eager_sequential().numpy()).max())
    print(f"\ntraining pool {list(pool.names)} on {a.batch} images (4 attacks x 40 steps):")
    print(f"  A pool runner (batched, tf.function)       {ta * 1e3:8.0f} ms/batch  {a.batch / ta:7.1f} img/s")
    print(f"  B CleverHans one after another, eager     {tb * 1e3:8.0f} ms/batch  {a.batch / tb:7.1f} img/s")
    print(f"  C CleverHans one after another, tf.function {tc * 1e3:6.0f} ms/batch  {a.batch / tc:7.1f} img/s")
    print(f"  speed-up B/A = {tb / ta:.2f}x   C/A = {tc / ta:.2f}x   max|A - B| = {same:.2e}")


if __name__ == "__main__":
    main()
