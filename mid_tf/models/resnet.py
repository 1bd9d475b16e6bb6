"""ResNet-style family for 32x32x3 inputs (CIFAR-10, SVHN), after the official `models/ResNet.py`.

  encoder     conv3x3-64-BN-ReLU stem, 4 stages of one basic block each (64/128/256/512 channels,
              strides 1/2/2/2; the official `make_layer` loop builds one block per stage)
              -> {features 4x4x512, indices: []}
  decoder     convT k4 s2 (256, 128, 64) -> convT k3 64 -> convT k3 3, linear output
  classifier  global average pool (the official AvgPool 4 on 4x4) -> fc10
No pooling indices: the decoder upsamples with strided transposed convolutions, so the encoder's
`indices` list is empty and the decoder takes `[features]`. `width` scales all channels.
BatchNormalization comes from `exact_batch_normalization` (mid_tf/compat/batchnorm.py): Keras' own layer with batch moments
whose second derivatives are exact, which MID's second-order meta-gradient needs.
"""

from __future__ import annotations

import keras

from mid_tf.compat.batchnorm import exact_batch_normalization


def _ch(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = exact_batch_normalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = exact_batch_normalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = exact_batch_normalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _trunk(x, width):
    h = keras.layers.Conv2D(_ch(64, width), 3, padding="same", use_bias=False, name="stem_conv")(x)
    h = exact_batch_normalization(name="stem_bn")(h)
    h = keras.layers.ReLU(name="stem_relu")(h)
    for i, (base, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        h = _block(h, _ch(base, width), stride, name=f"stage{i + 1}")
    return h


def build_encoder(input_shape=(32, 32, 3), width=1.0, name="encoder") -> keras.Model:
    x = keras.Input(input_shape, name="image")
    return keras.Model(x, {"features": _trunk(x, width), "indices": []}, name=name)


def build_target(input_shape=(32, 32, 3), num_classes=10, width=1.0, name="target") -> keras.Model:
    x = keras.Input(input_shape, name="image")
    h = keras.layers.GlobalAveragePooling2D(name="avgpool")(_trunk(x, width))
    return keras.Model(x, keras.layers.Dense(num_classes, name="logits")(h), name=name)


def build_decoder(input_shape=(32, 32, 3), width=1.0, name="decoder") -> keras.Model:
    h, w, c = input_shape
    f = keras.Input((h // 8, w // 8, _ch(512, width)), name="features")
    y = f
    for i, base in enumerate((256, 128, 64)):
        y = keras.layers.Conv2DTranspose(_ch(base, width), 4, strides=2, padding="same", activation="relu",
                                         name=f"up{i + 1}")(y)
    y = keras.layers.Conv2DTranspose(_ch(64, width), 3, padding="same", activation="relu", name="refine")(y)
    y = keras.layers.Conv2DTranspose(c, 3, padding="same", name="to_image")(y)
    return keras.Model([f], y, name=name)


def build_classifier(input_shape=(32, 32, 3), num_classes=10, width=1.0, name="classifier") -> keras.Model:
    h, w, _ = input_shape
    f = keras.Input((h // 8, w // 8, _ch(512, width)), name="features")
    y = keras.layers.GlobalAveragePooling2D(name="avgpool")(f)
    return keras.Model(f, keras.layers.Dense(num_classes, name="logits")(y), name=name)
