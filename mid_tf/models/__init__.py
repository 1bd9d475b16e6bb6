"""Keras 3 models: target, teacher (encoder/decoder/classifier), student, composed pipelines."""

from mid_tf.models.factory import (MIDModels, build_autoencoder, build_models, build_pipeline,
                                   build_regenerator, copy_teacher_parts, decode, encode, family_for)

__all__ = ["MIDModels", "build_autoencoder", "build_models", "build_pipeline", "build_regenerator", "copy_teacher_parts", "decode",
           "encode", "family_for"]
