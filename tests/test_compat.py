"""Each run-time patch of a third-party package (mid_tf/compat/) works around a defect upstream still has.

One test per patch asserts that the UNPATCHED upstream code still shows the defect its docstring
names. When one of these tests fails, upstream has fixed it: check the fix, then drop the patch (and
the test). The CleverHans probes run in a fresh interpreter that imports nothing of mid_tf, because
`compat.cleverhans.apply()` patches module globals for the whole process; the Keras patches keep the
upstream functions as `__wrapped__`, so those are probed here with recording stand-in strategies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import tensorflow as tf

# Runs in a fresh interpreter: CleverHans 4.0.0 as installed, nothing patched. Prints one JSON object
# {probe: "ok" | "<ExceptionType>: <message>"}.
_CLEVERHANS_PROBES = r"""
import inspect, json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np, tensorflow as tf
from cleverhans.tf2.attacks import carlini_wagner_l2, projected_gradient_descent, spsa

model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
fn = lambda z: model(z)  # noqa: E731
x = tf.random.stateless_uniform((2, 4, 4, 3), [1, 2])
pgd = projected_gradient_descent.projected_gradient_descent


class _Callable(list):
    def __call__(self):
        return self


class _CallableAdam(keras.optimizers.Adam):  # only to get past the optimizer defect (probe cw_const)
    @property
    def variables(self):
        return _Callable(v for v in super().variables if "learning_rate" not in v.name)


def probe(call):
    try:
        call()
        return "ok"
    except Exception as e:  # noqa: BLE001 (the probe reports whatever upstream raises)
        return f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"


def cw_const():
    attack = carlini_wagner_l2.CarliniWagnerL2(fn, batch_size=2, max_iterations=1, binary_search_steps=1)
    attack.optimizer = _CallableAdam(0.01)
    attack.attack(x.numpy())


out = {
    "sanity_eager": probe(lambda: pgd(fn, x, 0.1, 0.05, 2, np.inf, clip_min=0.0, clip_max=1.0, sanity_checks=True)),
    "sanity_graph": probe(lambda: tf.function(lambda z: pgd(fn, z, 0.1, 0.05, 2, np.inf, clip_min=0.0, clip_max=1.0,
                                                            sanity_checks=True))(x)),
    "cw_optimizer": probe(lambda: carlini_wagner_l2.CarliniWagnerL2(
        fn, batch_size=2, max_iterations=1, binary_search_steps=1).attack(x.numpy())),
    "cw_const": probe(cw_const),
    "spsa_lr": probe(lambda: spsa.SPSAAdam(lr=0.01)),
    "pgd_params": list(inspect.signature(pgd).parameters),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def upstream_cleverhans():
    proc = subprocess.run([sys.executable, "-c", _CLEVERHANS_PROBES], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ compat/cleverhans.py
def test_cleverhans_1131_sanity_checks_still_break(upstream_cleverhans):
    """Patch 1: `np.all` over a list mixing tensors and bools (eager) or symbolic tensors (graph)."""
    assert "inhomogeneous" in upstream_cleverhans["sanity_eager"], upstream_cleverhans["sanity_eager"]
    assert "symbolic" in upstream_cleverhans["sanity_graph"], upstream_cleverhans["sanity_graph"]


def test_cleverhans_cw_optimizer_variables_still_not_callable(upstream_cleverhans):
    """Patch 2: CW-L2 calls `optimizer.variables()`, a list on Keras 3."""
    assert upstream_cleverhans["cw_optimizer"].startswith("TypeError: 'list' object is not callable"), \
        upstream_cleverhans["cw_optimizer"]


def test_cleverhans_1205_cw_const_still_has_the_image_shape(upstream_cleverhans):
    """Patch 3: `const` of the image's shape times the per-example loss fails for 3-channel images."""
    assert "Dimensions must be equal" in upstream_cleverhans["cw_const"], upstream_cleverhans["cw_const"]


def test_cleverhans_spsa_adam_still_passes_lr_to_keras(upstream_cleverhans):
    """Patch 4: SPSAAdam's `lr=` is rejected by Keras 3's Adam."""
    assert "not recognized" in upstream_cleverhans["spsa_lr"] and "lr" in upstream_cleverhans["spsa_lr"], \
        upstream_cleverhans["spsa_lr"]


def test_cleverhans_pgd_still_takes_no_seed(upstream_cleverhans):
    """Patch 5: PGD's random start cannot be seeded through its signature."""
    params = upstream_cleverhans["pgd_params"]
    assert "rand_init" in params and not [p for p in params if "seed" in p], params


# ------------------------------------------------------------------ compat/keras_distribute.py
class _Recorded(Exception):
    """Stops upstream right after its `strategy.reduce` call: the call is all a probe needs."""


class _RecordingStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """Passes Keras' `isinstance(..., MultiWorkerMirroredStrategy)` checks and claims multi-worker mode,
    without a cluster: it records what Keras asks `reduce` to do (no collective runs)."""

    def __init__(self):  # no super().__init__: no cluster, no collective ops
        self.calls = []

    @property
    def extended(self):
        return types.SimpleNamespace(_in_multi_worker_mode=lambda: True)

    def reduce(self, op, value, axis=None):
        self.calls.append((op, axis, value))
        raise _Recorded

    def experimental_local_results(self, value):
        return value.values


def _upstream(fn):
    return getattr(fn, "__wrapped__", fn)


def test_keras_reduce_per_replica_still_reduces_scalars_along_axis_0():
    """Patch 1 (tensorflow/tensorflow#72388): a scalar metric reduced with axis=0 ("Invalid reduction
    dimension 0 for input with 0 dimensions" on a real multi-worker strategy)."""
    from keras.src.backend.tensorflow import trainer
    strategy = _RecordingStrategy()
    with pytest.raises(_Recorded):
        _upstream(trainer.reduce_per_replica)({"loss": tf.constant(1.0)}, strategy, "auto")
    (op, axis, value), = strategy.calls
    assert op.upper() == "MEAN" and axis == 0 and value.shape.rank == 0


def test_keras_symbolic_build_still_reduces_the_whole_nested_batch():
    """Patch 2: the first step's build hands the whole (x, y) batch of per-replica values to
    `strategy.reduce`, which CollectiveAllReduceStrategy cannot take."""
    from keras.src.backend.tensorflow import trainer
    from tensorflow.python.distribute import values as tf_values
    strategy = _RecordingStrategy()
    per_replica = (tf_values.PerReplica((tf.zeros([2, 3]),)), tf_values.PerReplica((tf.zeros([2]),)))
    model = types.SimpleNamespace(_distribute_strategy=strategy, distribute_strategy=strategy)
    with pytest.raises(_Recorded):
        _upstream(trainer.TensorFlowTrainer._maybe_symbolic_build)(model, iterator=[(0, 0, iter([per_replica]))])
    (op, _, value), = strategy.calls
    assert op.upper() == "MEAN" and isinstance(value, tuple) and len(value) == 2


def _bn_hvp_error(layer_cls) -> float:
    """Relative error of a Hessian-vector product through a training-mode BatchNormalization layer of
    `layer_cls`, against a central difference of the gradient (float64)."""
    import keras
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(3, dtype="float64")
    bn = layer_cls(dtype="float64")
    x = tf.random.stateless_normal((16, 4), [0, 1], dtype=tf.float64)
    dense.build((None, 4))
    bn.build((None, 3))
    w0 = dense.kernel.value

    def f(w):
        return tf.reduce_sum(tf.sin(2.0 * bn(tf.matmul(x, w), training=True)))

    def grad(w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            value = f(w)
        return tape.gradient(value, w)
    v = tf.random.stateless_normal(w0.shape, [2, 3], dtype=tf.float64)
    with tf.GradientTape() as outer:
        outer.watch(w0)
        gv = tf.reduce_sum(grad(w0) * v)
    hvp = outer.gradient(gv, w0)
    eps = 1e-5
    fd = (grad(w0 + eps * v) - grad(w0 - eps * v)) / (2 * eps)
    return float(tf.norm(hvp - fd) / tf.norm(fd))


def test_keras_batchnorm_second_derivative_is_still_wrong_and_ours_is_exact():
    """compat/batchnorm.py: Keras' layer (tf.nn.moments' stop_gradient) gets the Hessian wrong; ours does not."""
    import keras

    from mid_tf.compat.batchnorm import exact_batch_normalization
    assert _bn_hvp_error(keras.layers.BatchNormalization) > 1e-3
    assert _bn_hvp_error(exact_batch_normalization) < 1e-7
