"""Builds every network MID needs for a dataset, and composes the deployed pipelines.

`build_models(dataset)` returns an `MIDModels`: the undefended target, the teacher's encoder E_t,
decoder D_t and classifier head C, the student encoder E_s (E_t's architecture, its own random
init as in the official code) and the student head C_s (C's architecture, a copy of C's weights: it
stays equal to C unless MID trains it, --train_head; the deployed pipeline is C_s(E_s(.))), the
adversarial-training baselines, and the surrogate (models/surrogate.py: a plain CNN of another family,
the transfer source MID never saw; its initial weights come from `surrogate_seed` alone), and the student decoder
D_s (D_t's architecture and weights until stage regen trains it: training/regen.py). Composition helpers:
  build_pipeline(E, C)        x -> C(E(x)) logits        (the deployed classifier when E = E_s)
  build_regenerator(E, D)     x -> D(E(x)) image         (robust regeneration when E = E_s)
  build_autoencoder(E, D, C)  x -> {logits, reconstruction}   (stage-1 teacher training)
The decoder always decodes with the indices of the encoder it is composed with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import keras
import numpy as np

from mid_tf.models import lenet, resnet
from mid_tf.models.surrogate import build_surrogate

# dataset -> (family module, input shape, classes)
_FAMILIES = {
    "mnist": (lenet, (28, 28, 1), 10),
    "fashion_mnist": (lenet, (28, 28, 1), 10),
    "cifar10": (resnet, (32, 32, 3), 10),
    "svhn_cropped": (resnet, (32, 32, 3), 10),
}


@dataclasses.dataclass
class MIDModels:
    target: keras.Model
    teacher_encoder: keras.Model
    decoder: keras.Model
    classifier: keras.Model
    student_encoder: keras.Model
    student_classifier: keras.Model
    input_shape: tuple
    num_classes: int
    # Adversarial-training baselines (stages pgd_at, trades): the target's architecture, own weights.
    pgd_at: keras.Model | None = None
    trades: keras.Model | None = None
    # Stage surrogate: a plain CNN (another family than the target's), a transfer source MID never saw.
    surrogate: keras.Model | None = None
    # D_s, the deployed regeneration decoder D_s(E_s(x)): a copy of D_t until stage regen trains it.
    student_decoder: keras.Model | None = None
    decoder_unpool: str = "switches"  # how D_t and D_s unpool (build_models' argument), for twins of these networks


def family_for(dataset: str, input_shape=None, num_classes=None):
    """(family module, input shape, classes) for a named dataset, or for an image folder from the shape its
    images have: 28x28x1 -> LeNet-5, anything else with sides divisible by 8 -> the ResNet family."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if shape == (28, 28, 1):
            return lenet, shape, int(num_classes or 10)
        if len(shape) != 3 or shape[0] % 8 or shape[1] % 8:
            raise ValueError(f"images of shape {shape}: the ResNet family needs height and width divisible by 8 "
                             "(e.g. 32x32x3); resize the images")
        return resnet, shape, int(num_classes or 10)
    if dataset not in _FAMILIES:
        raise ValueError(f"no model family for dataset '{dataset}'; known: {sorted(_FAMILIES)}")
    return _FAMILIES[dataset]


def build_models(dataset: str = "mnist", width: float = 1.0, student_width: float | None = None, *,
                 input_shape=None, num_classes=None, surrogate_seed: int = 0,
                 decoder_unpool: str = "switches") -> MIDModels:
    """All MID networks for `dataset` (or, with `input_shape`, for an image folder's images; family_for).
    `width` scales channels (tests use small widths). `surrogate_seed` draws the surrogate's initial
    weights (a run passes RunConfig.surrogate_seed); the other networks draw from the global stream.

    `student_width` may differ from the teacher's only if the feature shapes still match (they do
    not for LeNet: the classifier and decoder are built for the teacher's feature shape).
    """
    module, shape, classes = family_for(dataset, input_shape, num_classes)
    decoder_kw = {}
    if decoder_unpool != "switches":  # LeNet's decoder unpools; the ResNet family's upsamples by strided convs
        if module is not lenet:
            raise ValueError(f"decoder_unpool={decoder_unpool!r} is for the LeNet family (28x28x1 images), whose "
                             "decoder unpools; the ResNet family's decoder has no switches: leave it at 'switches'")
        decoder_kw["unpool"] = decoder_unpool
    student_width = width if student_width is None else student_width
    models = MIDModels(
        target=module.build_target(shape, classes, width=width, name="target"),
        teacher_encoder=module.build_encoder(shape, width=width, name="teacher_encoder"),
        decoder=module.build_decoder(shape, width=width, name="teacher_decoder", **decoder_kw),
        classifier=module.build_classifier(shape, classes, width=width, name="teacher_classifier"),
        student_encoder=module.build_encoder(shape, width=student_width, name="student_encoder"),
        student_classifier=module.build_classifier(shape, classes, width=width, name="student_classifier"),
        input_shape=shape,
        num_classes=classes,
        pgd_at=module.build_target(shape, classes, width=width, name="pgd_at"),
        trades=module.build_target(shape, classes, width=width, name="trades"),
        surrogate=build_surrogate(shape, classes, width=width, seed=surrogate_seed, name="surrogate"),
        decoder_unpool=decoder_unpool,
    )
    with _global_draws_kept():  # D_s's initial weights are overwritten below: they must not shift later draws
        models.student_decoder = module.build_decoder(shape, width=width, name="student_decoder", **decoder_kw)
    copy_teacher_parts(models)
    return models


@contextlib.contextmanager
def _global_draws_kept():
    """Restores Python's and NumPy's global random state on exit (Keras draws unseeded initializers' seeds
    from Python's), so a network built inside leaves every later random draw of the run as it was."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def copy_teacher_parts(models: MIDModels) -> None:
    """C_s := C and D_s := D_t. Called when the teacher is built, trained or loaded: until MID trains C_s
    (--train_head) the deployed C_s(E_s(.)) is the paper's C(E_s(.)), and until stage regen trains D_s the
    deployed regeneration D_s(E_s(.)) is the paper's D_t(E_s(.))."""
    models.student_classifier.set_weights(models.classifier.get_weights())
    if models.student_decoder is not None:
        models.student_decoder.set_weights(models.decoder.get_weights())


def encode(encoder: keras.Model, x, training: bool = False):
    """Runs an encoder; returns `(features, indices)` (indices: list, empty for the ResNet family)."""
    out = encoder(x, training=training)
    return out["features"], list(out["indices"])


def decode(decoder: keras.Model, features, indices, training: bool = False):
    return decoder([features, *indices], training=training)


def build_pipeline(encoder: keras.Model, classifier: keras.Model, name: str = "pipeline") -> keras.Model:
    """x -> C(E(x)) logits, as one Keras model (used for attacks, evaluation and export)."""
    x = keras.Input(encoder.input_shape[1:], name="image")
    return keras.Model(x, classifier(encoder(x)["features"]), name=name)


def build_regenerator(encoder: keras.Model, decoder: keras.Model, name: str = "regenerator") -> keras.Model:
    """x -> D(E(x)): the decoder uses the pooling indices of this encoder."""
    x = keras.Input(encoder.input_shape[1:], name="image")
    out = encoder(x)
    return keras.Model(x, decoder([out["features"], *out["indices"]]), name=name)


def build_autoencoder(encoder: keras.Model, decoder: keras.Model, classifier: keras.Model,
                      name: str = "teacher") -> keras.Model:
    """x -> {logits: C(E(x)), reconstruction: D(E(x))}: the stage-1 teacher."""
    x = keras.Input(encoder.input_shape[1:], name="image")
    out = encoder(x)
    return keras.Model(x, {"logits": classifier(out["features"]),
                           "reconstruction": decoder([out["features"], *out["indices"]])}, name=name)
