"""`fit` that survives being killed: step checkpoints and an exact resume point.

Keras' `BackupAndRestore` resumes at an epoch boundary and replays the data from the epoch start.
Here the global step is the optimizer's `iterations`, saved with the model and optimizer every
`checkpoint_every` steps (tf.train.CheckpointManager writes data files first and swaps the index
file atomically, so a kill mid-save leaves the previous checkpoint intact). On restart we restore,
ask `make_stream(start_batch)` for the data from the batch where we stopped (the pipeline's order
is a function of the seed), and finish the interrupted epoch before the remaining ones.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf


class _StepCheckpoint(keras.callbacks.Callback):
    def __init__(self, manager: tf.train.CheckpointManager, step: tf.Variable, every: int):
        super().__init__()
        self._manager, self._step, self._every = manager, step, every

    def on_train_batch_end(self, batch, logs=None):
        step = int(self._step.numpy())
        if step % self._every == 0:
            self._manager.save(checkpoint_number=step)

    def on_epoch_end(self, epoch, logs=None):
        self._manager.save(checkpoint_number=int(self._step.numpy()))


def fit_resumable(model: keras.Model, make_stream, *, epochs: int, steps_per_epoch: int, ckpt_dir: str,
                  checkpoint_every: int = 200, callbacks=(), verbose: int = 1, extra_trackables=None) -> int:
    """Trains `model` (compiled, optimizer built) for `epochs * steps_per_epoch` steps in total.

    Returns the step it resumed from (0 for a fresh start). `make_stream(start_batch)` must return
    the infinite batch stream beginning at global batch `start_batch`.
    """
    step = model.optimizer.iterations
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, **(extra_trackables or {}))
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(step.numpy())
    total = epochs * steps_per_epoch
    saver = _StepCheckpoint(manager, step, checkpoint_every)
    callbacks = [saver, *callbacks]
    done = start
    while done < total:
        epoch, offset = divmod(done, steps_per_epoch)
        # An interrupted epoch is finished on its own (its remaining steps), then the rest run whole.
        if offset:
            model.fit(make_stream(done), initial_epoch=epoch, epochs=epoch + 1,
                      steps_per_epoch=steps_per_epoch - offset, callbacks=callbacks, verbose=verbose)
        else:
            model.fit(make_stream(done), initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch,
                      callbacks=callbacks, verbose=verbose)
        new_done = int(step.numpy())
        if new_done <= done:
            raise RuntimeError("training made no progress (did the model's train_step skip the optimizer?)")
        done = new_done
    return start


def latest_step(ckpt_dir: str) -> int | None:
    latest = tf.train.latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    return int(latest.rsplit("-", 1)[-1]) if latest else None
