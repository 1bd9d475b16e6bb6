"""mid_tf: Meta Invariance Defense (Zhang et al., TPAMI 2024) in TensorFlow / Keras 3.

Rooms (imports run one way, top to bottom in docs/architecture):
  config          frozen dataclasses, validated
  data/           IDX reader, TFDS by name, tf.data pipelines
  models/         target LeNet-5, teacher encoder/decoder/classifier, student, ResNet family
  attacks/        attack functions, registry, Attacker Pool
  training/       stage-1 trainers, the MID meta-learner, resumable fit
  stages.py       target -> teacher -> mid -> eval, resumable
"""

__version__ = "0.1.0"
