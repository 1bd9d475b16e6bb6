"""Makes CleverHans 4.0.0 (`cleverhans.tf2`, from PyPI) work on Keras 3 / TF 2.21 / NumPy 2.

CleverHans' last release predates Keras 3 and NumPy 2. Rather than vendoring its source, `apply()`
monkeypatches module attributes and classes at run time (idempotent; nothing in site-packages is
edited). Each patch, the upstream issue it works around, and what breaks without it
(tests/test_compat.py checks, per patch, that unpatched CleverHans still breaks that way: when one of
those tests fails, upstream has fixed it and the patch can go):

1. Sanity checks: upstream cleverhans-lab/cleverhans#1131. `assert np.all(asserts)` over a list
   mixing tensors and Python bools fails on NumPy 2 (an inhomogeneous array) and, in graph mode,
   converts a symbolic tensor to NumPy. Our registry always passes `sanity_checks=False`; for other
   callers the attack modules' `np` becomes a proxy whose `all()` checks items one by one eagerly and
   emits `tf.debugging` asserts inside `tf.function`.
2. CW-L2 optimizer: no upstream issue found; symptom: `TypeError: 'list' object is not callable` at
   `self.optimizer.variables()` (Keras 3 `Optimizer.variables` is a list property, not a method).
   CleverHans' reset loop would also zero Keras 3's `learning_rate` variable, so a naive "make it
   callable" fix silently returns the clean images. `CWAdam` exposes a callable list *without* the
   learning rate, and `_attack` gets a fresh optimizer per batch (a Keras 3 optimizer cannot be
   reused for the next batch's new `modifier` variable).
3. CW-L2 const shape: upstream cleverhans-lab/cleverhans#1205. `const = tf.ones(shape) * c` has the
   full image shape and broadcasts against the per-example [B] losses: multi-channel images fail
   ("Dimensions must be equal"), 1-channel ones silently get a [B,H,W,B] binary search that is not
   per example and costs O(B^2). The only `tf.ones` calls in that module are the two bound/const
   initialisers, so the module's `tf` becomes a proxy whose `ones(shape)` builds `shape[:1]`.
4. SPSA optimizer: no upstream issue found (cleverhans-lab/cleverhans#1022, "make sure SPSA works in
   TF2", predates Keras 3); symptom: `ValueError: Argument(s) not recognized: {'lr': ...}` from
   `SPSAAdam.__init__`, which passes `lr=` to Keras 3's Adam. SPSAAdam only uses
   lr/beta_1/beta_2/epsilon, so it is replaced by a plain class reusing CleverHans' methods, with an
   optional seeded `tf.random.Generator` for the SPSA directions (deterministic runs).
5. PGD random start: no upstream issue found; symptom: the random start cannot be seeded
   (`projected_gradient_descent` takes no seed and calls `random_lp_vector` without one, so it
   draws from TF's global generator). The module's `random_lp_vector` is wrapped: inside
   `with random_start(draw):` the start is `draw(shape, norm, eps, dtype)` instead
   (attacks/seeds.py passes a stateless draw), which works eagerly, inside `tf.function` and per
   replica in `strategy.run` (the override is thread-local, replicas are threads).
"""

from __future__ import annotations

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf

_STATE = threading.local()
_APPLIED = False
_ORIG: dict = {}


# ---------------------------------------------------------------- 5. PGD random start
@contextlib.contextmanager
def random_start(draw):
    """Within the block (this thread), CleverHans PGD's random start is `draw(shape, norm, eps, dtype)`."""
    prev = getattr(_STATE, "draw", None)
    _STATE.draw = draw
    try:
        yield
    finally:
        _STATE.draw = prev


def _wrap_random_lp_vector(orig):
    def random_lp_vector(shape, ord, eps, dtype=tf.float32, seed=None):  # noqa: A002 (CH's name)
        draw = getattr(_STATE, "draw", None)
        if draw is None:
            return orig(shape, ord, eps, dtype=dtype, seed=seed)
        return draw(shape, ord, eps, dtype)
    random_lp_vector._mid_wrapped = True
    return random_lp_vector


# ---------------------------------------------------------------- 1. sanity checks (NumPy 2)
class _NPProxy:
    """`numpy` with an `all()` that accepts lists mixing tensors and bools, eager or symbolic."""

    def __getattr__(self, k):
        return getattr(np, k)

    @staticmethod
    def all(a, *args, **kw):
        if isinstance(a, (list, tuple)):
            items = list(a)
            if any(tf.is_tensor(t) and not hasattr(t, "numpy") for t in items):
                for t in items:
                    if tf.is_tensor(t):
                        tf.debugging.assert_equal(tf.reduce_all(t), True, message="cleverhans sanity check")
                return True
            return all(bool(np.all(t)) for t in items)
        return np.all(a, *args, **kw)


# ---------------------------------------------------------------- 2. and 3. CW-L2
class _CallableList(list):
    def __call__(self):
        return self


class CWAdam(keras.optimizers.Adam):
    """Keras 3 Adam whose `variables` is callable (CleverHans calls `variables()`) and omits the
    learning rate, so CleverHans' per-binary-search-step reset does not zero it."""

    @property
    def variables(self):
        return _CallableList(v for v in super().variables if "learning_rate" not in v.name)


class _CWTensorFlowProxy:
    """`tensorflow` for the carlini_wagner_l2 module: `ones(shape)` -> per-example `ones(shape[:1])`."""

    def __getattr__(self, k):
        return getattr(tf, k)

    @staticmethod
    def ones(shape, dtype=tf.float32, name=None):
        return tf.ones(tf.TensorShape(shape)[:1], dtype=dtype, name=name)


def _patch_cw(carlini_wagner_l2) -> None:
    cw_cls = carlini_wagner_l2.CarliniWagnerL2
    if getattr(cw_cls, "_mid_keras3_patched", False):
        return
    orig_init, orig_attack = cw_cls.__init__, cw_cls._attack

    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.optimizer = CWAdam(self.learning_rate)

    def _attack(self, x):
        self.optimizer = CWAdam(self.learning_rate)  # fresh per batch (new `modifier` variable)
        return orig_attack(self, x)

    cw_cls.__init__, cw_cls._attack = __init__, _attack
    cw_cls._mid_keras3_patched = True
    carlini_wagner_l2.tf = _CWTensorFlowProxy()


# ---------------------------------------------------------------- 4. SPSA
class SPSAAdamPlain:
    """Drop-in for CleverHans' SPSAAdam without the Keras optimizer base class (Keras 3 rejects
    `lr=`). Methods `_compute_gradients/_apply_gradients/init_state/minimize` are CleverHans' own;
    with `seed` the SPSA directions come from a seeded `tf.random.Generator` (reproducible)."""

    def __init__(self, lr=0.01, delta=0.01, num_samples=128, num_iters=1, compare_to_analytic_grad=False,
                 seed=None):
        if num_samples % 2:
            raise ValueError("SPSA: number of samples must be even")
        self.lr, self.beta_1, self.beta_2, self.epsilon = lr, 0.9, 0.999, 1e-7
        self._delta = delta
        self._num_samples = num_samples // 2
        self._num_iters = num_iters
        self._compare_to_analytic_grad = compare_to_analytic_grad
        self._rng = None if seed is None else tf.random.Generator.from_seed(int(seed))

    def _get_delta(self, x, delta):
        if self._rng is None:
            return _ORIG["spsa_get_delta"](self, x, delta)
        shape = [self._num_samples] + x.get_shape().as_list()[1:]
        return delta * tf.sign(self._rng.uniform(shape, minval=-1.0, maxval=1.0, dtype=tf.float32))


def _patch_spsa(spsa) -> None:
    if spsa.SPSAAdam is SPSAAdamPlain:
        return
    orig = spsa.SPSAAdam
    _ORIG["spsa_get_delta"] = orig._get_delta
    for name in ("_compute_gradients", "_apply_gradients", "init_state", "minimize"):
        setattr(SPSAAdamPlain, name, getattr(orig, name))
    spsa.SPSAAdam = SPSAAdamPlain


def apply() -> None:
    """Installs all patches once (safe to call many times; every attack entry point calls it)."""
    global _APPLIED
    if _APPLIED:
        return
    from cleverhans.tf2.attacks import (basic_iterative_method, carlini_wagner_l2, fast_gradient_method,
                                        madry_et_al, momentum_iterative_method, projected_gradient_descent,
                                        spsa)

    for m in (projected_gradient_descent, momentum_iterative_method, fast_gradient_method,
              basic_iterative_method, madry_et_al):
        if hasattr(m, "np"):
            m.np = _NPProxy()
    if not getattr(projected_gradient_descent.random_lp_vector, "_mid_wrapped", False):
        projected_gradient_descent.random_lp_vector = _wrap_random_lp_vector(
            projected_gradient_descent.random_lp_vector)
    _patch_cw(carlini_wagner_l2)
    _patch_spsa(spsa)
    _APPLIED = True
