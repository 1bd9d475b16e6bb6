"""Accuracy of the undefended MNIST target under every registered attack (a quick sanity table).

    python -m mid_tf.attacks.table --data_dir=../shared/data/mnist --examples=1000 \
        [--model_dir=runs/x] [--train_epochs=3] [--attacks=all|pgd40,cw_l2:max_iterations=100] \
        [--slow_examples=100]

The target is loaded from a train.py `<model_dir>` (target/target.weights.h5) or from
`<model_dir>/target/model.weights.h5` when present, else trained here
(official LeNet, width 1) for `--train_epochs` epochs on the training split and saved there. Graph-safe attacks run
on `--examples` test images (in tf.function, batch 256); eager-only ones (CW-L2, SPSA, ART) on the
first `--slow_examples` of them, because they are orders of magnitude slower on CPU (see docs/attacks.md).
A bad flag or attack list ends the run with one line `error: ...` and status 2.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from mid_tf.cli.common import fail, parse_flags

FLAGS = flags.FLAGS


def load_or_train_target(model_dir: str | None, data_dir: str | None, epochs: int = 1, width: float = 1.0,
                         train_examples: int | None = None, seed: int = 0, log=print):
    """The undefended target: weights from a train.py model_dir, `model_dir/target/model.weights.h5`, or trained now."""
    import keras
    from mid_tf.data.datasets import load_split
    from mid_tf.models.factory import build_models

    keras.utils.set_random_seed(seed)
    model = build_models("mnist", width=width).target
    # A train.py model_dir keeps the target at target/target.weights.h5; standalone runs of this
    # tool save theirs as target/model.weights.h5.
    trained = os.path.join(model_dir, "target", "target.weights.h5") if model_dir else None
    path = os.path.join(model_dir, "target", "model.weights.h5") if model_dir else None
    if trained and os.path.isfile(trained):
        path = trained
    if path and os.path.isfile(path):
        model.load_weights(path)
        log(f"target: loaded {path}")
        return model
    split = load_split("mnist", "train", data_dir, limit=train_examples)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t = time.time()
    model.fit(split.images.astype(np.float32) / 255.0, split.labels, batch_size=128, epochs=epochs, verbose=0)
    log(f"target: trained {epochs} epoch(s) on {len(split)} images in {time.time() - t:.0f}s")
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model.save_weights(path)
        log(f"target: saved {path}")
    return model


def evaluate(specs, model_fn, x, y, slow_examples: int = 100, batch_size: int = 256, seed: int = 0, log=print):
    """Rows (name, kind, n, accuracy, max L-inf, max L2, seconds) for each spec."""
    from mid_tf.attacks.crafting import make_attack
    rows = []
    for spec in specs:
        attack = make_attack(spec)
        n = len(x) if spec.graph_safe else min(len(x), slow_examples)
        run = lambda a, b, s, _f=attack: _f(model_fn, a, b, seed=s)  # noqa: E731
        run = tf.function(run, autograph=False) if spec.graph_safe else run
        t, correct, linf, l2 = time.time(), 0, 0.0, 0.0
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size][:n - i], y[i:i + batch_size][:n - i]
            s = tf.constant([seed, i], tf.int64)
            adv = np.asarray(run(tf.constant(xb), tf.constant(yb), s))
            correct += int(np.sum(np.argmax(model_fn(tf.constant(adv)).numpy(), -1) == yb))
            d = (adv - xb).reshape(len(xb), -1)
            linf, l2 = max(linf, float(np.abs(d).max())), max(l2, float(np.sqrt((d ** 2).sum(1)).max()))
        row = (spec.name, spec.kind, n, correct / n, linf, l2, time.time() - t)
        log("%-40s %-8s %5d  acc %.4f  max_linf %.3f  max_l2 %6.3f  %7.1fs" % row)
        rows.append(row)
    return rows


def define_flags() -> None:
    """The tool's flags (defined when it runs, not when `load_or_train_target` is imported)."""
    flags.DEFINE_string("data_dir", None, "MNIST directory (IDX files); default: $MID_DATA_DIR, else TFDS's.")
    flags.DEFINE_string("model_dir", None, "A train.py model_dir with a trained target, or where to save one.")
    flags.DEFINE_integer("examples", 1000, "Test images for the graph-safe attacks.", lower_bound=1)
    flags.DEFINE_integer("slow_examples", 100, "The first N of them for eager-only attacks (CW-L2, SPSA, ART).",
                         lower_bound=1)
    flags.DEFINE_integer("train_epochs", 3, "Epochs to train the target when no weights are found.", lower_bound=0)
    flags.DEFINE_string("attacks", "all", "all, or a registry attack list: pgd40,cw_l2:max_iterations=100")
    flags.DEFINE_integer("seed", 0, "Seed of the target's training and of the attacks.")


def main(argv) -> int:
    from mid_tf.attacks.registry import REGISTRY, parse_attack_list
    from mid_tf.data.datasets import load_split

    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    try:
        specs = list(REGISTRY.values()) if FLAGS.attacks == "all" else parse_attack_list(FLAGS.attacks)
    except ValueError as e:
        return fail(f"--attacks: {e}")
    model = load_or_train_target(FLAGS.model_dir, FLAGS.data_dir, FLAGS.train_epochs, seed=FLAGS.seed)
    fn = lambda z: model(z, training=False)  # noqa: E731
    test = load_split("mnist", "test", FLAGS.data_dir, limit=FLAGS.examples)
    x, y = test.images.astype(np.float32) / 255.0, test.labels.astype(np.int64)
    print(f"{'attack':40s} {'kind':8s} {'n':>5s}")
    evaluate(specs, fn, x, y, slow_examples=FLAGS.slow_examples, seed=FLAGS.seed)
    return 0


def run() -> None:
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
