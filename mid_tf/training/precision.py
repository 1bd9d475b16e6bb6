"""Mixed precision for training (MID stage, and stage 1 on request): bfloat16 compute, float32
weights, float32 losses.

Keras applies a dtype policy when a layer is *built*, and every network here is built once, in
float32, for all stages. `mixed_twin` therefore builds a second set of the same networks under the
policy and copies the weights in (mixed-precision variables stay float32, so the copy is exact). The
MID stage trains the twin; `copy_back` puts the trained networks into the float32 networks,
which are the ones saved, exported and evaluated: evaluation attacks always run in float32.

Why: on CPUs with AVX512_BF16/AMX the MID step runs faster in bfloat16 (benchmarks/train_step.py;
docs/performance.md). Losses are computed in float32 (training/losses.py), and the pool's attacks
crafted by a bfloat16 target succeed about as often as float32 ones (benchmarks/train_step.py prints
both). On CPUs without native bfloat16 it still runs, but TensorFlow emulates bfloat16 and a step is
several times slower than in float32.

`auto` (the flagfiles' choice) therefore picks bfloat16 only where it is native: a CPU that lists
AVX512_BF16 or AMX-BF16 in /proc/cpuinfo, or a GPU of compute capability >= 8.0; float32 everywhere else.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from mid_tf.config import PRECISIONS
from mid_tf.hardware import cpu_flags
from mid_tf.models import MIDModels, build_models

REQUESTABLE = ("auto", *PRECISIONS)   # what a run configuration may ask for


def native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """(bfloat16 compute is native here, why) — a GPU of compute capability >= 8.0, or a CPU with
    AVX512_BF16 or AMX-BF16. Elsewhere TensorFlow emulates bfloat16 and it is slower than float32."""
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(cc) >= (8, 0):
            return True, f"GPU compute capability {cc[0]}.{cc[1]}"
    found = sorted(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})
    if found:
        return True, "CPU has " + " and ".join(found)
    return False, "no AVX512_BF16/AMX-BF16 on this CPU and no GPU of compute capability >= 8.0: bfloat16 would be emulated"


def resolve(requested: str, cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """`auto` -> mixed_bfloat16 where bfloat16 is native, else float32; explicit choices are kept.
    Returns (precision, reason)."""
    if requested not in REQUESTABLE:
        raise ValueError(f"precision must be one of {REQUESTABLE}, got {requested!r}")
    if requested != "auto":
        return requested, "requested"
    native, why = native_bfloat16(cpuinfo)
    return ("mixed_bfloat16" if native else "float32"), "auto: " + why


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
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return models
    with dtype_policy(precision):
        twin = build_models(dataset, width=width, input_shape=models.input_shape,
                            num_classes=models.num_classes, decoder_unpool=models.decoder_unpool)
    for name in ("target", "teacher_encoder", "decoder", "classifier", "student_encoder", "student_classifier",
                 "surrogate", "student_decoder", "pgd_at", "trades"):
        getattr(twin, name).set_weights(getattr(models, name).get_weights())
    return twin


def copy_back(twin: MIDModels, models: MIDModels, names=("student_encoder",)) -> None:
    """The trained networks `names` of the twin into the float32 networks (no-op when the twin is `models`)."""
    if twin is not models:
        for name in names:
            getattr(models, name).set_weights(getattr(twin, name).get_weights())

