"""The MID meta-learner: a `keras.Model` whose `train_step` is one step of Meta Invariance Defense.

Read it against docs/method.md §Stage 2 (the meta step); the file follows its order and names:

    f_t      = E_t(x)                                teacher's clean features (frozen, no gradient)
    S, u     = sampled from the Attacker Pool        meta-train tasks, held-out task    (`sample_tasks`, `Tasks`)
    x~_s     = A_s(x), s ∈ S ∪ {u}                   crafted on the target or C(E_s(·)) (`AttackPool.craft_step`)
    L(θ, x~) = w_LC·CE(C(E_s(x~;θ)), y) + w_AC·KL(sm f_t ‖ sm E_s(x~;θ))
               + w_CC·KL(sm f_t ‖ sm E_t(D_t(E_s(x~;θ))))
               + w_PC·‖D_t(E_s(x~;θ)) − x‖₁         x: the clean batch                   (`_loss`, losses.py)
    L_train  = Σ_{s∈S} L(θ, x~_s)
    θ'       = θ − α ∇θ L_train                      inner step
    L_test   = L(θ', x~_u)                           meta-test on the held-out attack, at θ'
    J(θ)     = L_train + β·L_test                                                           (`_meta_objective`)
    θ       ← Adam(θ, ∇θ J)                                                                 (`train_step`)

θ' is never assigned to variables: the student is run functionally with `stateless_call`, so the
outer tape differentiates through the inner gradient (Hessian-vector products, never a Hessian).
`meta_order=1` stops the gradient through ∇θ L_train (first-order MAML/MLDG approximation); then
dθ'/dθ = I and ∇θ J = ∇θ L_train + β ∇θ' L_test, each loss differentiated once by its own tape.
Only E_s is trainable; E_t, D_t, C and the target are frozen by construction (`trainable=False`).
With a `student_classifier` (`MIDStageConfig.train_head`) θ also holds a student head C_s, initialised
from C: the label term becomes CE(C_s(E_s(x~)), y), the deployed pipeline C_s(E_s(·)); C itself stays
frozen (the feature and cyclic terms do not use a head).
The pixel term w_PC·‖D_t(E_s(x~;θ)) − x‖₁ (mean L1 against the *clean* x; `MIDStageConfig.pixel_weight`, one
weight for meta-train and meta-test) is the paper's pixel-level consistency, which the official code computes
but never adds; at w_PC = 0 (default) it is not computed and L is the three-term loss bit for bit.
BatchNorm (the ResNet family for natural images): every L(·) runs E_s in training mode, so each pass
normalises with the statistics of its own input batch: L_train with those of concat(S) (the k meta-train
tasks pooled, as one batch of k·B), L_test at θ' with those of the held-out task alone. The batch
statistics are functions of the weights, so they are part of J(θ) and the outer tape differentiates
through them too (tests/test_rgb.py checks the second-order gradient against finite differences on a
BatchNorm ResNet). BN's scale and offset are in θ and take the fast-weight step like any weight; the moving
averages are state, not θ: only the θ pass updates them (assigned after the step, `train_step`), the
θ' pass neither reads nor keeps them. Inference, attacks on C(E_s(·)) and the frozen E_t use the moving
averages (training=False).
Under a distribution strategy each replica adapts on its shard; with `sync_inner_gradient` the
inner gradient is all-reduced (mean) so θ' equals the single-device θ' of the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from mid_tf.config import MIDStageConfig
from mid_tf.training.losses import LossWeights, multi_consistency

TERMS = ("lc", "ac", "cc", "pc")  # the terms of L logged per split: train_<term>, test_<term>


class Tasks(NamedTuple):
    """One step's sampled tasks: S as one batch of k·B and the held-out task u, with their targets.

    Σ_{s∈S} L(θ, s) = k · L(θ, concat(S)), since every term of L is a mean over its batch."""
    x_train: tf.Tensor        # concat(S): the k meta-train tasks        [k·B, H, W, C]
    y_train: tf.Tensor        # y, k times                               [k·B]
    f_t_train: tf.Tensor      # f_t, k times                             [k·B, ...]
    x_clean_train: tf.Tensor  # x, k times (the pixel term's target)     [k·B, H, W, C]
    k: tf.Tensor              # |S|, in x's dtype
    x_test: tf.Tensor         # u: the held-out task                     [B, H, W, C]
    y: tf.Tensor              # labels                                   [B]
    f_t: tf.Tensor            # E_t(x), no gradient                      [B, ...]
    x_clean: tf.Tensor        # x, the clean batch                       [B, H, W, C]
    held_out: tf.Tensor       # u's index in the pool (int32 scalar)


def _tiled(t, k):
    """t repeated k times along the batch axis: the targets of concat(S)."""
    return tf.tile(t, tf.concat([[k], tf.ones([tf.rank(t) - 1], tf.int32)], 0))


class MetaInvarianceDefense(keras.Model):
    """Holds the frozen teacher (E_t, D_t, C), the target, the trainable student E_s and the pool.

    `config` is the run's `MIDStageConfig` (validated here); the pool carries the eps warm-up."""

    def __init__(self, *, student_encoder, teacher_encoder, decoder, classifier, target, pool,
                 config: MIDStageConfig = MIDStageConfig(), student_classifier=None, **kwargs):
        super().__init__(**kwargs)
        config.validate()
        self.config = config
        self.train_weights = LossWeights(*config.train_weights, pc=config.pixel_weight)
        self.test_weights = LossWeights(*config.test_weights, pc=config.pixel_weight)
        self.student_encoder = student_encoder
        self.teacher_encoder, self.decoder, self.classifier, self.target = teacher_encoder, decoder, classifier, target
        for frozen in (teacher_encoder, decoder, classifier, target):
            frozen.trainable = False
        self.train_head = student_classifier is not None
        if self.train_head:  # C_s is trained with E_s (tracked, so checkpoints hold it)
            if student_classifier is classifier:
                raise ValueError("student_classifier must be a copy of the teacher head, not the frozen head itself")
            self.student_classifier = student_classifier
            student_classifier.trainable = True
        self.head = student_classifier if self.train_head else classifier  # the deployed head
        self.pool = pool
        self.trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "L_train", "L_test", *(f"{split}_{term}" for split in ("train", "test") for term in TERMS))}

    # ----------------------------------------------------------------------------- inference
    def call(self, x, training=False):
        """The deployed classifier: C(E_s(x)) logits (C_s(E_s(x)) with a student head)."""
        return self.head(self.student_encoder(x, training=training)["features"], training=False)

    @property
    def student_variables(self) -> list:
        """θ: E_s's trainable variables, then C_s's with a student head. The optimizer updates exactly these."""
        head = self.student_classifier.trainable_variables if self.train_head else []
        return [*self.student_encoder.trainable_variables, *head]

    def regenerate(self, x):
        """Robust regeneration D_t(E_s(x)), with the student's pooling switches."""
        out = self.student_encoder(x, training=False)
        return self.decoder([out["features"], *out["indices"]], training=False)

    @property
    def metrics(self):
        return list(self.trackers.values())

    # ----------------------------------------------------------------------------- f_t, S and u
    def _attack_source(self):
        if self.config.attack_source == "target":
            return self.target
        return lambda x: self(x, training=False)  # white-box: the current C(E_s(·))

    def sample_tasks(self, x, y, step, crafted=None) -> Tasks:
        """S and u for optimizer step `step`: the pool draws them from (seed, step), then crafts them on the
        attack source in the eps warm-up's ball. `crafted` [T, B, H, W, C]: every task crafted beforehand
        (the attack cache of the transfer protocol)."""
        meta_train_idx, held_out = self.pool.sample_tf(step)
        rows = self.pool.craft_step(self._attack_source(), x, y, step,
                                    tf.concat([meta_train_idx, held_out[None]], 0), tasks=crafted)
        k = tf.shape(meta_train_idx)[0]
        f_t = tf.stop_gradient(self.teacher_encoder(x, training=False)["features"])
        return Tasks(x_train=tf.reshape(rows[:-1], tf.concat([[-1], tf.shape(x)[1:]], 0)),
                     y_train=tf.tile(y, [k]), f_t_train=_tiled(f_t, k), x_clean_train=_tiled(x, k),
                     k=tf.cast(k, x.dtype), x_test=rows[-1], y=y, f_t=f_t, x_clean=x, held_out=held_out)

    # ----------------------------------------------------------------------------- L(θ, x~)
    def _loss(self, params, non_trainable, x_in, x, f_t, y, weights):
        """L(params, x_in): the multi-consistency loss of the student at `params` on one input batch x~ = x_in,
        with the targets of its clean counterpart: x (pixel term), f_t = E_t(x) and y; returns (terms, updated
        non-trainable state). `params` is θ as a list (student_variables' order): E_s's tensors, then C_s's
        with a student head."""
        n = len(self.student_encoder.trainable_variables)
        out, non_trainable = self.student_encoder.stateless_call(params[:n], non_trainable, x_in, training=True)
        classifier = self.classifier
        if self.train_head:  # C_s run functionally at its entries of θ (θ' in the meta-test)
            head_params, head_state = params[n:], [v.value for v in self.student_classifier.non_trainable_variables]

            def classifier(f, training=False):
                return self.student_classifier.stateless_call(head_params, head_state, f, training=training)[0]
        terms = multi_consistency(out, f_t, y, classifier=classifier, decoder=self.decoder,
                                  teacher_encoder=self.teacher_encoder, weights=weights, clean_images=x,
                                  softmax_axis=self.config.softmax_axis, kl_reduction=self.config.kl_reduction)
        return terms, non_trainable

    # ----------------------------------------------------------------------------- J(θ) and ∇θ J
    def _meta_objective(self, theta, state, tasks: Tasks):
        """J(θ) = L_train(θ) + β·L_test(θ − α ∇θ L_train(θ)) and ∇θ J, with θ given as tensors.

        meta_order=2: the outer tape differentiates J through the inner gradient.
        meta_order=1: ∇θ L_train is stopped in θ', so ∇θ J = ∇θ L_train + β ∇θ' L_test from the two inner
        tapes (the outer tape is not asked: it would run L_train's backward pass a second time).
        Returns (∇θ J / replicas: the optimizer's all-reduce sums the replicas' gradients; logs with
        "loss" = J; the non-trainable state after the θ pass)."""
        cfg = self.config
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as train_tape:
                train_tape.watch(theta)
                train_terms, state_after = self._loss(theta, state, tasks.x_train, tasks.x_clean_train,
                                                      tasks.f_t_train, tasks.y_train, self.train_weights)
                L_train = tasks.k * train_terms["total"]
            g_local = train_tape.gradient(L_train, theta)  # recorded by the outer tape: order 2 keeps it
            g = g_local
            if replicas > 1 and cfg.sync_inner_gradient:
                g = tf.distribute.get_replica_context().all_reduce("mean", g_local)
            if cfg.meta_order == 1:
                g = [tf.stop_gradient(gi) for gi in g]
            theta_prime = [w - cfg.alpha * gi for w, gi in zip(theta, g)]  # never assigned to variables
            with tf.GradientTape() as test_tape:
                test_tape.watch(theta_prime)
                test_terms, _ = self._loss(theta_prime, state_after, tasks.x_test, tasks.x_clean, tasks.f_t,
                                           tasks.y, self.test_weights)
                L_test = test_terms["total"]
            J = L_train + cfg.beta * L_test
            scaled = J / replicas
        if cfg.meta_order == 2:
            grads = outer.gradient(scaled, theta)
        else:
            grads = [(g1 + cfg.beta * g2) / replicas
                     for g1, g2 in zip(g_local, test_tape.gradient(L_test, theta_prime))]
        logs = {"loss": J, "L_train": L_train, "L_test": L_test,
                **{f"train_{t}": train_terms[t] for t in TERMS}, **{f"test_{t}": test_terms[t] for t in TERMS}}
        return grads, logs, state_after

    def meta_gradients(self, x, y, step, crafted=None):
        """(∇θ J / replicas, logs, new non-trainable state, held-out index) without applying anything."""
        tasks = self.sample_tasks(x, y, step, crafted)
        theta = [v.value for v in self.student_variables]
        state = [v.value for v in self.student_encoder.non_trainable_variables]
        return (*self._meta_objective(theta, state, tasks), tasks.held_out)

    def meta_objective(self, x, y, step, theta=None):
        """J at `theta` (default: the current weights). For tests and diagnostics."""
        theta = [v.value for v in self.student_variables] if theta is None else list(theta)
        state = [v.value for v in self.student_encoder.non_trainable_variables]
        return self._meta_objective(theta, state, self.sample_tasks(x, y, step))[1]["loss"]

    # ----------------------------------------------------------------------------- Keras steps
    def train_step(self, data):
        if len(data) == 3:  # (x, y, tasks [B, T, H, W, C]) from the attack cache
            x, y, cached = data
            crafted = tf.transpose(cached, tf.concat([[1, 0], tf.range(2, tf.rank(cached))], 0))
        else:
            (x, y), crafted = data, None
        grads, logs, state_after, held_out = self.meta_gradients(x, y, self.optimizer.iterations, crafted)
        self.optimizer.apply(grads, self.student_variables)
        for var, value in zip(self.student_encoder.non_trainable_variables, state_after):
            var.assign(value)  # BatchNorm moving statistics (ResNet family) from the θ pass
        for name, value in logs.items():
            self.trackers[name].update_state(value)
        results = {m.name: m.result() for m in self.metrics}  # means since the epoch began
        results["held_out"] = tf.cast(held_out, tf.float32)  # this step's held-out task (an index, not a mean)
        return results

    def test_step(self, data):
        x, y = data
        logits = self(x, training=False)
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)), tf.float32))
        return {"clean_accuracy": acc}
