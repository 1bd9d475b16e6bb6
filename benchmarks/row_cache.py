"""ART attacks with and without the per-example row cache (mid_tf/attacks/row_cache.py).

    python benchmarks/row_cache.py [--model_dir=runs/cifar10 --network=pgd_at --data_dir=DIR]
        [--examples=100] [--attacks=square:max_iter=200,autoattack]

Times each eager-only attack on the same `--examples` images that the network classifies correctly (the
eval stage's white-box rule), once with the row cache off (every ART request goes through the model, as
ART does it) and once on, same seed, and prints the ratio and the accuracy left. Flags as
benchmarks/eval_fn.py; without --model_dir an untrained width-1/8 CIFAR-10 target on random images.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow as tf
from absl import app

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FLAGS, fail, parse_flags  # noqa: E402
from eval_fn import network_and_images, seconds  # noqa: E402  (defines the shared flags)
from mid_tf.attacks import get_spec, make_attack  # noqa: E402
from mid_tf.attacks.registry import split_attack_list, threat_model, threat_model_for  # noqa: E402
from mid_tf.attacks.art_suite import ART_PARAMS  # noqa: E402
from mid_tf.attacks.row_cache import RowCache  # noqa: E402

FLAGS.set_default("attacks", "square:max_iter=200,autoattack")


def _uncached(self, compute, *arrays):
    return tuple(np.asarray(o) for o in compute(*arrays))


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    net, x, y, dataset = network_and_images()
    fn = tf.function(lambda z: net(z, training=False), reduce_retracing=True)
    if FLAGS.model_dir is not None:  # attack only what the model gets right, as the eval stage does
        keep = np.argmax(fn(tf.constant(x)).numpy(), 1) == y
        x, y = x[keep], y[keep]
    with threat_model(threat_model_for(dataset, x.shape[-1])) as tm:
        try:
            specs = [get_spec(name) for name in split_attack_list(FLAGS.attacks)]
        except ValueError as e:
            return fail(f"--attacks: {e}")
    if any(s.method not in ART_PARAMS for s in specs):
        return fail("--attacks: only ART's attacks (eager-only) go through the row cache")
    print(f"network {FLAGS.network if FLAGS.model_dir else 'untrained cifar10 target'}, {len(x)} images, "
          f"threat model {tm.describe()}")
    cached_call = RowCache.__call__
    for spec in specs:
        attack, acc, t = make_attack(spec), {}, {}
        for mode in ("off", "on"):
            RowCache.__call__ = _uncached if mode == "off" else cached_call
            try:
                t[mode] = seconds(lambda m=mode: acc.__setitem__(m, np.mean(
                    np.argmax(fn(attack(fn, x, y, seed=0)).numpy(), 1) == y)))
            finally:
                RowCache.__call__ = cached_call
        print(f"{spec.name:30s} cache off {t['off']:8.1f} s  on {t['on']:8.1f} s  ratio {t['off'] / t['on']:.2f}x  "
              f"accuracy left {acc['off']:.3f} / {acc['on']:.3f}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
