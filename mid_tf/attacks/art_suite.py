"""Evaluation attacks CleverHans lacks, from IBM ART 1.20.1, behind the registry interface.

Standard AutoAttack, its cheaper variant, APGD-CE, APGD-DLR, Square, DeepFool, spatial transformation
and JSMA (saliency map). All eager-only (`graph_safe=False`): ART works on numpy arrays. `art` is
imported lazily (slow import, noisy warnings) only when such an attack is built.

`autoattack` is standard AutoAttack (Croce & Hein 2020, version "standard", L-inf): APGD-CE, then
APGD-T (targeted DLR loss, once per target: the 9 non-true classes ranked by clean logit), then
Square with 5,000 queries; APGD runs 100 iterations from one random start with the paper's initial
step 2*eps. FAB-T, the fourth standard component, is not in ART and is left out: one component fewer
can only leave more examples robust, so the accuracy reported bounds standard AutoAttack's from above.
`autoattack_fast` is the cheaper chain kept for comparison with older runs, NOT standard AutoAttack:
APGD-CE, untargeted APGD-DLR, Square with 1,000 queries. Both apply AutoAttack's worst-case rule
(`WorstCase`): each component runs only on the examples every earlier one failed on, and an example
counts as robust only if every component fails on it.

Keras 3 breakage in ART and the workaround (our subclass, no ART source copied):
  `TensorFlowV2Classifier.compute_loss(reduction=...)` sets `tf.keras.losses.Reduction.NONE`, which
  Keras 3 no longer has (AttributeError), and `AutoProjectedGradientDescent(loss_type=...)` builds
  its own Keras loss with the same enum. APGD calls `compute_loss(reduction="none")` every step.
  `_Keras3Classifier` computes the per-example loss itself (CE, DLR or targeted DLR, chosen per
  attack) and APGD is always created with `loss_type=None`, so it uses our classifier's loss.
Why not `art.attacks.evasion.AutoAttack`: its `generate` imports `multiprocess` (undeclared by ART),
its targeted pass runs *every* listed attack targeted at every class in label order, and it hands an
attack only the target labels, so the targeted DLR loss, which needs the true class too, cannot be
computed. Nor ART's `targeted=True` APGD: it keeps a result only when it lands on the target class,
while Croce & Hein's APGD-T counts any misclassification (the targeted DLR loss often flips an image
to a third class first). So APGD-T here is ART's APGD in its untargeted mode (ascend the loss; success
= not the true class) on the targeted loss, exactly as Croce & Hein's code runs it, with signed labels:
+1 at the true class y (ART's argmax, its success check) and -1 at the target t. `_dlr_targeted`
reads both and is maximised: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), z_pi the sorted logits.
Randomness (APGD/Square random starts) is drawn from NumPy's global RNG; runs with a seed save the
global state, seed it, and restore it afterwards, so a seeded run is reproducible and side-effect free.
The classifier answers every row it has already seen from a `RowCache` (row_cache.py: ART's Square asks
three times per query for mostly unchanged images, APGD for the gradient where it just took the loss) and
runs the model compiled, in batches of `PREDICT_BATCH` whatever ART asks (its spatial attack asks one
image at a time). `BROKEN` lists attacks excluded on this stack with the reason (empty when all work).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from mid_tf.attacks.row_cache import RowCache

PREDICT_BATCH = 256  # rows per forward pass in the classifier's `predict`

# method -> {param: default}. Iterations are kept overridable because ART on CPU is slow (see
# docs/attacks.md). `autoattack`: Croce & Hein's standard parameters, n_target_classes targets for APGD-T.
ART_PARAMS = {
    "autoattack": {"max_iter": 100, "nb_random_init": 1, "n_target_classes": 9, "square_max_iter": 5000,
                   "p_init": 0.8, "batch_size": 128},
    "autoattack_fast": {"max_iter": 100, "nb_random_init": 1, "square_max_iter": 1000, "batch_size": 128},
    "apgd_ce": {"max_iter": 100, "nb_random_init": 1, "batch_size": 128},
    "apgd_dlr": {"max_iter": 100, "nb_random_init": 1, "batch_size": 128},
    "square": {"max_iter": 1000, "p_init": 0.8, "nb_restarts": 1, "batch_size": 128},
    "deepfool": {"max_iter": 100, "overshoot": 0.02, "nb_grads": 10, "batch_size": 128},
    "spatial": {"max_translation": 10.0, "num_translations": 5, "max_rotation": 30.0, "num_rotations": 5},
    "jsma": {"theta": 1.0, "gamma": 1.0, "batch_size": 128},
}
BROKEN: dict[str, str] = {}
_AUTOATTACKS = ("autoattack", "autoattack_fast")


def default_specs(S):
    """Registry entries (S is AttackSpec, passed in to avoid an import cycle). `autoattack` leaves
    eps_iter unset: its APGD starts at step 2*eps (Croce & Hein), whatever eps is overridden to."""
    return [
        S("autoattack", "autoattack", eps=0.3, eps_iter=None),
        S("autoattack_fast", "autoattack_fast", eps=0.3, eps_iter=0.1),
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


def _dlr_targeted(logits, y_signed):
    """Croce & Hein's targeted DLR loss, per example, to maximise: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    `y_signed` is +1 at the true class y and -1 at the target t (see module docstring)."""
    srt = tf.sort(logits, axis=-1, direction="DESCENDING")
    z_y = tf.reduce_sum(logits * tf.nn.relu(y_signed), -1)
    z_t = tf.reduce_sum(logits * tf.nn.relu(-y_signed), -1)
    return -(z_y - z_t) / (srt[:, 0] - (srt[:, 2] + srt[:, 3]) / 2 + 1e-12)


def signed_labels(targets, labels, nb_classes: int) -> np.ndarray:
    """[n, C] float32: +1 at each true label, -1 at each target (APGD-T's label array)."""
    eye = np.eye(nb_classes, dtype=np.float32)
    return eye[np.asarray(labels)] - eye[np.asarray(targets)]


def ranked_targets(logits, labels) -> np.ndarray:
    """[n, C-1] int: the non-true classes of each example by logit, highest first (APGD-T's targets)."""
    logits = np.asarray(logits, np.float64)
    masked = np.where(np.eye(logits.shape[1], dtype=bool)[np.asarray(labels)], -np.inf, logits)
    return np.argsort(-masked, axis=1, kind="stable")[:, :-1]


def _classifier(model_fn, input_shape, nb_classes, per_example_loss=_ce):
    from art.estimators.classification import TensorFlowV2Classifier

    class _Keras3Classifier(TensorFlowV2Classifier):
        """ART's TF2 classifier with a Keras-3-safe per-example loss (see module docstring), answering
        rows it has seen from a `RowCache` (logits; loss with gradient, computed together)."""

        loss_fn = staticmethod(per_example_loss)  # which loss this classifier gives APGD (tests read it)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # gradients are image-sized: keep about 64 MiB of them, never fewer than two ART batches
            grads = max(2 * PREDICT_BATCH, 2 ** 26 // (4 * int(np.prod(input_shape))))
            self.logits_cache, self.loss_cache = RowCache(50_000), RowCache(grads)

        def _labels(self, y):
            y = np.asarray(y)
            return np.eye(self.nb_classes, dtype=np.float32)[y] if y.ndim == 1 else y.astype(np.float32)

        def predict(self, x, batch_size=128, training_mode=False, **kwargs):
            def compute(xs):  # our compiled function (ART's own retraces for every new batch shape), in
                # chunks of PREDICT_BATCH whatever ART asks: its spatial attack predicts one image at a time
                return (np.concatenate([_logits(tf.constant(xs[i:i + PREDICT_BATCH])).numpy()
                                        for i in range(0, len(xs), PREDICT_BATCH)]),)
            return self.logits_cache(compute, np.asarray(x, np.float32))[0]

        def _loss_and_gradient(self, x, y):
            def compute(xs, ys):
                return [t.numpy() for t in _loss_grad(tf.constant(xs), tf.constant(ys))]
            return self.loss_cache(compute, np.asarray(x, np.float32), self._labels(y))

        def compute_loss(self, x, y, reduction="none", **kwargs):
            loss = self._loss_and_gradient(x, y)[0]
            return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]

        def loss_gradient(self, x, y, training_mode=False, **kwargs):
            return self._loss_and_gradient(x, y)[1]

    _logits = tf.function(model_fn, reduce_retracing=True)

    # Compiled once per classifier (APGD calls it every step; eagerly it ran 2.5x slower, docs/attacks.md).
    # The loss comes with its gradient: APGD asks for the gradient at the point whose loss it just took.
    @tf.function(reduce_retracing=True)
    def _loss_grad(xt, yt):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(xt)
            loss = per_example_loss(model_fn(xt), yt)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, xt)

    def art_model(z, training=False):  # ART calls model(x, training=...); model_fn takes images only
        return model_fn(z)

    return _Keras3Classifier(model=art_model, nb_classes=nb_classes, input_shape=tuple(input_shape),
                             loss_object=None, clip_values=(0.0, 1.0))


@dataclasses.dataclass
class Component:
    """One step of an AutoAttack chain: an ART attack, and for APGD-T the rank of its target class
    among the non-true classes by clean logit (0 = the highest); None = untargeted, true labels."""
    name: str
    attack: object
    target_rank: int | None = None


class WorstCase:
    """AutoAttack's worst-case rule over `components`: each runs, from the clean images, only on the
    examples still robust (correct after every earlier component); the first in-ball misclassified
    point it finds is kept. After `generate`, `broken_by[i]` is the index of the component that broke
    example i, -1 if none did, -2 if it was misclassified clean (AutoAttack's bookkeeping)."""

    def __init__(self, clf, components, eps: float, norm=np.inf):
        self.clf, self.components, self.eps, self.norm = clf, list(components), eps, norm
        self.broken_by = np.zeros(0, np.int64)

    def _wrong(self, x, labels):
        return np.argmax(self.clf.predict(x), 1) != labels

    def _in_ball(self, cand, x):
        d = (cand - x).reshape(len(x), -1)
        return np.linalg.norm(d, ord=self.norm, axis=1) <= self.eps * (1 + 1e-4) + 1e-6

    def _run(self, c: Component, x, labels):
        nb = self.clf.nb_classes
        if c.target_rank is None:
            return c.attack.generate(x=x, y=np.eye(nb, dtype=np.float32)[labels])
        targets = ranked_targets(self.clf.predict(x), labels)[:, c.target_rank]
        return c.attack.generate(x=x, y=signed_labels(targets, labels, nb))

    def generate(self, x, y):
        labels = np.argmax(y, 1)
        adv = x.copy()
        self.broken_by = np.where(self._wrong(x, labels), -2, -1)
        for i, c in enumerate(self.components):
            idx = np.flatnonzero(self.broken_by == -1)
            if idx.size == 0:
                break
            cand = np.asarray(self._run(c, x[idx], labels[idx]), np.float32)
            fooled = self._wrong(cand, labels[idx]) & self._in_ball(cand, x[idx])
            adv[idx[fooled]] = cand[fooled]
            self.broken_by[idx[fooled]] = i
        return adv


def _apgd(spec, clf, p, targeted=False):
    from art.attacks.evasion import AutoProjectedGradientDescent
    step = spec.eps_iter if spec.eps_iter is not None else 2 * spec.eps
    return AutoProjectedGradientDescent(clf, norm=np.inf, eps=spec.eps, eps_step=step, max_iter=p["max_iter"],
                                        targeted=targeted, nb_random_init=p["nb_random_init"],
                                        batch_size=p["batch_size"], loss_type=None, verbose=False)


def _autoattack(spec, clf_for, p):
    """Standard AutoAttack minus FAB-T (see module docstring), or the cheaper `autoattack_fast`."""
    from art.attacks.evasion import SquareAttack
    if spec.targeted:
        raise ValueError(f"attack '{spec.name}': {spec.method} is untargeted only; remove target=")
    clf = clf_for(_ce)
    square = SquareAttack(clf, norm=np.inf, eps=spec.eps, max_iter=p["square_max_iter"],
                          p_init=p.get("p_init", 0.8), nb_restarts=1, batch_size=p["batch_size"], verbose=False)
    if spec.method == "autoattack_fast":
        parts = [Component("apgd_ce", _apgd(spec, clf, p)), Component("apgd_dlr", _apgd(spec, clf_for(_dlr), p)),
                 Component("square", square)]
        return WorstCase(clf, parts, spec.eps)
    n = int(p["n_target_classes"])
    if clf.nb_classes < 4 or not 1 <= n < clf.nb_classes:
        raise ValueError(f"attack '{spec.name}': APGD-T needs >= 4 classes and 1 <= n_target_classes < "
                         f"{clf.nb_classes} (got {n}); set n_target_classes or use autoattack_fast")
    apgd_t = _apgd(spec, clf_for(_dlr_targeted), p)  # untargeted mode on purpose: see module docstring
    parts = ([Component("apgd_ce", _apgd(spec, clf, p))] + [Component("apgd_t", apgd_t, r) for r in range(n)]
             + [Component("square", square)])
    return WorstCase(clf, parts, spec.eps)


def components(spec) -> str | None:
    """The components of an AutoAttack spec as the report shows them (None for any other attack)."""
    if spec.method not in _AUTOATTACKS:
        return None
    p = {k: spec.param(k) for k in ART_PARAMS[spec.method]}
    starts = int(p["nb_random_init"])
    apgd = f"{p['max_iter']} iterations, {starts} random start{'s' if starts != 1 else ''}"
    if spec.method == "autoattack_fast":
        return (f"NOT standard AutoAttack: APGD-CE ({apgd}), untargeted APGD-DLR ({apgd}), Square "
                f"({p['square_max_iter']} queries); worst case per example")
    return (f"APGD-CE ({apgd}), APGD-T (targeted DLR, {p['n_target_classes']} target classes, {apgd} each), "
            f"Square ({p['square_max_iter']} queries); worst case per example; FAB-T left out (not in ART)")


def build_art(spec, model_fn, input_shape, nb_classes: int):
    """The ART attack object for an ART-backed spec (`WorstCase` for the AutoAttacks): `.generate(x=, y=)`
    with one-hot labels."""
    from art.attacks.evasion import DeepFool, SaliencyMapMethod, SpatialTransformation, SquareAttack
    cache = {}

    def clf_for(loss):
        if loss not in cache:
            cache[loss] = _classifier(model_fn, input_shape, nb_classes, loss)
        return cache[loss]
    p = {k: spec.param(k) for k in ART_PARAMS[spec.method]}
    m, clf = spec.method, clf_for(_ce)
    if m in _AUTOATTACKS:
        return _autoattack(spec, clf_for, p)
    if m in ("apgd_ce", "apgd_dlr"):
        return _apgd(spec, clf if m == "apgd_ce" else clf_for(_dlr), p, spec.targeted)
    if m == "square":
        return SquareAttack(clf, norm=np.inf, eps=spec.eps, max_iter=p["max_iter"], p_init=p["p_init"],
                            nb_restarts=p["nb_restarts"], batch_size=p["batch_size"], verbose=False)
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


def make_art_attack(spec, attack_labels):
    """`fn(model_fn, x, y, seed=None) -> x_adv` for an ART-backed spec (eager only)."""
    if spec.method in BROKEN:
        raise ValueError(f"attack '{spec.name}' excluded: {BROKEN[spec.method]}")

    def fn(model_fn, x, y=None, seed=None):
        if not tf.executing_eagerly():
            raise RuntimeError(f"attack '{spec.name}' (ART {spec.method}) is eager-only (graph_safe=False)")
        x = np.asarray(x, np.float32)
        nb_classes = int(model_fn(tf.constant(x[:1])).shape[-1])
        attack = build_art(spec, model_fn, x.shape[1:], nb_classes)
        labels = attack_labels(spec, model_fn, tf.constant(x), y, seed).numpy()
        state = np.random.get_state()
        if seed is not None:
            s = np.asarray(seed if np.ndim(seed) else [seed, 0], np.int64).ravel()
            np.random.seed(int((s[0] * 1_000_003 + s[-1]) % (2 ** 32 - 1)))
        try:
            adv = attack.generate(x=x, y=np.eye(nb_classes, dtype=np.float32)[labels])
        finally:
            np.random.set_state(state)
        return tf.constant(np.clip(adv, 0.0, 1.0).astype(np.float32))
    return fn
