"""A helper process of the eval stage (`--eval_workers=N` starts N-1 of these; evaluation/scheduler.py).

    python -m mid_tf.cli.eval_helper --config=<model_dir>/eval/helper-config.json

It runs the eval stage of the run described by the config (written by the main process) and crafts
the pieces of the report no other process has claimed; the main process writes the report.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "helper-config.json written by the eval stage's main process.")
flags.DEFINE_string("xla_kernels", "auto", "Compiled CPU kernels: auto | on | off (the main process passes its own).")
flags.mark_flag_as_required("config")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mid_tf.config import ConfigError, RunConfig

    try:
        with open(FLAGS.config) as f:
            cfg = RunConfig.from_json(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        print(f"error: cannot read the helper configuration {FLAGS.config}: {e}", file=sys.stderr)
        return 2
    if not cfg.eval_helper:
        print(f"error: {FLAGS.config} is not a helper configuration (eval_helper is false)", file=sys.stderr)
        return 2
    from mid_tf import stages
    from mid_tf.kernels import xla
    try:
        xla.configure(FLAGS.xla_kernels)
        stages.run(cfg)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
