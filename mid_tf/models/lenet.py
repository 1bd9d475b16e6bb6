"""LeNet-5 family for 28x28x1 inputs, matching the official MID MNIST code (`models/LeNet.py`).

  target      conv32-relu-pool, conv64-relu-pool, fc200-relu, fc10           (x -> logits)
  encoder     the same conv trunk, pools return indices         (x -> {features 7x7x64, indices})
  decoder     unpool(idx2) -> convT 64->32 -> relu -> unpool(idx1) -> convT 32->1, linear output
              (unpool="nearest": upsampling instead of unpooling, the switches ignored)
  classifier  flatten 3136 -> fc200-relu -> fc10                          (features -> logits)
The teacher is encoder + decoder + classifier; the MID student encoder has the encoder's
architecture. `width` scales the conv channels (1 = official; tests use small widths).
The 1-channel convolutions (first conv, last transposed conv) are `kernels.fast_conv` layers: the same
maths and weights as Keras' layers, with a faster gradient on CPU. The encoder keeps relu before its
pooling: its switches must mark the post-relu maxima the decoder unpools to (the target pools first).
"""

from __future__ import annotations

import keras

from mid_tf.kernels import fast_conv
from mid_tf.models.pooling import MaxPooling2D, MaxPoolWithIndices, MaxUnpool


def _channels(width: float) -> tuple[int, int]:
    return max(1, int(round(32 * width))), max(1, int(round(64 * width)))


def build_target(input_shape=(28, 28, 1), num_classes=10, width=1.0, name="target") -> keras.Model:
    c1, c2 = _channels(width)
    x = keras.Input(input_shape, name="image")
    # relu(maxpool(z)) == maxpool(relu(z)) (relu is monotone), values and gradients: pooling first runs
    # the relu and its gradient on a 4x smaller tensor (the attack loop's hot path; same checkpoints).
    h = fast_conv.Conv2D(c1, 3, padding="same", name="conv1")(x)
    h = MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(c2, 3, padding="same", name="conv2")(h)
    h = MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(200, activation="relu", name="fc1")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(x, logits, name=name)


def build_encoder(input_shape=(28, 28, 1), width=1.0, name="encoder") -> keras.Model:
    c1, c2 = _channels(width)
    x = keras.Input(input_shape, name="image")
    h = fast_conv.Conv2D(c1, 3, padding="same", activation="relu", name="conv1")(x)
    h, idx1 = MaxPoolWithIndices(name="pool1")(h)
    h = keras.layers.Conv2D(c2, 3, padding="same", activation="relu", name="conv2")(h)
    h, idx2 = MaxPoolWithIndices(name="pool2")(h)
    return keras.Model(x, {"features": h, "indices": [idx1, idx2]}, name=name)


def build_decoder(input_shape=(28, 28, 1), width=1.0, name="decoder", unpool="switches") -> keras.Model:
    """`unpool`: "switches" (the official max-unpooling to the encoder's maxima) or "nearest" (upsampling that
    ignores the switches; the inputs stay, so every caller passes the same three)."""
    c1, c2 = _channels(width)
    h, w, c = input_shape
    f = keras.Input((h // 4, w // 4, c2), name="features")
    idx1 = keras.Input((h, w, c1), name="indices1")  # pool-1 switches (see pooling.py)
    idx2 = keras.Input((h // 2, w // 2, c2), name="indices2")  # pool-2 switches
    use = {"switches": True, "nearest": False}[unpool]
    y = MaxUnpool(use, name="unpool2")(f, idx2)
    y = keras.layers.Conv2DTranspose(c1, 3, padding="same", activation="relu", name="deconv2")(y)
    y = MaxUnpool(use, name="unpool1")(y, idx1)
    y = fast_conv.Conv2DTranspose(c, 3, padding="same", name="deconv1")(y)
    return keras.Model([f, idx1, idx2], y, name=name)


def build_classifier(input_shape=(28, 28, 1), num_classes=10, width=1.0, name="classifier") -> keras.Model:
    _, c2 = _channels(width)
    h, w, _ = input_shape
    f = keras.Input((h // 4, w // 4, c2), name="features")
    y = keras.layers.Flatten(name="flatten")(f)
    y = keras.layers.Dense(200, activation="relu", name="fc1")(y)
    logits = keras.layers.Dense(num_classes, name="logits")(y)
    return keras.Model(f, logits, name=name)
