"""Stage 2: trains the student encoder with MID (training/meta.py) on top of the frozen stage-1 nets."""

from __future__ import annotations

import os

import keras
import numpy as np

from mid_tf.attacks import make_attack
from mid_tf.attacks.pool import AttackPool
from mid_tf.config import ConfigError, MIDStageConfig
from mid_tf.data import Split, steps_per_epoch, train_stream
from mid_tf.models import MIDModels
from mid_tf.training.attack_cache import AttackCache, crafting_order
from mid_tf.training.callbacks import AttackValidation
from mid_tf.training.meta import MetaInvarianceDefense
from mid_tf.training.resumable import fit_resumable, latest_step


def eps_warmup_steps(cfg: MIDStageConfig, steps_per_epoch: int) -> int:
    """`cfg.eps_warmup_epochs` in optimizer steps (0: no warm-up)."""
    steps = int(round(cfg.eps_warmup_epochs * steps_per_epoch))
    if cfg.eps_warmup_epochs and not steps:
        raise ConfigError("mid.eps_warmup_epochs",
                          "needs the steps per epoch: build_mid(..., steps_per_epoch=N), N > 0")
    return steps


def build_mid(models: MIDModels, cfg: MIDStageConfig, seed: int, steps_per_epoch: int = 0) -> MetaInvarianceDefense:
    """The meta-learner of `cfg`, its pool seeded by `seed` (its eps warm-up counted in `steps_per_epoch`)."""
    pool = AttackPool(cfg.pool, seed=seed, num_meta_train=cfg.num_meta_train,
                      eps_warmup_steps=eps_warmup_steps(cfg, steps_per_epoch))
    return MetaInvarianceDefense(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                                 decoder=models.decoder, classifier=models.classifier, target=models.target,
                                 pool=pool, config=cfg, name="mid",
                                 student_classifier=models.student_classifier if cfg.train_head else None)


def make_optimizer(cfg: MIDStageConfig, total_steps: int) -> keras.optimizers.Optimizer:
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine" and total_steps > 0:
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total_steps,
                                                    alpha=cfg.lr_final_fraction)
    return keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.99)  # official betas (0.9, 0.99)


def train_mid(models: MIDModels, split: Split, cfg: MIDStageConfig, *, seed: int, model_dir: str,
              checkpoint_every: int, verbose: int, val_split: Split | None = None, callbacks=()):
    """Builds the meta-learner, compiles it, and fits resumably. Returns (mid model, resumed-from step)."""
    if cfg.student_init == "teacher":  # same architecture; a resumed run overwrites this from its checkpoint
        models.student_encoder.set_weights(models.teacher_encoder.get_weights())
    spe = steps_per_epoch(split, cfg.batch_size)
    if cfg.steps_per_epoch:
        spe = min(spe, cfg.steps_per_epoch)
    mid = build_mid(models, cfg, seed, spe)
    mid.compile(optimizer=make_optimizer(cfg, cfg.epochs * spe))
    mid.optimizer.build(mid.student_variables)
    cbs = [keras.callbacks.TensorBoard(os.path.join(model_dir, "logs", "mid"), update_freq=cfg.log_every_steps)]
    if val_split is not None and cfg.val_examples:
        n = min(cfg.val_examples, len(val_split))
        x = val_split.images[:n].astype(np.float32) / 255.0
        attacks = {name: make_attack(name) for name in cfg.val_attacks}
        whitebox = {name: make_attack(name) for name in cfg.val_whitebox_attacks}
        cbs.append(AttackValidation(x, val_split.labels[:n], attacks, models.target,
                                    os.path.join(model_dir, "logs", "mid", "validation"), seed=seed,
                                    whitebox_attacks=whitebox))
    ckpt_dir = os.path.join(model_dir, "mid", "ckpt")
    fit = dict(steps_per_epoch=spe, ckpt_dir=ckpt_dir, checkpoint_every=checkpoint_every,
               callbacks=[*cbs, *callbacks], verbose=verbose)
    if not (cfg.attack_cache_epochs and cfg.attack_source == "target"):
        resumed = fit_resumable(mid, lambda start: train_stream(split, cfg.batch_size, seed=seed + 1,
                                                                start_batch=start), epochs=cfg.epochs, **fit)
        return mid, resumed
    # Transfer protocol with the attack cache: one refresh of the cache per `attack_cache_epochs` epochs.
    k = cfg.attack_cache_epochs
    resumed = latest_step(ckpt_dir) or 0
    for refresh in range(resumed // (k * spe), -(-cfg.epochs // k)):
        # Crafted in the order the period's first epoch consumes the examples (attack_cache.py), so that
        # with overlap the meta steps start after the first chunk; the cache is the same either way.
        order = crafting_order(len(split), cfg.batch_size, seed + 1, refresh * k * spe, spe)
        cache = AttackCache(mid.pool, models.target, split, batch_size=max(cfg.batch_size, 256), refresh=refresh,
                            order=order)
        if cfg.attack_cache_overlap:
            if verbose:
                cache.announce(" while training")
            cache.start()
        else:
            cache.fill(progress=bool(verbose))
        fit_resumable(mid, lambda start, c=cache: train_stream(split, cfg.batch_size, seed=seed + 1, start_batch=start,
                                                               extra=c),
                      epochs=min(cfg.epochs, (refresh + 1) * k), **fit)
        cache.join()
        del cache
    return mid, resumed
