"""MID's multi-consistency distillation loss (docs/method.md §Stage 2; the official code's CC target fixed).

For adversarial inputs x~ with clean counterparts x and labels y, student features f = E_s(x~):

  L_LC = CE(C(f), y)                                           label consistency (prediction level)
  L_AC = KL( softmax(E_t(x)) || softmax(f) )                    adversarial consistency (feature level)
  L_CC = KL( softmax(E_t(x)) || softmax(E_t(D_t(f, idx_s))) )   cyclic consistency (regeneration level)
  L_PC = mean | D_t(f, idx_s) - x |                             pixel consistency (L1 against the clean x)
  L    = w_LC * L_LC + w_AC * L_AC + w_CC * L_CC + w_PC * L_PC

The softmax runs over the feature *channels* by default (the official `nn.LogSoftmax()` with no dim
on an NCHW tensor), the KL is averaged over every element as PyTorch's `KLDivLoss()` default does,
so the official weights (1 / 1.5 / 0.8) keep their meaning. The CC target is softmax(E_t(x)) — the
official code passes log-probabilities there, which makes the term zero (PyTorch 0.4) or NaN (modern
PyTorch). The decoder uses the *student's* pooling switches, as in the official code.
The official code computes the L1 pixel term but never adds it to the loss; w_PC (`--pixel_weight`)
defaults to 0, which leaves the loss and its gradient as the three-term one, bit for bit: the term is
neither computed nor added then. It is there for robust regeneration: with the feature terms alone,
D_t(E_s(x~)) stays far from x (docs/results/mnist_whitebox/report.md, its regeneration table).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from mid_tf.config import KL_REDUCTIONS


@dataclasses.dataclass(frozen=True)
class LossWeights:
    lc: float = 1.0   # label consistency
    ac: float = 1.5   # adversarial (feature) consistency
    cc: float = 0.8   # cyclic consistency
    pc: float = 0.0   # pixel consistency (0: the official loss, which computes the term but never adds it)


def _loss_dtype(t):
    """bfloat16/float16 activations (mixed precision) -> float32; float32/float64 unchanged."""
    return tf.cast(t, tf.float32) if t.dtype in (tf.bfloat16, tf.float16) else t


def kl_divergence(teacher_logits, student_logits, axis: int = -1, reduction: str = "elementwise_mean"):
    """KL(softmax teacher || softmax student) along `axis`, reduced as asked:

    elementwise_mean   mean over every element, PyTorch `KLDivLoss()`'s default (the official code): the
                       per-location KL divided by the number of channels (64 for LeNet), which makes the
                       feature terms ~1e-3 next to the CE term
    distribution_mean  the KL of each distribution (summed over `axis`), averaged over batch and
                       locations (PyTorch's 'batchmean' up to the location average)
    """
    if reduction == "elementwise_mean":
        return kl_elementwise_mean(teacher_logits, student_logits, axis)
    if reduction != "distribution_mean":
        raise ValueError(f"KL reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    return kl_elementwise_mean(teacher_logits, student_logits, axis) * tf.cast(
        tf.shape(student_logits)[axis], tf.float32 if student_logits.dtype != tf.float64 else tf.float64)


def kl_elementwise_mean(teacher_logits, student_logits, axis: int = -1):
    """mean over all elements of p * (log p - log q), p = softmax(teacher), q = softmax(student).

    Computed in float32 whatever the compute dtype (mixed precision): losses stay float32."""
    teacher_logits, student_logits = _loss_dtype(teacher_logits), _loss_dtype(student_logits)
    log_p = tf.nn.log_softmax(teacher_logits, axis=axis)
    log_q = tf.nn.log_softmax(student_logits, axis=axis)
    return tf.reduce_mean(tf.exp(log_p) * (log_p - log_q))


def cross_entropy(labels, logits):
    logits = _loss_dtype(logits)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def pixel_l1(regenerated, clean_images):
    """mean |D_t(E_s(x~)) - x| over every pixel, in float32 (float64 stays float64) whatever the compute dtype."""
    regenerated = _loss_dtype(regenerated)
    return tf.reduce_mean(tf.abs(regenerated - tf.cast(clean_images, regenerated.dtype)))


def multi_consistency(student_out: dict, teacher_clean_features, labels, *, classifier, decoder, teacher_encoder,
                      weights: LossWeights, clean_images=None, softmax_axis: int = -1,
                      kl_reduction: str = "elementwise_mean") -> dict:
    """The four terms and their weighted sum for one batch of student outputs.

    `student_out` is the student encoder's output dict ({"features", "indices"}); the frozen teacher
    parts are called in inference mode (gradients still flow *through* them into the student).
    `clean_images` is x, the clean counterpart of the student's input (needed when weights.pc > 0).
    A term whose weight is 0 is not computed (logged as 0) and not added, so a zero weight changes nothing.
    """
    f = student_out["features"]
    terms = {"lc": cross_entropy(labels, classifier(f, training=False))}
    terms["ac"] = kl_divergence(teacher_clean_features, f, softmax_axis, kl_reduction)
    zero = tf.zeros((), terms["lc"].dtype)
    terms["cc"], terms["pc"] = zero, zero
    if weights.cc or weights.pc:
        regenerated = decoder([f, *student_out["indices"]], training=False)  # D_t(E_s(x~)), student switches
    if weights.cc:
        cyclic = teacher_encoder(regenerated, training=False)["features"]
        terms["cc"] = kl_divergence(teacher_clean_features, cyclic, softmax_axis, kl_reduction)
    if weights.pc:
        if clean_images is None:
            raise ValueError("the pixel consistency (weights.pc > 0) needs clean_images, the clean x")
        terms["pc"] = pixel_l1(regenerated, clean_images)
    terms["total"] = weights.lc * terms["lc"] + weights.ac * terms["ac"] + weights.cc * terms["cc"]
    if weights.pc:
        terms["total"] = terms["total"] + weights.pc * terms["pc"]
    return terms
