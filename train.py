"""Trains mid_tf: `python train.py --flagfile=configs/mnist.flags` (the app lives in mid_tf/cli/train.py)."""

from mid_tf.cli.train import FLAGS, build_config, main, run  # noqa: F401  (tests import build_config from here)

if __name__ == "__main__":
    run()
