"""Simulated kills for resume tests: a callback that raises after N training steps."""

import keras


class Kill(Exception):
    """Stands in for the process being killed mid-training."""


class KillAfter(keras.callbacks.Callback):
    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise Kill()
