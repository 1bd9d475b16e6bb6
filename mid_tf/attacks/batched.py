"""One batched loop for several L-inf gradient attacks that share a source model and step count.

The official training pool crafts PGD-40 (untargeted and targeted) and MIM-40 (untargeted and
targeted) on the same batch every step. Called one after another that is 4 x 40 small forward/
backward passes; here the 4 tasks are concatenated into one 4B batch and run as ONE 40-step
loop (input gradients only, `watch_accessed_variables=False`).

Equivalence with the CleverHans functions (given the same labels/targets and random start):
  * all steps use the per-example CE gradient (CleverHans differentiates the sum of per-example
    losses, so batching does not change an example's gradient), negated for targeted tasks;
  * MIM: g / max(1e-12, mean|g|), momentum = decay * momentum + g, step eps_iter * sign(momentum);
    PGD/BIM/FGM are the same update with decay 0 (sign of a positively scaled gradient is unchanged);
  * PGD/BIM/FGM clip to [0,1] before projecting onto the eps-ball (CleverHans' FGM step then PGD's
    projection), MIM projects then clips, exactly as CleverHans orders them;
  * the random start is `seeded_lp_vector` with `crafting.start_seed(seed)`, as in `make_attack`.
Results match per-attack CleverHans calls up to float round-off of batched convolutions
(tests/test_pool.py checks it).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mid_tf.attacks.crafting import attack_labels, start_seed
from mid_tf.attacks.registry import AttackSpec
from mid_tf.attacks.seeds import seeded_lp_vector


def batch_key(spec: AttackSpec):
    """Specs with equal keys can share one batched loop; None = run on its own."""
    if spec.method in ("fgm", "bim", "pgd", "mim") and spec.norm == np.inf and not spec.params:
        return ("linf", 1 if spec.method == "fgm" else int(spec.nb_iter))
    return None


def run_linf_group(specs, model_fn, x, y, seeds) -> list:
    """Crafts every spec in `specs` (same batch_key) on (x, y); `seeds[i]` seeds spec i. Returns a
    list of [B, ...] adversarial tensors in the order of `specs`."""
    keys = {batch_key(s) for s in specs}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"cannot batch {[s.name for s in specs]}: need L-inf FGM/BIM/PGD/MIM with one step count")
    nb_iter = keys.pop()[1]
    x = tf.convert_to_tensor(x, tf.float32)
    b = tf.shape(x)[0]
    per = lambda v: tf.repeat(tf.constant(v, tf.float32), b)[:, None, None, None]  # noqa: E731

    labels, starts, sign, eps, step, decay, clip_first = [], [], [], [], [], [], []
    for spec, seed in zip(specs, seeds):
        labels.append(attack_labels(spec, model_fn, x, y, seed))
        e = float(spec.eps)
        if spec.rand_init:
            eta = tf.clip_by_value(seeded_lp_vector(tf.shape(x), np.inf, e, start_seed(seed)), -e, e)
            starts.append(tf.clip_by_value(x + eta, 0.0, 1.0))
        else:
            starts.append(x)
        sign.append(per(-1.0 if spec.targeted else 1.0))
        eps.append(per(e))
        step.append(per(e if spec.method == "fgm" else float(spec.eps_iter)))
        decay.append(per(float(spec.decay) if spec.method == "mim" else 0.0))
        clip_first.append(per(0.0 if spec.method == "mim" else 1.0))

    n = len(specs)
    xs = tf.tile(x, tf.concat([[n], tf.ones([tf.rank(x) - 1], tf.int32)], 0))
    labels = tf.concat(labels, 0)
    sign, eps, step, decay = (tf.concat(v, 0) for v in (sign, eps, step, decay))
    clip_first = tf.concat(clip_first, 0) > 0.5
    axes = list(range(1, len(x.shape)))

    adv = tf.concat(starts, 0)
    mom = tf.zeros_like(adv)
    for _ in range(nb_iter):  # unrolled like CleverHans: a tf.while_loop was slower on CPU (docs/performance.md)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(adv)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=model_fn(adv))
        g = tape.gradient(loss, adv) * sign
        g = g / tf.maximum(1e-12, tf.reduce_mean(tf.abs(g), axes, keepdims=True))
        mom = decay * mom + g
        moved = adv + step * tf.sign(mom)
        moved = tf.where(clip_first, tf.clip_by_value(moved, 0.0, 1.0), moved)
        adv = tf.clip_by_value(xs + tf.clip_by_value(moved - xs, -eps, eps), 0.0, 1.0)
    adv = tf.stop_gradient(adv)
    return tf.split(adv, n, axis=0) if n > 1 else [adv]
