"""A plain CNN for any input shape: the surrogate, a transfer source that takes no part in MID's training.

  surrogate   conv3x3-32-relu, conv3x3-32-relu, maxpool, conv3x3-64-relu, conv3x3-64-relu, maxpool,
              fc128-relu, fc<classes>                                              (x -> logits)
The paper crafts its test attacks on the very target whose attacks MID trained on; attacks crafted on a
network of another family (neither LeNet-5 nor the ResNet) and another seed tell whether the robustness
carries over to a source MID never saw (stage `surrogate`, mid_tf/stages.py). `width` scales the conv
channels, as in the other families.

Its initial weights come from `seed` alone (each layer's initializer is seeded from it), never from the
global random stream: building it leaves the initial weights of every network built after it, and every
later draw, as they were without it.
"""

from __future__ import annotations

import keras

from mid_tf.models.pooling import MaxPooling2D


def _channels(width: float) -> tuple[int, int]:
    return max(1, int(round(32 * width))), max(1, int(round(64 * width)))


def build_surrogate(input_shape=(28, 28, 1), num_classes=10, width=1.0, seed: int = 0,
                    name="surrogate") -> keras.Model:
    """The plain CNN above; sides of any size >= 4 (two 2x2 poolings)."""
    c1, c2 = _channels(width)
    layer_seeds = iter(range(seed * 8, seed * 8 + 8))  # distinct per layer and per seed (6 seeded layers)

    def init():
        return keras.initializers.GlorotUniform(seed=next(layer_seeds))

    x = keras.Input(tuple(input_shape), name="image")
    h = x
    for i, (filters, pool) in enumerate(((c1, False), (c1, True), (c2, False), (c2, True))):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer=init(),
                                name=f"conv{i + 1}")(h)
        if pool:
            h = MaxPooling2D(2, name=f"pool{(i + 1) // 2}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(128, activation="relu", kernel_initializer=init(), name="fc1")(h)
    logits = keras.layers.Dense(num_classes, kernel_initializer=init(), name="logits")(h)
    return keras.Model(x, logits, name=name)
