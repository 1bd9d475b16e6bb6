"""Equal training time for a reference row: a MID step and a baseline step, timed in one run on one CPU.

    python benchmarks/time_match.py --flagfile=configs/mnist_whitebox.flags \
        --flagfile=configs/mnist_whitebox_trades.flags --data_dir=../shared/data/mnist \
        [--baseline=trades] [--timed_steps=20] [--untimed_steps=3]

Builds the run configuration the flagfiles give (train.py's flags), then runs each stage's own training code
(training/mid_stage.py `train_mid`, training/baselines.py `train_baseline`) for `--untimed_steps` steps (tracing,
first batches) and `--timed_steps` timed ones, on the first images of the training split, on networks built as
stages.py builds them (random init, each stage's precision: `auto` resolved for this CPU). It prints the CPU, ms per
step of each, the epoch each makes of the whole training split, MID's `--mid_epochs` in minutes at that rate and the
`--baseline_epochs` that take the same time: the epochs of a time-matched reference row on this CPU. Only the
training steps count: per-epoch work (MID's validation attacks, checkpoints) is left out of both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fail, parse_flags  # noqa: E402
from mid_tf.cli.train import FLAGS, build_config  # noqa: E402  (train.py's flags: the flagfiles read as train.py does)

flags.DEFINE_enum("baseline", "trades", ["trades", "pgd_at"], "The baseline timed against MID.")
flags.DEFINE_integer("timed_steps", 20, "Timed optimizer steps of each stage.", lower_bound=1)
flags.DEFINE_integer("untimed_steps", 3, "Steps run first and not timed (tracing).", lower_bound=1)


def cpu_line() -> str:
    """'<model name>, family F model M, AVX512_BF16 yes|no' from /proc/cpuinfo (what decides `auto` precision)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    from mid_tf.hardware import cpu_flags
    bf16 = "avx512_bf16" in cpu_flags()
    return (f"{info.get('model name', 'unknown')}, family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
            f"AVX512_BF16 {'yes' if bf16 else 'no'}, {os.cpu_count()} cores")


class StepClock:
    """Keras callback: the wall time at the end of every training batch."""

    def __init__(self):
        import keras

        class _Clock(keras.callbacks.Callback):
            def on_train_batch_end(cb, batch, logs=None):  # noqa: N805
                self.ends.append(time.perf_counter())
        self.ends, self.callback = [], _Clock()

    def seconds_per_step(self, untimed: int) -> float:
        timed = self.ends[untimed - 1:]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def time_stage(cfg, stage: str, models, split, model_dir: str, steps: int) -> float:
    """Seconds per step of `stage` ('mid' or a baseline) over its last `FLAGS.timed_steps` of `steps`."""
    from mid_tf.data import Split
    from mid_tf.training import baselines, mid_stage, precision

    section = cfg.mid if stage == "mid" else cfg.baseline
    part = Split(split.images[:steps * section.batch_size], split.labels[:steps * section.batch_size],
                 split.source, split.class_names)
    twin = precision.mixed_twin(models, cfg.data.dataset, cfg.width, section.precision)
    clock = StepClock()
    common = dict(seed=cfg.seed, model_dir=model_dir, checkpoint_every=10**9, verbose=0, callbacks=[clock.callback])
    if stage == "mid":
        mid_stage.train_mid(twin, part, dataclasses.replace(cfg.mid, epochs=1, steps_per_epoch=None), **common)
    else:
        baselines.train_baseline(twin, part, dataclasses.replace(cfg.baseline, epochs=1), stage, **common)
    return clock.seconds_per_step(FLAGS.untimed_steps)


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint saver logs every save at INFO
    from mid_tf.config import ConfigError
    from mid_tf.data import DataError, load_split, steps_per_epoch

    with tempfile.TemporaryDirectory(prefix="time_match-") as model_dir:
        try:
            cfg = dataclasses.replace(build_config(), model_dir=model_dir, verbose=0).validate()
            d = cfg.data
            split = load_split(d.dataset, "train", d.data_dir, download=d.download, limit=d.train_examples)
        except (ConfigError, DataError, ValueError) as e:
            return fail(e)
        steps = FLAGS.untimed_steps + FLAGS.timed_steps
        if len(split) < steps * max(cfg.mid.batch_size, cfg.baseline.batch_size):
            return fail(f"the training split has {len(split)} images, fewer than --untimed_steps + --timed_steps = "
                        f"{steps} batches of {max(cfg.mid.batch_size, cfg.baseline.batch_size)}: lower them")
        import keras

        from mid_tf.kernels import xla
        from mid_tf.models import build_models
        xla.configure(FLAGS.xla_kernels)
        keras.utils.set_random_seed(cfg.seed)
        models = build_models(d.dataset, width=cfg.width, input_shape=split.images.shape[1:],
                              num_classes=len(split.class_names or ()) or None, decoder_unpool=cfg.decoder_unpool)
        mid_s = time_stage(cfg, "mid", models, split, model_dir, steps)
        base_s = time_stage(cfg, FLAGS.baseline, models, split, model_dir, steps)
    mid_spe, base_spe = steps_per_epoch(split, cfg.mid.batch_size), steps_per_epoch(split, cfg.baseline.batch_size)
    mid_total = mid_s * mid_spe * cfg.mid.epochs
    base_epoch = base_s * base_spe
    print(f"cpu: {cpu_line()}; {xla.describe()}")
    print(f"mid     {mid_s * 1e3:8.1f} ms/step  batch {cfg.mid.batch_size}, {mid_spe} steps/epoch = {mid_s * mid_spe:6.1f} s "
          f"an epoch, {cfg.mid.precision}; pool {cfg.mid.pool}")
    print(f"{FLAGS.baseline:7s} {base_s * 1e3:8.1f} ms/step  batch {cfg.baseline.batch_size}, {base_spe} steps/epoch = "
          f"{base_epoch:6.1f} s an epoch, {cfg.baseline.precision}; attack {cfg.baseline.attack}")
    print(f"ratio {FLAGS.baseline}/mid per step: {base_s / mid_s:.3f}; {FLAGS.timed_steps} timed steps each after "
          f"{FLAGS.untimed_steps} untimed")
    print(f"mid's {cfg.mid.epochs} epochs: {mid_total / 60:.1f} min of steps; the same time: "
          f"--baseline_epochs={max(1, round(mid_total / base_epoch))} ({mid_total / base_epoch:.2f} epochs of "
          f"{FLAGS.baseline}; the flags give {cfg.baseline.epochs})")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
