"""The MID meta-learner: a `keras.Model` whose `train_step` is one step of Meta Invariance Defense.

Read it against the pseudo-code of mid-method.md §1.6 — same order, same names:

    f_t     = E_t(x)                                   teacher's clean features (frozen, no grad)
    tasks   = {x} ∪ {A(x) : A in Attacker Pool}        crafted on the target or on C(E_s(·))
    S, u    = pool split: meta-train tasks, held-out task
    L(θ, x~) = w_LC·CE(C(E_s(x~;θ)), y) + w_AC·KL(sm f_t ‖ sm E_s(x~;θ)) + w_CC·KL(sm f_t ‖ sm E_t(D_t(E_s(x~;θ))))
    L_train = Σ_{s∈S} L(θ, s)
    θ'      = θ − α ∇θ L_train                          inner step, graph kept (second order)
    L_test  = L(θ', u)                                  meta-test on the held-out attack, at θ'
    θ      ← Adam(θ, ∇θ (L_train + β·L_test))

θ' is never assigned to variables: the student is run functionally with `stateless_call`, so the
outer tape differentiates through the inner gradient (Hessian-vector products, never a Hessian).
`meta_order=1` stops the gradient through ∇θ L_train (first-order MAML/MLDG approximation); its
gradient is then computed without the outer tape (`_first_order_gradients`, same numbers, one backward
pass less).
Only E_s is trainable; E_t, D_t, C and the target are frozen by construction (`trainable=False`).
With `student_classifier` (--train_head) θ also holds a student head C_s, initialised from C: the label
term becomes CE(C_s(E_s(x~)), y), the deployed pipeline C_s(E_s(·)); C itself stays frozen (the feature
and cyclic terms do not use a head).
Under a distribution strategy each replica adapts on its shard; with `sync_inner_gradient` the
inner gradient is all-reduced (mean) so θ' equals the single-device θ' of the global batch.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from mid_tf.attacks import warmup
from mid_tf.attacks.pool import as_model_fn as pool_model_fn
from mid_tf.training.losses import KL_REDUCTIONS, LossWeights, multi_consistency


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    alpha: float = 1e-4                  # inner (meta-train) step size; official 1e-4
    beta: float = 1.0                    # weight of the meta-test loss; official 1
    meta_order: int = 2                  # 2 = exact second order, 1 = first-order approximation
    train_weights: LossWeights = LossWeights(1.0, 1.5, 0.8)   # official meta-train weights
    test_weights: LossWeights = LossWeights(1.0, 1.0, 1.0)    # official meta-test weights
    softmax_axis: int = -1               # feature softmax axis: -1 = channels (official)
    kl_reduction: str = "elementwise_mean"   # official; "distribution_mean": true per-location KL (losses.py)
    attack_source: str = "target"        # target (paper's transfer protocol) | student (white-box)
    sync_inner_gradient: bool = True     # all-reduce the inner gradient across replicas
    eps_warmup_steps: int = 0            # pool eps ramps from 0 to full over these optimizer steps (0: off)

    def validate(self) -> "MetaConfig":
        if self.meta_order not in (1, 2):
            raise ValueError(f"--meta_order must be 1 or 2, got {self.meta_order}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"--meta_alpha and --meta_beta must be >= 0, got {self.alpha}, {self.beta}")
        if self.attack_source not in ("target", "student"):
            raise ValueError(f"--attack_source must be target or student, got {self.attack_source}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"--kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction}")
        if self.eps_warmup_steps < 0:
            raise ValueError(f"--mid_eps_warmup_epochs must be >= 0, got {self.eps_warmup_steps} steps")
        self.train_weights.validate("--meta_train_weights")
        self.test_weights.validate("--meta_test_weights")
        return self


class MetaInvarianceDefense(keras.Model):
    """Holds the frozen teacher (E_t, D_t, C), the target, the trainable student E_s and the pool."""

    def __init__(self, *, student_encoder, teacher_encoder, decoder, classifier, target, pool,
                 config: MetaConfig = MetaConfig(), student_classifier=None, **kwargs):
        super().__init__(**kwargs)
        self.config = config.validate()
        self.student_encoder = student_encoder
        self.teacher_encoder, self.decoder, self.classifier, self.target = teacher_encoder, decoder, classifier, target
        for frozen in (teacher_encoder, decoder, classifier, target):
            frozen.trainable = False
        self.train_head = student_classifier is not None
        if self.train_head:  # --train_head: C_s is trained with E_s (tracked, so checkpoints hold it)
            if student_classifier is classifier:
                raise ValueError("student_classifier must be a copy of the teacher head, not the frozen head itself")
            self.student_classifier = student_classifier
            student_classifier.trainable = True
        self.head = student_classifier if self.train_head else classifier  # the deployed head
        self.pool = pool
        self.trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "L_train", "L_test", "train_lc", "train_ac", "train_cc", "test_lc", "test_ac", "test_cc")}
        self.held_out_tracker = keras.metrics.Mean(name="held_out")  # last step's held-out task (mean over an epoch)

    # ----------------------------------------------------------------------------- inference
    def call(self, x, training=False):
        """The deployed classifier: C(E_s(x)) logits (C_s(E_s(x)) with --train_head)."""
        return self.head(self.student_encoder(x, training=training)["features"], training=False)

    @property
    def student_variables(self) -> list:
        """θ: E_s's trainable variables, then C_s's with --train_head. The optimizer updates exactly these."""
        head = self.student_classifier.trainable_variables if self.train_head else []
        return [*self.student_encoder.trainable_variables, *head]

    def regenerate(self, x):
        """Robust regeneration D_t(E_s(x)), with the student's pooling switches."""
        out = self.student_encoder(x, training=False)
        return self.decoder([out["features"], *out["indices"]], training=False)

    @property
    def metrics(self):
        return [*self.trackers.values(), self.held_out_tracker]

    # ----------------------------------------------------------------------------- the MID step
    def _student(self, params, non_trainable, x):
        """E_s(x; params) run functionally; returns (outputs, updated non-trainable state)."""
        return self.student_encoder.stateless_call(params, non_trainable, x, training=True)

    def _loss(self, params, non_trainable, x_in, f_t, y, weights):
        """L(params, x_in): the multi-consistency loss of the student at `params` on one input batch.
        `params` is θ as a list (student_variables' order): E_s's tensors, then C_s's with --train_head."""
        n = len(self.student_encoder.trainable_variables)
        out, non_trainable = self._student(params[:n], non_trainable, x_in)
        classifier = self.classifier
        if self.train_head:  # C_s run functionally at its entries of θ (θ' in the meta-test)
            head_params, head_state = params[n:], [v.value for v in self.student_classifier.non_trainable_variables]

            def classifier(f, training=False):
                return self.student_classifier.stateless_call(head_params, head_state, f, training=training)[0]
        terms = multi_consistency(out, f_t, y, classifier=classifier, decoder=self.decoder,
                                  teacher_encoder=self.teacher_encoder, weights=weights,
                                  softmax_axis=self.config.softmax_axis, kl_reduction=self.config.kl_reduction)
        return terms, non_trainable

    def _attack_source(self):
        if self.config.attack_source == "target":
            return self.target
        return lambda x: self(x, training=False)  # white-box: the current C(E_s(·))

    def eps_fraction(self, step):
        """r of the pool's eps warm-up at optimizer step `step` (attacks/warmup.py): every task lies in the
        ball of radius r·eps around x, the attack run on z ↦ model(x + r(z − x)), as the baselines' warm-up.
        The clean task is unchanged."""
        return warmup.eps_fraction(step, self.config.eps_warmup_steps)

    def _prepare(self, x, y, step, tasks=None):
        """Tasks for this step: meta-train batch (k tasks as one batch of k·B), held-out batch, f_t.

        `tasks` [T, B, H, W, C] may come precomputed (the attack cache of the transfer protocol);
        otherwise the pool crafts the clean batch and its attacks on the chosen source, here.
        """
        meta_train_idx, held_out = self.pool.sample_tf(step)
        k = tf.shape(meta_train_idx)[0]
        source, shrink = self._attack_source(), (lambda t: t)
        if self.config.eps_warmup_steps:  # eps warm-up: the attacks work in the ball of radius r·eps
            r = tf.cast(self.eps_fraction(step), tf.float32)
            x_ref = tf.cast(x, tf.float32)

            def shrink(t):
                return warmup.shrink(x_ref, t, r)

            source = (lambda z, _s=pool_model_fn(source): _s(shrink(z)))
        if tasks is None and self.pool.num_meta_train + 1 < self.pool.num_tasks:
            # Only this step's k + 1 tasks are crafted (the others would be thrown away): same tensors.
            chosen = shrink(self.pool.craft_tasks(source, x, y, step,
                                                  tf.concat([meta_train_idx, held_out[None]], 0)))
            x_train_tasks, x_test = chosen[:-1], chosen[-1]
        else:
            if tasks is None:
                tasks = self.pool.craft_all(source, x, y, step)
            tasks = shrink(tf.stop_gradient(tasks))  # [T, B, H, W, C]: no gradient path into the attacks
            x_train_tasks, x_test = tf.gather(tasks, meta_train_idx), tf.gather(tasks, held_out)
        # Σ_{s∈S} L(θ, s) = k · L(θ, concat(S)), since every term is a mean over its batch.
        x_train = tf.reshape(x_train_tasks, tf.concat([[-1], tf.shape(x)[1:]], 0))
        f_t = tf.stop_gradient(self.teacher_encoder(x, training=False)["features"])
        return dict(x_train=x_train, y_train=tf.tile(y, [k]), x_test=x_test, y=y, f_t=f_t,
                    f_t_train=tf.tile(f_t, tf.concat([[k], tf.ones([tf.rank(f_t) - 1], tf.int32)], 0)),
                    k=tf.cast(k, x.dtype), held_out=held_out)

    def _meta_objective(self, theta, state, batch):
        """J(θ) = L_train(θ) + β · L_test(θ − α ∇θ L_train(θ)), with θ given as tensors."""
        cfg = self.config
        with tf.GradientTape() as inner:
            inner.watch(theta)
            train_terms, state_after = self._loss(theta, state, batch["x_train"], batch["f_t_train"],
                                                  batch["y_train"], cfg.train_weights)
            L_train = batch["k"] * train_terms["total"]
        grad_train = inner.gradient(L_train, theta)  # recorded by the caller's tape: second order kept
        if tf.distribute.get_strategy().num_replicas_in_sync > 1 and cfg.sync_inner_gradient:
            grad_train = tf.distribute.get_replica_context().all_reduce("mean", grad_train)
        if cfg.meta_order == 1:
            grad_train = [tf.stop_gradient(g) for g in grad_train]
        theta_prime = [w - cfg.alpha * g for w, g in zip(theta, grad_train)]  # never assigned to variables
        test_terms, _ = self._loss(theta_prime, state_after, batch["x_test"], batch["f_t"], batch["y"],
                                   cfg.test_weights)
        L_test = test_terms["total"]
        logs = {"L_train": L_train, "L_test": L_test,
                "train_lc": train_terms["lc"], "train_ac": train_terms["ac"], "train_cc": train_terms["cc"],
                "test_lc": test_terms["lc"], "test_ac": test_terms["ac"], "test_cc": test_terms["cc"]}
        return L_train + cfg.beta * L_test, logs, state_after

    def meta_objective(self, x, y, step, theta=None):
        """J at `theta` (default: the current weights). For tests and diagnostics."""
        theta = [v.value for v in self.student_variables] if theta is None else list(theta)
        state = [v.value for v in self.student_encoder.non_trainable_variables]
        return self._meta_objective(theta, state, self._prepare(x, y, step))[0]

    def meta_gradients(self, x, y, step, tasks=None):
        """(∇θ J, logs, new non-trainable state, held-out index) without applying anything."""
        batch = self._prepare(x, y, step, tasks)
        state = [v.value for v in self.student_encoder.non_trainable_variables]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.config.meta_order == 1:
            return (*self._first_order_gradients(batch, state, replicas), batch["held_out"])
        with tf.GradientTape() as outer:
            theta = [v.value for v in self.student_variables]
            outer.watch(theta)
            total, logs, state_after = self._meta_objective(theta, state, batch)
            scaled = total / replicas  # inside the tape: the optimizer all-reduce-sums gradients
        logs["loss"] = total
        return outer.gradient(scaled, theta), logs, state_after, batch["held_out"]

    def _first_order_gradients(self, batch, state, replicas):
        """meta_order=1: θ' = θ − α·stop_gradient(∇L_train), so dθ'/dθ = I and
        ∇θ J = ∇θ L_train(θ) + β ∇θ' L_test(θ'): two tapes, each loss differentiated once (the outer
        tape of the second-order path would run the backward pass of L_train a second time)."""
        cfg = self.config
        theta = [v.value for v in self.student_variables]
        with tf.GradientTape() as inner:
            inner.watch(theta)
            train_terms, state_after = self._loss(theta, state, batch["x_train"], batch["f_t_train"],
                                                  batch["y_train"], cfg.train_weights)
            L_train = batch["k"] * train_terms["total"]
        grad_local = inner.gradient(L_train, theta)
        grad_train = grad_local
        if replicas > 1 and cfg.sync_inner_gradient:
            grad_train = tf.distribute.get_replica_context().all_reduce("mean", grad_local)
        theta_prime = [w - cfg.alpha * g for w, g in zip(theta, grad_train)]
        with tf.GradientTape() as test_tape:
            test_tape.watch(theta_prime)
            test_terms, _ = self._loss(theta_prime, state_after, batch["x_test"], batch["f_t"], batch["y"],
                                       cfg.test_weights)
            L_test = test_terms["total"]
        grad_test = test_tape.gradient(L_test, theta_prime)
        # Per replica, scaled by 1/replicas: the optimizer's all-reduce sums them (as the second-order path).
        grads = [(g1 + cfg.beta * g2) / replicas for g1, g2 in zip(grad_local, grad_test)]
        logs = {"L_train": L_train, "L_test": L_test, "loss": L_train + cfg.beta * L_test,
                "train_lc": train_terms["lc"], "train_ac": train_terms["ac"], "train_cc": train_terms["cc"],
                "test_lc": test_terms["lc"], "test_ac": test_terms["ac"], "test_cc": test_terms["cc"]}
        return grads, logs, state_after

    def train_step(self, data):
        if len(data) == 3:  # (x, y, tasks [B, T, H, W, C]) from the attack cache
            x, y, cached = data
            tasks = tf.transpose(cached, tf.concat([[1, 0], tf.range(2, tf.rank(cached))], 0))
        else:
            (x, y), tasks = data, None
        grads, logs, state_after, held_out = self.meta_gradients(x, y, self.optimizer.iterations, tasks)
        self.optimizer.apply(grads, self.student_variables)
        for var, value in zip(self.student_encoder.non_trainable_variables, state_after):
            var.assign(value)  # BatchNorm moving statistics (ResNet family) from the θ pass
        for name, value in logs.items():
            self.trackers[name].update_state(value)
        self.held_out_tracker.reset_state()
        self.held_out_tracker.update_state(tf.cast(held_out, tf.float32))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data
        logits = self(x, training=False)
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(y, tf.int64)), tf.float32))
        return {"clean_accuracy": acc}
