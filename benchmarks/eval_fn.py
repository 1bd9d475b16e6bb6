"""The eval stage's logits function: a Keras model called eagerly vs compiled (`evaluation/pieces.as_fn`).

    python benchmarks/eval_fn.py [--model_dir=runs/cifar10 --network=pgd_at --data_dir=DIR]
        [--examples=100] [--attacks=apgd_ce,square:max_iter=200]

The eager-only attacks (ART's APGD/Square/AutoAttack, CleverHans' CW-L2) call the logits function hundreds
of times per batch. This times, in one run: one forward pass at batch 1 and 128, and each attack on the same
`--examples` images, with the model called eagerly and through `tf.function`, and prints the ratios.
Without --model_dir: an untrained width-1/8 CIFAR-10 target on random images (the script's own check).
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

from common import FLAGS, fail, parse_flags  # noqa: E402
from mid_tf.attacks import get_spec, make_attack  # noqa: E402
from mid_tf.attacks.registry import split_attack_list, threat_model, threat_model_for  # noqa: E402

flags.DEFINE_string("model_dir", None, "A run whose --network stage has completed (else an untrained network).")
flags.DEFINE_enum("network", "pgd_at", ["target", "pgd_at", "trades", "mid"], "Which network of the run.")
flags.DEFINE_string("data_dir", None, "The run's data directory (its test split); else random images.")
flags.DEFINE_integer("examples", 100, "Images per attack.", lower_bound=1)
flags.DEFINE_string("attacks", "apgd_ce,square:max_iter=200", "Eager-only registry attacks to time.")


def network_and_images():
    from mid_tf import artifacts
    from mid_tf.data.datasets import load_split
    from mid_tf.models import build_models, build_pipeline
    if FLAGS.model_dir is None:
        net = build_models("cifar10", width=0.125).target
        rng = np.random.default_rng(0)
        return net, rng.random((FLAGS.examples, 32, 32, 3), np.float32), rng.integers(0, 10, FLAGS.examples), "cifar10"
    identity = artifacts.read_run_identity(FLAGS.model_dir)
    stages = ("target", "teacher", "mid") if FLAGS.network == "mid" else (FLAGS.network,)
    models = artifacts.load_models(FLAGS.model_dir, stages=stages)
    net = (build_pipeline(models.student_encoder, models.student_classifier, name="mid") if FLAGS.network == "mid"
           else getattr(models, FLAGS.network))
    test = load_split(identity["dataset"], "test", FLAGS.data_dir, limit=FLAGS.examples)
    return net, test.images.astype(np.float32) / 255.0, test.labels.astype(np.int64), identity["dataset"]


def seconds(fn, calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    net, x, y, dataset = network_and_images()
    with threat_model(threat_model_for(dataset, x.shape[-1])) as tm:  # the run's budget, as the eval stage
        try:
            specs = [get_spec(name) for name in split_attack_list(FLAGS.attacks)]
        except ValueError as e:
            return fail(f"--attacks: {e}")
    if any(s.graph_safe for s in specs):
        return fail("--attacks: only eager-only attacks (ART, CW-L2, SPSA) call the logits function eagerly")
    fns = {"eager": lambda z: net(z, training=False),
           "compiled": tf.function(lambda z: net(z, training=False), reduce_retracing=True)}
    print(f"network {FLAGS.network if FLAGS.model_dir else 'untrained cifar10 target'}, {len(x)} images, "
          f"threat model {tm.describe()}")
    for b in (1, 128):
        z = tf.constant(np.resize(x, (b,) + x.shape[1:]))
        t = {k: (f(z), seconds(lambda f=f: f(z), 10))[1] for k, f in fns.items()}
        print(f"forward batch {b:4d}: eager {t['eager'] * 1e3:8.1f} ms  compiled {t['compiled'] * 1e3:8.1f} ms  "
              f"ratio {t['eager'] / t['compiled']:.2f}x")
    for spec in specs:
        attack, acc, t = make_attack(spec), {}, {}
        for k, f in fns.items():
            t[k] = seconds(lambda f=f: acc.__setitem__(k, np.mean(
                np.argmax(fns["compiled"](attack(f, x, y, seed=0)).numpy(), 1) == y)))
        print(f"{spec.name:30s} eager {t['eager']:8.1f} s  compiled {t['compiled']:8.1f} s  ratio "
              f"{t['eager'] / t['compiled']:.2f}x  accuracy left {acc['eager']:.3f} / {acc['compiled']:.3f}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
