"""Evaluation attacks CleverHans lacks, from IBM ART 1.20.1, behind the registry interface.

AutoAttack (APGD-CE + APGD-DLR + Square), APGD-CE, APGD-DLR, Square, DeepFool, spatial
transformation and JSMA (saliency map). All eager-only (`graph_safe=False`): ART works on numpy
arrays. `art` is imported lazily (slow import, noisy warnings) only when such an attack is built.

Keras 3 breakage in ART and the workaround (our subclass, no ART source copied):
  `TensorFlowV2Classifier.compute_loss(reduction=...)` sets `tf.keras.losses.Reduction.NONE`, which
  Keras 3 no longer has (AttributeError), and `AutoProjectedGradientDescent(loss_type=...)` builds
  its own Keras loss with the same enum. APGD calls `compute_loss(reduction="none")` every step.
  `_Keras3Classifier` computes the per-example loss itself (CE or DLR, chosen per attack) and APGD is
  always created with `loss_type=None`, so it uses our classifier's loss.
  `art.attacks.evasion.AutoAttack.generate` does `import multiprocess` unconditionally, a package ART
  does not declare (not installed here) -> ModuleNotFoundError. `autoattack` is therefore composed here
  with AutoAttack's own rule: run APGD-CE, APGD-DLR and Square in turn (all ART), each only on the
  examples still classified correctly, and keep the first successful adversarial per example.
  Targeted APGD with our DLR loss is not offered: ART's targeted APGD assumes a CE-like loss.
Randomness (APGD/Square random starts) is drawn from NumPy's global RNG; runs with a seed save the
global state, seed it, and restore it afterwards, so a seeded run is reproducible and side-effect free.
`BROKEN` lists attacks excluded on this stack with the reason (empty when all work).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# method -> {param: default}. Official MNIST AutoAttack is 'standard' eps 0.3; iterations are kept
# overridable because ART on CPU is slow (see docs/attacks.md).
ART_PARAMS = {
    "autoattack": {"max_iter": 100, "nb_random_init": 1, "square_max_iter": 1000, "batch_size": 128},
    "apgd_ce": {"max_iter": 100, "nb_random_init": 1, "batch_size": 128},
    "apgd_dlr": {"max_iter": 100, "nb_random_init": 1, "batch_size": 128},
    "square": {"max_iter": 1000, "p_init": 0.8, "nb_restarts": 1, "batch_size": 128},
    "deepfool": {"max_iter": 100, "overshoot": 0.02, "nb_grads": 10, "batch_size": 128},
    "spatial": {"max_translation": 10.0, "num_translations": 5, "max_rotation": 30.0, "num_rotations": 5},
    "jsma": {"theta": 1.0, "gamma": 1.0, "batch_size": 128},
}
BROKEN: dict[str, str] = {}


def default_specs(S):
    """Registry entries (S is AttackSpec, passed in to avoid an import cycle)."""
    return [
        S("autoattack", "autoattack", eps=0.3, eps_iter=0.1),
        S("apgd_ce", "apgd_ce", eps=0.3, eps_iter=0.1),
        S("apgd_dlr", "apgd_dlr", eps=0.3, eps_iter=0.1),
        S("square", "square", eps=0.3),
        S("deepfool", "deepfool", eps=None, norm=2),
        S("spatial", "spatial", eps=None),
        S("jsma_t0", "jsma", eps=None, target="fixed:0"),
    ]


def _ce(logits, y_onehot):
    return tf.nn.softmax_cross_entropy_with_logits(y_onehot, logits)


def _dlr(logits, y_onehot):
    """Difference-of-logits-ratio loss (Croce & Hein 2020), untargeted form, per example."""
    srt = tf.sort(logits, axis=-1, direction="DESCENDING")
    z_y = tf.reduce_sum(logits * y_onehot, -1)
    z_other = tf.reduce_max(logits - 1e9 * y_onehot, -1)
    return -(z_y - z_other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def _classifier(model_fn, input_shape, nb_classes, per_example_loss=_ce):
    from art.estimators.classification import TensorFlowV2Classifier

    class _Keras3Classifier(TensorFlowV2Classifier):
        """ART's TF2 classifier with a Keras-3-safe per-example loss (see module docstring)."""

        def _loss_tensor(self, x, y):
            y = np.asarray(y)
            if y.ndim == 1:
                y = np.eye(self.nb_classes, dtype=np.float32)[y]
            return per_example_loss(model_fn(tf.constant(x, tf.float32)), tf.constant(y, tf.float32))

        def compute_loss(self, x, y, reduction="none", **kwargs):
            loss = self._loss_tensor(x, y).numpy()
            return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]

        def loss_gradient(self, x, y, training_mode=False, **kwargs):
            xt = tf.constant(x, tf.float32)
            y = np.asarray(y)
            y = np.eye(self.nb_classes, dtype=np.float32)[y] if y.ndim == 1 else y.astype(np.float32)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(xt)
                loss = tf.reduce_sum(per_example_loss(model_fn(xt), tf.constant(y)))
            return tape.gradient(loss, xt).numpy()

    def art_model(z, training=False):  # ART calls model(x, training=...); model_fn takes images only
        return model_fn(z)

    return _Keras3Classifier(model=art_model, nb_classes=nb_classes, input_shape=tuple(input_shape),
                             loss_object=None, clip_values=(0.0, 1.0))


def _build(spec, clf, clf_dlr):
    from art.attacks.evasion import (AutoProjectedGradientDescent, DeepFool, SaliencyMapMethod,
                                     SpatialTransformation, SquareAttack)
    p = {k: spec.param(k) for k in ART_PARAMS[spec.method]}
    m = spec.method

    def apgd(c, targeted=False):
        return AutoProjectedGradientDescent(c, norm=np.inf, eps=spec.eps, eps_step=spec.eps_iter,
                                            max_iter=p["max_iter"], targeted=targeted,
                                            nb_random_init=p["nb_random_init"], batch_size=p["batch_size"],
                                            loss_type=None, verbose=False)
    if m == "apgd_ce":
        return apgd(clf, spec.targeted)
    if m == "apgd_dlr":
        return apgd(clf_dlr, spec.targeted)
    if m == "square":
        return SquareAttack(clf, norm=np.inf, eps=spec.eps, max_iter=p["max_iter"], p_init=p["p_init"],
                            nb_restarts=p["nb_restarts"], batch_size=p["batch_size"], verbose=False)
    if m == "autoattack":
        sq = SquareAttack(clf, norm=np.inf, eps=spec.eps, max_iter=p["square_max_iter"], batch_size=p["batch_size"],
                          verbose=False)
        return _Ensemble(clf, [apgd(clf), apgd(clf_dlr), sq])
    if m == "deepfool":
        return DeepFool(clf, max_iter=p["max_iter"], epsilon=p["overshoot"], nb_grads=p["nb_grads"],
                        batch_size=p["batch_size"], verbose=False)
    if m == "spatial":
        return SpatialTransformation(clf, max_translation=p["max_translation"],
                                     num_translations=p["num_translations"], max_rotation=p["max_rotation"],
                                     num_rotations=p["num_rotations"], verbose=False)
    if m == "jsma":
        return SaliencyMapMethod(clf, theta=p["theta"], gamma=p["gamma"], batch_size=p["batch_size"], verbose=False)
    raise ValueError(f"attack '{spec.name}': no ART attack for method '{m}'")


class _Ensemble:
    """AutoAttack's worst-case rule over attacks: each runs on the still-robust examples only."""

    def __init__(self, clf, attacks):
        self.clf, self.attacks = clf, attacks

    def generate(self, x, y):
        adv = x.copy()
        robust = np.argmax(self.clf.predict(x), 1) == np.argmax(y, 1)
        for attack in self.attacks:
            if not robust.any():
                break
            idx = np.flatnonzero(robust)
            cand = attack.generate(x=x[idx], y=y[idx])
            fooled = np.argmax(self.clf.predict(cand), 1) != np.argmax(y[idx], 1)
            adv[idx[fooled]] = cand[fooled]
            robust[idx[fooled]] = False
        return adv


def make_art_attack(spec, attack_labels):
    """`fn(model_fn, x, y, seed=None) -> x_adv` for an ART-backed spec (eager only)."""
    if spec.method in BROKEN:
        raise ValueError(f"attack '{spec.name}' excluded: {BROKEN[spec.method]}")

    def fn(model_fn, x, y=None, seed=None):
        if not tf.executing_eagerly():
            raise RuntimeError(f"attack '{spec.name}' (ART {spec.method}) is eager-only (graph_safe=False)")
        x = np.asarray(x, np.float32)
        nb_classes = int(model_fn(tf.constant(x[:1])).shape[-1])
        clf = _classifier(model_fn, x.shape[1:], nb_classes, _ce)
        clf_dlr = _classifier(model_fn, x.shape[1:], nb_classes, _dlr)
        labels = attack_labels(spec, model_fn, tf.constant(x), y, seed).numpy()
        state = np.random.get_state()
        if seed is not None:
            s = np.asarray(seed if np.ndim(seed) else [seed, 0], np.int64).ravel()
            np.random.seed(int((s[0] * 1_000_003 + s[-1]) % (2 ** 32 - 1)))
        try:
            adv = _build(spec, clf, clf_dlr).generate(x=x, y=np.eye(nb_classes, dtype=np.float32)[labels])
        finally:
            np.random.set_state(state)
        return tf.constant(np.clip(adv, 0.0, 1.0).astype(np.float32))
    return fn
