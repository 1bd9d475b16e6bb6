"""Accuracy of the undefended MNIST target under every registered attack (a quick sanity table).

    python -m mid_tf.attacks.table --data_dir ../shared/data/mnist --examples 1000 \
        [--model_dir runs/x] [--train_epochs 3] [--attacks all|pgd40,cw_l2:max_iterations=100] \
        [--slow_examples 100]

The target is loaded from a train.py `<model_dir>` (target/target.weights.h5) or from
`<model_dir>/target/model.weights.h5` when present, else trained here
(official LeNet, width 1) for `--train_epochs` epochs on the training split and saved there. Graph-safe attacks run
on `--examples` test images (in tf.function, batch 256); eager-only ones (CW-L2, SPSA, ART) on the
first `--slow_examples` of them, because they are 10-1000x slower on CPU (see docs/attacks.md).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import tensorflow as tf


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
    from mid_tf.attacks.registry import make_attack
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


def main(argv=None):
    from mid_tf.attacks.registry import REGISTRY, parse_attack_list
    from mid_tf.data.datasets import load_split

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--model_dir", default=None)
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--slow_examples", type=int, default=100)
    p.add_argument("--train_epochs", type=int, default=3)
    p.add_argument("--attacks", default="all")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    specs = list(REGISTRY.values()) if a.attacks == "all" else parse_attack_list(a.attacks)
    model = load_or_train_target(a.model_dir, a.data_dir, a.train_epochs, seed=a.seed)
    fn = lambda z: model(z, training=False)  # noqa: E731
    test = load_split("mnist", "test", a.data_dir, limit=a.examples)
    x, y = test.images.astype(np.float32) / 255.0, test.labels.astype(np.int64)
    print(f"{'attack':40s} {'kind':8s} {'n':>5s}")
    evaluate(specs, fn, x, y, slow_examples=a.slow_examples, seed=a.seed)


if __name__ == "__main__":
    main()
