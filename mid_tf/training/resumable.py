"""`fit` that survives being killed: step checkpoints and an exact resume point.

Keras' `BackupAndRestore` resumes at an epoch boundary and replays the data from the epoch start.
Here the global step is the optimizer's `iterations`, saved with the model and optimizer every
`checkpoint_every` steps (tf.train.CheckpointManager writes data files first and swaps the index
file atomically, so a kill mid-save leaves the previous checkpoint intact). On restart we restore,
ask `make_stream(start_batch)` for the data from the batch where we stopped (the pipeline's order
is a function of the seed), and finish the interrupted epoch before the remaining ones.

The checkpointing callback is also the NaN/Inf guard: a non-finite loss stops training at once, and
a checkpoint is written only when every weight and optimizer slot is finite. Otherwise a diverged run
would rotate the good checkpoints out (the manager keeps two) and resuming could only diverge again.
"""

from __future__ import annotations

import math
import os

import keras
import tensorflow as tf


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or weights; nothing of it was checkpointed.

    The stage runner fills in `stage`, `learning_rate_field` (the config field to lower) and
    `learning_rate` (its value); `describe(flag_for)` also names the field's flag (the apps know flags)."""

    def __init__(self, step: int, what: str, last_checkpoint: str | None):
        self.step, self.what, self.last_checkpoint = step, what, last_checkpoint
        self.stage: str | None = None
        self.learning_rate_field: str | None = None
        self.learning_rate: float | None = None
        super().__init__(self.describe())

    def __str__(self) -> str:
        return self.describe()

    def describe(self, flag_for=lambda field: None) -> str:
        where = f"stage {self.stage}" if self.stage else "training"
        kept = (f"the last checkpoint ({os.path.basename(self.last_checkpoint)}) holds finite weights from before"
                if self.last_checkpoint else "no checkpoint was written")
        field, flag = self.learning_rate_field, flag_for(self.learning_rate_field or "")
        named = ", ".join(x for x in (f"--{flag}" if flag else None, field,
                                      None if self.learning_rate is None else f"now {self.learning_rate:g}") if x)
        retrain = f", then rerun with --retrain={self.stage}" if self.stage else ""
        return (f"{where} diverged at step {self.step}: {self.what}. Stopped; {kept}. Resuming as it is would "
                f"diverge again: lower the learning rate" + (f" ({named})" if named else "") + f"{retrain}.")


def _non_finite_log(logs) -> str | None:
    for name, value in (logs or {}).items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{name} is {value}"
    return None


def _non_finite_variable(variables) -> str | None:
    floats = [v for v in variables if keras.backend.is_float_dtype(v.dtype)]
    if not floats or bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in floats])):
        return None  # one check (one device sync) in the usual case; the culprit is looked up only on failure
    bad = next(v for v in floats if not bool(tf.reduce_all(tf.math.is_finite(v))))
    return f"variable {getattr(bad, 'path', bad.name)} holds NaN/Inf"


class _StepCheckpoint(keras.callbacks.Callback):
    """Saves every `every` steps and at each epoch's end (first among the callbacks), finite states only."""

    def __init__(self, manager: tf.train.CheckpointManager, step: tf.Variable, every: int):
        super().__init__()
        self._manager, self._step, self._every = manager, step, every

    def _fail(self, what: str):
        raise NonFiniteError(int(self._step.numpy()), what, self._manager.latest_checkpoint)

    def _save(self) -> None:
        bad = _non_finite_variable([*self.model.weights, *self.model.optimizer.variables])
        if bad:
            self._fail(bad)
        self._manager.save(checkpoint_number=int(self._step.numpy()))

    def on_train_batch_end(self, batch, logs=None):
        bad = _non_finite_log(logs)
        if bad:
            self._fail(bad)
        if int(self._step.numpy()) % self._every == 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self._save()


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
