"""Stage regen: the regeneration decoder D_s, fitted to the trained student (issue 28, Deliver 3).

The paper regenerates with the frozen teacher decoder, D_t(E_s(x~)). Once E_s is trained white-box that
image stays far from x (11-12 dB PSNR on the headline runs; 18-19 dB with the pixel consistency in MID's own
loss, at a cost in robustness: docs/results/mnist_whitebox/levers.md): D_t was fitted to E_t's features,
and E_s's differ from them in ways the feature terms do not see. This stage leaves E_s and C_s exactly as
MID trained them (the deployed classifier is the same model, bit for bit) and fits a copy D_s of D_t to them:

  min_{D_s}  mean | D_s(E_s(x)) - x |  +  mean | D_s(E_s(x~)) - x |,   x~ = attack(C_s(E_s(.)), x, y)

x~ is crafted on the deployed pipeline itself every step (`regen.attack`, default PGD-10 at the dataset's
eps): the inputs an attacker would send. D_s starts as D_t and decodes with the student's pooling switches,
as D_t(E_s(.)) does. The deployed regeneration (the export's `regenerate` signature, the eval stage's
regeneration rows) is D_s(E_s(x)); it is D_t(E_s(x)) in a run without this stage.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from mid_tf.attacks import get_spec, make_attack
from mid_tf.attacks.seeds import fold
from mid_tf.config import RegenConfig
from mid_tf.models import MIDModels, decode, encode
from mid_tf.training.losses import pixel_l1


class RegenerationTraining(keras.Model):
    """Fits `decoder` (D_s) to the frozen `encoder` (E_s) on clean and attacked images; `call` regenerates."""

    def __init__(self, encoder: keras.Model, classifier: keras.Model, decoder: keras.Model, attack: str = "pgd10",
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        spec = get_spec(attack)
        if not spec.graph_safe:
            raise ValueError(f"--regen_attack must be a graph-safe registry attack (it runs in the train step), "
                             f"got {attack!r}")
        self.encoder, self.classifier, self.decoder, self.seed = encoder, classifier, decoder, seed
        self._attack = make_attack(spec)
        self.loss_tracker = keras.metrics.Mean(name="l1")
        self.adv_tracker = keras.metrics.Mean(name="adv_l1")

    def call(self, x, training=False):
        features, indices = encode(self.encoder, x)
        return decode(self.decoder, features, indices, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.adv_tracker]

    def _logits(self, x):
        return self.classifier(self.encoder(x, training=False)["features"], training=False)

    def train_step(self, data):
        x, y = data[0], data[1]
        step = tf.cast(self.optimizer.iterations, tf.int64)
        x_adv = tf.stop_gradient(self._attack(self._logits, x, tf.cast(y, tf.int64),
                                              seed=fold(tf.constant([self.seed, 29], tf.int64), step)))
        features, indices = encode(self.encoder, tf.concat([x, x_adv], axis=0))  # E_s stays as MID left it
        features, indices = tf.stop_gradient(features), [tf.stop_gradient(i) for i in indices]
        n = tf.shape(x)[0]
        with tf.GradientTape() as tape:
            regenerated = decode(self.decoder, features, indices, training=True)
            clean_l1, adv_l1 = pixel_l1(regenerated[:n], x), pixel_l1(regenerated[n:], x)
            loss = clean_l1 + adv_l1
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.decoder.trainable_variables)
        self.optimizer.apply(grads, self.decoder.trainable_variables)
        self.loss_tracker.update_state(clean_l1)
        self.adv_tracker.update_state(adv_l1)
        return {m.name: m.result() for m in self.metrics}


def train_regenerator(models: MIDModels, split, cfg: RegenConfig, *, seed: int, model_dir: str,
                      checkpoint_every: int, verbose: int, callbacks=()) -> int:
    """Trains `models.student_decoder` resumably (checkpoints in <model_dir>/regen/ckpt); returns the resumed step."""
    from mid_tf.data import steps_per_epoch, train_stream
    from mid_tf.training.resumable import fit_resumable
    from mid_tf.training.stage1 import make_optimizer

    models.student_decoder.trainable = True
    spe = steps_per_epoch(split, cfg.batch_size)
    model = RegenerationTraining(models.student_encoder, models.student_classifier, models.student_decoder,
                                 attack=cfg.attack, seed=seed, name="regen_trainer")
    model.compile(optimizer=make_optimizer(cfg, cfg.epochs * spe))
    model.optimizer.build(models.student_decoder.trainable_variables)
    tb = keras.callbacks.TensorBoard(os.path.join(model_dir, "logs", "regen"), update_freq="epoch")
    stream = lambda start: train_stream(split, cfg.batch_size, seed=seed + 3, start_batch=start)  # noqa: E731
    return fit_resumable(model, stream, epochs=cfg.epochs, steps_per_epoch=spe,
                         ckpt_dir=os.path.join(model_dir, "regen", "ckpt"), checkpoint_every=checkpoint_every,
                         callbacks=[tb, *callbacks], verbose=verbose)
