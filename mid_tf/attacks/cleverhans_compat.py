"""Makes CleverHans 4.0.0 (`cleverhans.tf2`, from PyPI) work on Keras 3 / TF 2.21 / NumPy 2.

CleverHans' last release predates Keras 3 and NumPy 2. Rather than vendoring its source, `apply()`
monkeypatches module attributes and classes at run time (idempotent; nothing in site-packages is
edited). What breaks and what we do about it (details: shared/notes/stack-probe.md, section 2):

1. sanity_checks: `assert np.all([tensor, tensor, bool])` fails on NumPy >= 1.24 (ragged list) and in
   graph mode (symbolic tensor -> numpy). Our registry always passes `sanity_checks=False`; for other
   callers the attack modules' `np` becomes a proxy whose `all()` checks items one by one eagerly and
   emits `tf.debugging` asserts inside `tf.function`.
2. CW-L2 optimizer: Keras 3 `Optimizer.variables` is a list property, not a method, and CleverHans'
   reset loop `for v in optimizer.variables(): v.assign(0)` would also zero Keras 3's `learning_rate`
   variable -- a naive "make it callable" fix then silently returns the clean images. `CWAdam` exposes
   a callable list *without* the learning rate, and `_attack` gets a fresh optimizer per batch (a
   Keras 3 optimizer cannot be reused for the next batch's new `modifier` variable).
3. CW-L2 const shape: upstream builds `const = tf.ones(x.shape) * c` (full image shape), which
   broadcasts against the per-example [B] masks into [B,H,W,B]: the binary search over c is not per
   example and costs O(B^2). The only `tf.ones` calls in that module are the two bound/const
   initialisers, so the module's `tf` becomes a proxy whose `ones(shape)` builds `shape[:1]`.
4. SPSA: `SPSAAdam(tf.optimizers.Adam).__init__(lr=...)` is rejected by Keras 3. SPSAAdam only uses
   lr/beta_1/beta_2/epsilon, so it is replaced by a plain class reusing CleverHans' methods, with an
   optional seeded `tf.random.Generator` for the SPSA directions (deterministic runs).
5. Seeded random start: PGD draws its random start with unseeded `tf.random.uniform`. The module's
   `random_lp_vector` is wrapped: inside `with seeded_random_start(seed):` it draws the same
   distribution from stateless ops keyed by `seed` (a [2] int tensor), which works eagerly, inside
   `tf.function` and per replica in `strategy.run` (the seed is thread-local, replicas are threads).
"""

from __future__ import annotations

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf

_STATE = threading.local()
_APPLIED = False


# ---------------------------------------------------------------- seeds and the random start
def as_seed(seed) -> tf.Tensor | None:
    """None -> None; int / scalar -> [seed, 0]; [2] tensor -> as is. Returns an int64 [2] tensor."""
    if seed is None:
        return None
    s = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if s.shape.rank == 0:
        s = tf.stack([s, tf.constant(0, tf.int64)])
    return s


def fold(seed, *data) -> tf.Tensor:
    """Derives an independent stateless seed from `seed` and integers `data` (graph-safe)."""
    s = as_seed(seed)
    for d in data:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(d, tf.int64))
    return s


def seeded_lp_vector(shape, norm, eps, seed, dtype=tf.float32) -> tf.Tensor:
    """Uniform sample from the L-inf or L2 ball of radius eps (CleverHans' distribution), stateless."""
    seed = as_seed(seed)
    eps = tf.cast(eps, dtype)
    if norm == np.inf:
        return tf.random.stateless_uniform(shape, seed, -eps, eps, dtype=dtype)
    if norm != 2:
        raise ValueError(f"seeded random start supports norm inf or 2, got {norm}")
    shape = tf.convert_to_tensor(shape)
    dim = tf.reduce_prod(shape[1:])
    x = tf.random.stateless_normal(tf.stack([shape[0], dim]), fold(seed, 1), dtype=dtype)
    nrm = tf.sqrt(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True))
    w = tf.pow(tf.random.stateless_uniform(tf.stack([shape[0], 1]), fold(seed, 2), dtype=dtype),
               1.0 / tf.cast(dim, dtype))
    return eps * tf.reshape(w * x / nrm, shape)


@contextlib.contextmanager
def seeded_random_start(seed):
    """Within the block, CleverHans PGD's random start is drawn statelessly from `seed`."""
    prev = getattr(_STATE, "seed", None)
    _STATE.seed = as_seed(seed)
    try:
        yield
    finally:
        _STATE.seed = prev


def _wrap_random_lp_vector(orig):
    def random_lp_vector(shape, ord, eps, dtype=tf.float32, seed=None):  # noqa: A002 (CH's name)
        s = getattr(_STATE, "seed", None)
        if s is None:
            return orig(shape, ord, eps, dtype=dtype, seed=seed)
        return seeded_lp_vector(shape, ord, eps, s, dtype=dtype)
    random_lp_vector._mid_wrapped = True
    return random_lp_vector


# ---------------------------------------------------------------- sanity checks (NumPy 2)
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


# ---------------------------------------------------------------- CW-L2
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


# ---------------------------------------------------------------- SPSA
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


_ORIG: dict = {}


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

    cw_cls = carlini_wagner_l2.CarliniWagnerL2
    if not getattr(cw_cls, "_mid_keras3_patched", False):
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

    if spsa.SPSAAdam is not SPSAAdamPlain:
        orig = spsa.SPSAAdam
        _ORIG["spsa_get_delta"] = orig._get_delta
        for name in ("_compute_gradients", "_apply_gradients", "init_state", "minimize"):
            setattr(SPSAAdamPlain, name, getattr(orig, name))
        spsa.SPSAAdam = SPSAAdamPlain
    _APPLIED = True
