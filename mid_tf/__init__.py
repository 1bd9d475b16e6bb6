"""mid_tf: Meta Invariance Defense (Zhang et al., TPAMI 2024) in TensorFlow / Keras 3.

Rooms, top to bottom (a room imports only its own layer or those below it; tests/test_layers.py checks):
  cli/            the apps: train, export, eval helper (the only modules that read flags)
  stages.py       target -> teacher -> mid -> eval, each resumable, one runner
  training/ evaluation/ export/ serving/
                  stage-1 trainers and the MID meta step; the robustness report; SavedModel; client
  artifacts.py    the layout of --model_dir
  attacks/ models/ config.py
                  attack functions, registry and Attacker Pool; the networks; run configuration
  data/           IDX reader, TFDS by name, tf.data pipelines
  kernels/ compat/ hardware.py
                  CPU performance kernels; patches of third-party packages; CPU facts
The method and its map to the code: docs/method.md.
"""

__version__ = "0.1.0"
