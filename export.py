"""Exports a trained run for TF Serving: `python export.py --model_dir=runs/mnist` (mid_tf/cli/export.py)."""

from mid_tf.cli.export import main, run  # noqa: F401

if __name__ == "__main__":
    run()
