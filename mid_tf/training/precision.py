"""Mixed precision for training (MID stage, and stage 1 with --stage1_precision): bfloat16 compute,
float32 weights, float32 losses.

Keras applies a dtype policy when a layer is *built*, and every network here is built once, in
float32, for all stages. `mixed_twin` therefore builds a second set of the same networks under the
policy and copies the weights in (mixed-precision variables stay float32, so the copy is exact). The
MID stage trains the twin; `copy_back` puts the trained networks into the float32 networks,
which are the ones saved, exported and evaluated: evaluation attacks always run in float32.

Why: on CPUs with AVX512_BF16/AMX the MID step runs ~1.65x faster in bfloat16 (0.45 s vs 0.75 s per
first-order step at batch 256, benchmarks/train_step.py). Losses are computed in float32
(training/losses.py), and the pool's attacks crafted by a bfloat16 target succeed within 1 point of
float32 ones (benchmarks/train_step.py prints both). On CPUs without native bfloat16 it still runs,
slower than float32.
"""

from __future__ import annotations

import contextlib

import keras

from mid_tf.models import MIDModels, build_models

PRECISIONS = ("float32", "mixed_bfloat16")


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets Keras' global dtype policy for the layers built inside the block, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def mixed_twin(models: MIDModels, dataset: str, width: float, precision: str) -> MIDModels:
    """The same networks built under `precision`, with `models`' weights. float32: `models` itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"--mid_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return models
    with dtype_policy(precision):
        twin = build_models(dataset, width=width)
    for name in ("target", "teacher_encoder", "decoder", "classifier", "student_encoder"):
        getattr(twin, name).set_weights(getattr(models, name).get_weights())
    return twin


def copy_back(twin: MIDModels, models: MIDModels, names=("student_encoder",)) -> None:
    """The trained networks `names` of the twin into the float32 networks (no-op when the twin is `models`)."""
    if twin is not models:
        for name in names:
            getattr(models, name).set_weights(getattr(twin, name).get_weights())

