"""MID's multi-consistency distillation loss (mid-method.md §1.4, corrected per §1.5).

For adversarial inputs x~ with clean counterparts x and labels y, student features f = E_s(x~):

  L_LC = CE(C(f), y)                                           label consistency (prediction level)
  L_AC = KL( softmax(E_t(x)) || softmax(f) )                    adversarial consistency (feature level)
  L_CC = KL( softmax(E_t(x)) || softmax(E_t(D_t(f, idx_s))) )   cyclic consistency (pixel level)
  L    = w_LC * L_LC + w_AC * L_AC + w_CC * L_CC

The softmax runs over the feature *channels* by default (the official `nn.LogSoftmax()` with no dim
on an NCHW tensor), the KL is averaged over every element as PyTorch's `KLDivLoss()` default does,
so the official weights (1 / 1.5 / 0.8) keep their meaning. The CC target is softmax(E_t(x)) — the
official code passes log-probabilities there, which makes the term zero (PyTorch 0.4) or NaN (modern
PyTorch). The decoder uses the *student's* pooling switches, as in the official code.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class LossWeights:
    lc: float = 1.0   # label consistency
    ac: float = 1.5   # adversarial (feature) consistency
    cc: float = 0.8   # cyclic consistency

    def validate(self, flag: str) -> None:
        if min(self.lc, self.ac, self.cc) < 0 or max(self.lc, self.ac, self.cc) == 0:
            raise ValueError(f"{flag}: loss weights must be >= 0 and not all zero, got {self}")


def kl_elementwise_mean(teacher_logits, student_logits, axis: int = -1):
    """mean over all elements of p * (log p - log q), p = softmax(teacher), q = softmax(student)."""
    log_p = tf.nn.log_softmax(teacher_logits, axis=axis)
    log_q = tf.nn.log_softmax(student_logits, axis=axis)
    return tf.reduce_mean(tf.exp(log_p) * (log_p - log_q))


def cross_entropy(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def multi_consistency(student_out: dict, teacher_clean_features, labels, *, classifier, decoder, teacher_encoder,
                      weights: LossWeights, softmax_axis: int = -1) -> dict:
    """The three terms and their weighted sum for one batch of student outputs.

    `student_out` is the student encoder's output dict ({"features", "indices"}); the frozen teacher
    parts are called in inference mode (gradients still flow *through* them into the student).
    """
    f = student_out["features"]
    terms = {"lc": cross_entropy(labels, classifier(f, training=False))}
    terms["ac"] = kl_elementwise_mean(teacher_clean_features, f, axis=softmax_axis)
    if weights.cc:
        regenerated = decoder([f, *student_out["indices"]], training=False)
        cyclic = teacher_encoder(regenerated, training=False)["features"]
        terms["cc"] = kl_elementwise_mean(teacher_clean_features, cyclic, axis=softmax_axis)
    else:
        terms["cc"] = tf.zeros((), f.dtype)
    terms["total"] = weights.lc * terms["lc"] + weights.ac * terms["ac"] + weights.cc * terms["cc"]
    return terms
