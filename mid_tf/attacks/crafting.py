"""`make_attack(spec) -> fn(model_fn, x, y, seed)`: the attack functions behind the registry's specs.

Every attack is a plain CleverHans-style function: `model_fn` (float32 images in [0,1] -> logits) is
given at call time, so the same spec attacks the fixed target or the student pipeline. Untargeted
attacks use the true labels `y` (as the official advertorch code), targeted ones a target chosen by
the spec's policy. Outputs are float32 tensors in [0,1] with `tf.stop_gradient` applied: only input
gradients are ever taken, never weight gradients, and an outer training tape does not differentiate
through the attack.

Gradient attacks (FGM/BIM/PGD/MIM) call CleverHans 4.0.0 with `sanity_checks=False`; they are
`graph_safe` (run in `tf.function` / `strategy.run`) and deterministic given `seed` (an int or a [2]
int tensor: the PGD random start and random targets come from stateless ops keyed by it, see
seeds.py; `seed=None` draws fresh randomness). CW-L2 and SPSA (CleverHans, patched by
`compat/cleverhans.py`) and the IBM ART attacks (`art_suite`) are eager-only.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from mid_tf.attacks import art_suite
from mid_tf.attacks.registry import GRADIENT_METHODS, METHOD_PARAMS, AttackSpec, get_spec, parse_target
from mid_tf.attacks.seeds import as_seed, fold, seeded_random_start
from mid_tf.compat import cleverhans as ch_compat


# ---------------------------------------------------------------- labels for an attack
def attack_labels(spec: AttackSpec, model_fn, x, y, seed=None) -> tf.Tensor:
    """int64 labels the attack optimises for: true labels (untargeted) or targets (targeted)."""
    if not spec.targeted:
        if y is None:
            return tf.argmax(model_fn(x), axis=-1)
        return tf.cast(y, tf.int64)
    policy, k = parse_target(spec.target, spec.name)
    if policy == "fixed":
        return tf.fill(tf.shape(x)[:1], tf.constant(k, tf.int64))
    logits = model_fn(x)
    if policy == "least_likely":
        return tf.argmin(logits, axis=-1)
    if y is None:
        y = tf.argmax(logits, axis=-1)
    c = tf.cast(tf.shape(logits)[-1], tf.int64)
    shape = tf.shape(x)[:1]
    if seed is None:
        off = tf.random.uniform(shape, 1, c, dtype=tf.int64)
    else:
        off = tf.random.stateless_uniform(shape, fold(seed, 1), 1, c, dtype=tf.int64)
    return (tf.cast(y, tf.int64) + off) % c


def start_seed(seed):
    """The seed of the PGD random start for an attack called with `seed` (shared with `batched`)."""
    return None if seed is None else fold(seed, 0)


# ---------------------------------------------------------------- attack functions
def make_attack(spec) -> callable:
    """`fn(model_fn, x, y, seed=None) -> x_adv` (float32 tensor in [0,1]) for a spec or a name."""
    spec = get_spec(spec)
    ch_compat.apply()
    if spec.method == "clean":
        def clean(model_fn, x, y=None, seed=None):
            return tf.convert_to_tensor(x, tf.float32)
        return clean
    if spec.method in GRADIENT_METHODS:
        return _gradient_attack(spec)
    if spec.method == "cw_l2":
        return _cw_l2(spec)
    if spec.method == "spsa":
        return _spsa(spec)
    return art_suite.make_art_attack(spec, attack_labels)


def _gradient_attack(spec: AttackSpec):
    from cleverhans.tf2.attacks.basic_iterative_method import basic_iterative_method
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method

    def fn(model_fn, x, y=None, seed=None):
        x = tf.convert_to_tensor(x, tf.float32)
        labels = attack_labels(spec, model_fn, x, y, seed)
        common = dict(clip_min=0.0, clip_max=1.0, y=labels, targeted=spec.targeted, sanity_checks=False)
        if spec.method == "fgm":
            adv = fast_gradient_method(model_fn, x, spec.eps, spec.norm, **common)
        elif spec.method == "bim":
            adv = basic_iterative_method(model_fn, x, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm, **common)
        elif spec.method == "mim":
            adv = momentum_iterative_method(model_fn, x, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm,
                                            decay_factor=spec.decay, **common)
        else:
            adv = _pgd_with_restarts(spec, model_fn, x, labels, seed, common)
        return tf.stop_gradient(adv)
    return fn


def margin_loss(labels, logits):
    """max_{j != label} z_j - z_label per example: CW's loss, which never saturates like softmax CE."""
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return tf.reduce_max(logits - 1e9 * onehot, -1) - tf.reduce_sum(logits * onehot, -1)


def _pgd_with_restarts(spec: AttackSpec, model_fn, x, labels, seed, common):
    """CleverHans PGD, `restarts` times from different random starts, stopping early per image: a restart
    after the first runs only on the images every earlier one left unbroken (margin loss <= 0: still
    correctly classified, or not yet at the target). An image once broken stays broken, so the accuracy
    is that of every restart on every image, at the cost of the unbroken ones only. Per image the point
    kept is the restart (among those run on it) whose final point has the largest margin loss (untargeted)
    / smallest (targeted)."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
    restarts, loss = int(spec.param("restarts")), spec.param("loss")
    extra = {"loss_fn": margin_loss} if loss == "margin" else {}
    sign = -1.0 if spec.targeted else 1.0

    def pgd(r, xs, ys):
        r_seed = None if seed is None else (seed if restarts == 1 else fold(seed, 1000 + r))
        ctx = (seeded_random_start(start_seed(r_seed))
               if spec.rand_init and r_seed is not None else contextlib.nullcontext())
        with ctx:
            return projected_gradient_descent(model_fn, xs, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm,
                                              rand_init=spec.rand_init, **extra, **{**common, "y": ys})

    best = pgd(0, x, labels)
    if restarts == 1:
        return best
    best_score = margin_loss(labels, model_fn(best)) * sign
    for r in range(1, restarts):
        left = tf.where(best_score <= 0)[:, 0]  # the images no restart has broken yet

        def restart(r=r, left=left, best=best, best_score=best_score):
            xs, ys = tf.gather(x, left), tf.gather(labels, left)
            adv = pgd(r, xs, ys)
            score = margin_loss(ys, model_fn(adv)) * sign
            take = score > tf.gather(best_score, left)
            adv = tf.where(tf.reshape(take, [-1] + [1] * (len(x.shape) - 1)), adv, tf.gather(best, left))
            return (tf.tensor_scatter_nd_update(best, left[:, None], adv),
                    tf.tensor_scatter_nd_update(best_score, left[:, None], tf.maximum(score, tf.gather(best_score, left))))

        best, best_score = tf.cond(tf.size(left) > 0, restart, lambda best=best, s=best_score: (best, s))
    return best


def _require_eager(spec):
    if not tf.executing_eagerly():
        raise RuntimeError(f"attack '{spec.name}' ({spec.method}) is eager-only (graph_safe=False); call it "
                           "outside tf.function / strategy.run")


def _cw_l2(spec: AttackSpec):
    from cleverhans.tf2.attacks.carlini_wagner_l2 import carlini_wagner_l2

    def fn(model_fn, x, y=None, seed=None):
        _require_eager(spec)
        x = np.asarray(x, np.float32)
        # CleverHans CW is targeted iff y is given; untargeted uses the model's own predictions.
        tgt = attack_labels(spec, model_fn, tf.constant(x), y, seed).numpy() if spec.targeted else None
        p = {k: spec.param(k) for k in METHOD_PARAMS["cw_l2"]}
        # CleverHans chunks x by its batch_size but passes the whole y to every chunk: chunk here instead.
        bs = int(p["batch_size"])
        adv = np.concatenate([
            carlini_wagner_l2(model_fn, x[i:i + bs], y=None if tgt is None else tgt[i:i + bs],
                              targeted=spec.targeted, clip_min=0.0, clip_max=1.0, **p)
            for i in range(0, len(x), bs)])
        return tf.constant(np.clip(adv, 0.0, 1.0), tf.float32)
    return fn


def _spsa(spec: AttackSpec):
    from cleverhans.tf2.attacks import spsa as spsa_mod

    def fn(model_fn, x, y=None, seed=None):
        _require_eager(spec)
        x = tf.convert_to_tensor(x, tf.float32)
        labels = attack_labels(spec, model_fn, x, y, seed)
        sign = 1.0 if spec.targeted else -1.0
        base = None if seed is None else int(np.dot(as_seed(seed).numpy(), [1, 1_000_003]) % (2 ** 31 - 1))

        def loss_fn(xx, label):  # CleverHans' SPSA objective: margin loss, signed for (un)targeted
            logits = model_fn(xx)
            return sign * spsa_mod.margin_logit_loss(logits, label, nb_classes=logits.shape[-1])

        # One optimizer whose seeded generator is re-seeded per image, and one traced per-image loop:
        # CleverHans' `tf.while_loop` run eagerly is far slower than the same loop inside `tf.function`.
        opt = ch_compat.SPSAAdamPlain(lr=spec.param("learning_rate"), delta=spec.param("delta"),
                                      num_samples=spec.param("spsa_samples"), num_iters=spec.param("spsa_iters"),
                                      seed=None if base is None else base)

        @tf.function(reduce_retracing=True)
        def one(x_i, label_i, start_seed):  # SPSA needs a static batch of 1
            return spsa_mod.projected_optimization(
                loss_fn, x_i, label_i, spec.eps, spec.nb_iter, opt, 0.0, 1.0,
                spec.param("early_stop_loss_threshold"),
                project_perturbation=_seeded_init_projection(None if base is None else start_seed, spec.eps))

        out = []
        for i in range(int(x.shape[0])):
            if base is not None:
                opt._rng.reset_from_seed(base + 2 * i)
            s_i = 0 if base is None else base + 2 * i + 1
            out.append(one(x[i:i + 1], labels[i:i + 1], tf.constant(s_i, tf.int64)))
        return tf.stop_gradient(tf.clip_by_value(tf.concat(out, 0), 0.0, 1.0))
    return fn


def _seeded_init_projection(seed, eps):
    """CleverHans' L-inf projection; with a seed its first call (the random start) redraws the start
    from that seed, so SPSA is reproducible without touching TF's global seed."""
    from cleverhans.tf2.attacks.spsa import _project_perturbation
    calls = [0]

    def project(perturbation, epsilon, input_image, clip_min=None, clip_max=None):
        if calls[0] == 0 and seed is not None:
            perturbation = tf.random.stateless_uniform(
                tf.shape(input_image), tf.stack([tf.cast(seed, tf.int64), tf.constant(7, tf.int64)]), -eps, eps)
        calls[0] += 1
        return _project_perturbation(perturbation, epsilon, input_image, clip_min=clip_min, clip_max=clip_max)
    return project
