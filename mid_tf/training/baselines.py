"""Adversarial-training baselines, trained by the same code, data stream and flags as MID.

  pgd_at  Madry et al. 2018: min_θ E[ CE(f(x~), y) ],  x~ = PGD on CE against the current f (white-box)
  trades  Zhang et al. 2019: min_θ E[ CE(f(x), y) + β·KL(softmax f(x) ‖ softmax f(x~)) ],
          x~ = PGD maximising that KL from x + U(-0.001, 0.001) (the paper's small random start)
Both wrap a network with the target's architecture, so the evaluation compares like with like. The
inner attack is a registry spec (`--baseline_attack`, default `pgd10`: ε 0.3, 10 steps of 0.04 with a
random start, the CPU-sized version of Madry's 40 steps of 0.01) run with CleverHans inside the
compiled train_step; its seed is folded from the step, so a resumed run redraws the same starts.

eps warm-up (`--baseline_eps_warmup_epochs`): at step t the attack runs in a ball of radius r·eps,
r = min(1, (t+1)/warmup_steps) (attacks/warmup.py, shared with the MID pool). Started at full eps, PGD-AT
stays at chance (docs/training.md): every adversarial is unrecognisable before the network has learned
anything. The ramp is exact PGD with radius and step scaled by r, written as the unchanged attack on a
rescaled input: the attack moves z in the full eps-ball around x and the network sees
x + r·(z - x) = (1-r)·x + r·z. Sign steps are invariant to the positive factor r, so z's steps of
eps_iter are steps of r·eps_iter on the input; the random start scales the same way, and
(1-r)·x + r·z stays in [0, 1] (for pixels in (0, 0.3) the lower edge of the box is slightly tighter
than clipping to 0 would be: r·z ≥ 0).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from mid_tf.attacks import get_spec, make_attack, warmup
from mid_tf.attacks.seeds import fold, seeded_random_start

BASELINES = ("pgd_at", "trades")


def _kl_rows(p_logits, q_logits):
    """Per-example KL(softmax p ‖ softmax q)."""
    log_p = tf.nn.log_softmax(tf.cast(p_logits, tf.float32))
    log_q = tf.nn.log_softmax(tf.cast(q_logits, tf.float32))
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


class AdversarialTraining(keras.Model):
    """`net` trained by PGD-AT or TRADES; `call` is the plain classifier (logits)."""

    def __init__(self, net: keras.Model, method: str, attack: str = "pgd10", trades_beta: float = 6.0,
                 seed: int = 0, warmup_steps: int = 0, **kwargs):
        super().__init__(**kwargs)
        if method not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {method!r}")
        spec = get_spec(attack)
        if not spec.graph_safe or spec.method not in ("pgd", "bim", "fgm") or spec.targeted:
            raise ValueError(f"--baseline_attack must be an untargeted graph-safe PGD/BIM/FGSM spec, got {attack!r}")
        self.net, self.method, self.spec, self.trades_beta, self.seed = net, method, spec, trades_beta, seed
        self.warmup_steps = int(warmup_steps)
        self._attack = make_attack(spec)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")

    def call(self, x, training=False):
        return self.net(x, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.acc_tracker]

    def _logits(self, z):
        return self.net(z, training=False)

    def eps_fraction(self, step):
        """r of the eps warm-up at optimizer step `step` (1 without warm-up; attacks/warmup.py)."""
        return warmup.eps_fraction(step, self.warmup_steps)

    def _trades_adversary(self, logits_fn, x, clean_logits, seed):
        from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
        s = self.spec

        def kl_loss(labels, logits):  # CleverHans maximises loss_fn(labels=y, logits=f(x~)); y = clean logits
            return _kl_rows(labels, logits)

        ctx = seeded_random_start(seed) if s.rand_init else contextlib.nullcontext()
        with ctx:
            adv = projected_gradient_descent(logits_fn, x, s.eps, s.eps_iter, s.nb_iter, s.norm, loss_fn=kl_loss,
                                             clip_min=0.0, clip_max=1.0, y=clean_logits, rand_init=True,
                                             rand_minmax=0.001, sanity_checks=False)
        return tf.stop_gradient(adv)

    def adversary(self, x, y, step, seed):
        """The training adversarial of `x` at optimizer step `step` (eps warm-up applied)."""
        r = tf.cast(self.eps_fraction(step), x.dtype)

        def shrink(z):  # the network sees x + r (z - x): the attack's ball and steps scaled by r
            return warmup.shrink(x, z, r)

        def logits_fn(z):
            return self._logits(shrink(z))

        if self.method == "pgd_at":
            z = self._attack(logits_fn, x, y, seed=seed)
        else:
            z = self._trades_adversary(logits_fn, x, tf.stop_gradient(self._logits(x)), seed)
        return tf.stop_gradient(shrink(z))

    def train_step(self, data):
        x, y = data
        y = tf.cast(y, tf.int64)
        seed = fold(tf.constant([self.seed, 17], tf.int64), tf.cast(self.optimizer.iterations, tf.int64))
        x_adv = self.adversary(x, y, tf.cast(self.optimizer.iterations, tf.int64), seed)
        with tf.GradientTape() as tape:
            adv_logits = tf.cast(self.net(x_adv, training=True), tf.float32)  # losses in float32 (mixed precision)
            if self.method == "pgd_at":
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, adv_logits))
            else:
                clean_logits = tf.cast(self.net(x, training=True), tf.float32)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, clean_logits)
                                      + self.trades_beta * _kl_rows(clean_logits, adv_logits))
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.net.trainable_variables)
        self.optimizer.apply(grads, self.net.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.acc_tracker.update_state(y, adv_logits)
        return {m.name: m.result() for m in self.metrics}


def train_baseline(models, split, cfg, method: str, *, seed: int, model_dir: str, checkpoint_every: int,
                   verbose: int, callbacks=()) -> int:
    """Trains `models.<method>` resumably (checkpoints in <model_dir>/<method>/ckpt); returns the resumed step."""
    import os

    from mid_tf.data import steps_per_epoch, train_stream
    from mid_tf.training.resumable import fit_resumable
    from mid_tf.training.stage1 import make_optimizer

    net = getattr(models, method)
    spe = steps_per_epoch(split, cfg.batch_size)
    model = AdversarialTraining(net, method, attack=cfg.attack, trades_beta=cfg.trades_beta, seed=seed,
                                warmup_steps=int(round(cfg.eps_warmup_epochs * spe)), name=f"{method}_trainer")
    model.compile(optimizer=make_optimizer(cfg, cfg.epochs * spe))
    model.optimizer.build(net.trainable_variables)
    tb = keras.callbacks.TensorBoard(os.path.join(model_dir, "logs", method), update_freq="epoch")
    stream = lambda start: train_stream(split, cfg.batch_size, seed=seed + 2, start_batch=start,  # noqa: E731
                                        augment=cfg.augment)
    return fit_resumable(model, stream,
                         epochs=cfg.epochs, steps_per_epoch=spe, ckpt_dir=os.path.join(model_dir, method, "ckpt"),
                         checkpoint_every=checkpoint_every, callbacks=[tb, *callbacks], verbose=verbose)
