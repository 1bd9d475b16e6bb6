"""Wall time for `train.py` to reach given transfer accuracies, every stage included.

    python benchmarks/time_to_accuracy.py --model_dir=runs/tta [--official] [--xla_kernels=auto]
        -- --flagfile=configs/mnist.flags

Runs `train.py` with the flags after `--` in a fresh `--model_dir` (refused if it exists: completed
stages would be skipped and the time would not be comparable), with per-epoch MID validation on the
whole test set (`--val_examples=10000 --val_attacks=fgsm,pgd40`: the attacks are crafted once on the
target, as the eval stage's transfer rows, so each epoch only classifies). Reads the epochs' lines of
`<model_dir>/logs/mid/validation.jsonl` and prints, for each target (default: the official MID
checkpoint's transfer numbers, clean 98.6%, FGSM 95.0%, PGD-40 98.0%), the first epoch that reached
it and the wall time since launch, then the first epoch that reached all of them. The stage times come
from `<model_dir>/summary.json`.

With `--official` it first times the official PyTorch loop on this machine
(../shared/tools/official_mid_timing, see train_step.py) and prints what its 120 epochs x 235 steps
take at that rate, and the ratio. `--xla_kernels`, when given, is passed on to train.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import FLAGS, REPO, define_xla_kernels_flag, fail, parse_flags, run_official  # noqa: E402

flags.DEFINE_string("model_dir", None, "Fresh directory for the run.")
flags.mark_flag_as_required("model_dir")
flags.DEFINE_float("clean", 0.986, "Target clean accuracy.")
flags.DEFINE_float("fgsm", 0.950, "Target transfer FGSM accuracy.")
flags.DEFINE_float("pgd40", 0.980, "Target transfer PGD-40 accuracy.")
flags.DEFINE_integer("val_examples", 10000, "Test images of the per-epoch validation.", lower_bound=1)
flags.DEFINE_bool("official", False, "Also time the official loop and print the ratio.")
define_xla_kernels_flag()


def first_reached(records, targets: dict):
    """(epoch, time) of the first record meeting every target in `targets`, or None."""
    for r in records:
        if all(r.get(k, -1.0) >= v for k, v in targets.items()):
            return r
    return None


def main(argv) -> int:
    train_flags = argv[1:]  # everything after `--`: train.py's flags
    if os.path.exists(FLAGS.model_dir):
        return fail(f"--model_dir {FLAGS.model_dir} exists; use a fresh one (completed stages would be skipped)")
    targets = {"val_clean_accuracy": FLAGS.clean, "val_fgsm_accuracy": FLAGS.fgsm, "val_pgd40_accuracy": FLAGS.pgd40}

    official = None
    if FLAGS.official:
        print("official loop (PyTorch harness, 2 threads, batch 256) ...", flush=True)
        official = run_official(256)

    cmd = [sys.executable, "train.py", *train_flags, f"--model_dir={FLAGS.model_dir}",
           f"--val_examples={FLAGS.val_examples}", "--val_attacks=fgsm,pgd40", "--verbose=2"]
    if FLAGS["xla_kernels"].present:
        cmd.append(f"--xla_kernels={FLAGS.xla_kernels}")
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    wall = time.time() - t0
    if rc:
        print(f"train.py failed with status {rc}")
        return rc
    return report(FLAGS.model_dir, targets, t0, wall, official)


def report(model_dir: str, targets: dict, t0: float, wall: float, official: dict | None) -> int:
    """Prints the epochs, the first epoch reaching each target and all of them; 0 if all were reached."""
    path = os.path.join(model_dir, "logs", "mid", "validation.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    stages = {k: v.get("train_time_s") for k, v in summary.get("stages", {}).items() if isinstance(v, dict)}
    print(f"\nwhole run: {wall / 60:.1f} min; stage train times (min): "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items() if v))
    print(f"{'epoch':>5s} {'min':>6s} " + " ".join(f"{k[4:-9]:>7s}" for k in targets))
    for r in records:
        print(f"{r['epoch']:5d} {(r['time'] - t0) / 60:6.1f} " + " ".join(f"{r.get(k, 0):7.2%}" for k in targets))
    for k, v in targets.items():
        hit = first_reached(records, {k: v})
        print(f"{k[4:-9]:>6s} >= {v:.1%}: " + (f"epoch {hit['epoch']}, {(hit['time'] - t0) / 60:.1f} min"
                                                 if hit else "not reached"))
    hit = first_reached(records, targets)
    minutes = (hit["time"] - t0) / 60 if hit else None
    print("all targets: " + (f"epoch {hit['epoch']}, {minutes:.1f} min after launch, every stage included "
                             f"(on {hit['examples']} test images)" if hit else "not reached"))
    if official and minutes:
        official_min = official["median_total_s"] * 120 * 235 / 60
        print(f"official loop: {official['median_total_s']:.2f} s/iter here -> 120 epochs x 235 steps = "
              f"{official_min / 60:.1f} h (MID stage only); ratio {official_min / minutes:.0f}x")
    return 0 if hit else 1


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
