"""Stage 1: the undefended target (CE) and the teacher (CE + reconstruction) on clean data; and the
surrogate (CE), the eval stage's transfer source MID never saw, trained the same way as the target.

All are ordinary supervised Keras models, so this is `compile` + a resumable `fit`:
  target     x -> logits                 loss CE                       (official: Adam 1e-3)
  teacher    x -> {logits, reconstruction}  loss CE + w * MSE(D_t(E_t(x)), x)   (official: Adam 1e-4, w = 1)
  surrogate  x -> logits                 loss CE  (a plain CNN, models/surrogate.py; its own seed)
After the stage the networks are frozen (`trainable = False`) for everything that follows.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from mid_tf.config import StageTrainConfig
from mid_tf.data import Split, steps_per_epoch, train_stream
from mid_tf.models import MIDModels, build_autoencoder
from mid_tf.training.resumable import fit_resumable


def make_optimizer(cfg: StageTrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine" and total_steps > 0:
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total_steps)
    return keras.optimizers.Adam(lr)


def _train(model, loss, metrics, split: Split, cfg: StageTrainConfig, *, seed: int, model_dir: str,
           stage: str, checkpoint_every: int, verbose: int, map_fn=None, loss_weights=None, callbacks=()):
    spe = steps_per_epoch(split, cfg.batch_size)
    model.compile(optimizer=make_optimizer(cfg, cfg.epochs * spe), loss=loss, metrics=metrics,
                  loss_weights=loss_weights)
    model.optimizer.build(model.trainable_variables)

    def make_stream(start_batch):
        ds = train_stream(split, cfg.batch_size, seed=seed, start_batch=start_batch, augment=cfg.augment)
        return ds.map(map_fn) if map_fn else ds

    tb = keras.callbacks.TensorBoard(os.path.join(model_dir, "logs", stage), update_freq="epoch")
    return fit_resumable(model, make_stream, epochs=cfg.epochs, steps_per_epoch=spe,
                         ckpt_dir=os.path.join(model_dir, stage, "ckpt"), checkpoint_every=checkpoint_every,
                         callbacks=[tb, *callbacks], verbose=verbose)


def train_target(models: MIDModels, split: Split, cfg: StageTrainConfig, **kw) -> int:
    return _train(models.target, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  ["sparse_categorical_accuracy"], split, cfg, stage="target", **kw)


def train_surrogate(models: MIDModels, split: Split, cfg: StageTrainConfig, **kw) -> int:
    return _train(models.surrogate, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  ["sparse_categorical_accuracy"], split, cfg, stage="surrogate", **kw)


def train_teacher(models: MIDModels, split: Split, cfg: StageTrainConfig, **kw) -> int:
    teacher = build_autoencoder(models.teacher_encoder, models.decoder, models.classifier)
    return _train(
        teacher,
        {"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
         "reconstruction": keras.losses.MeanSquaredError()},
        {"logits": ["sparse_categorical_accuracy"]},
        split, cfg, stage="teacher",
        map_fn=lambda x, y: (x, {"logits": y, "reconstruction": x}),
        loss_weights={"logits": 1.0, "reconstruction": cfg.reconstruction_weight}, **kw)


def freeze(*networks: keras.Model) -> None:
    """Frozen by construction: later stages can neither train nor update statistics of these."""
    for net in networks:
        net.trainable = False
