"""Wall time for `train.py` to reach given transfer accuracies, every stage included.

    python benchmarks/time_to_accuracy.py --model_dir runs/tta [--official] -- --flagfile=configs/mnist.flags

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
take at that rate, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def first_reached(records, targets: dict):
    """(epoch, time) of the first record meeting every target in `targets`, or None."""
    for r in records:
        if all(r.get(k, -1.0) >= v for k, v in targets.items()):
            return r
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="fresh directory for the run")
    p.add_argument("--clean", type=float, default=0.986)
    p.add_argument("--fgsm", type=float, default=0.950)
    p.add_argument("--pgd40", type=float, default=0.980)
    p.add_argument("--val_examples", type=int, default=10000)
    p.add_argument("--official", action="store_true", help="also time the official loop and print the ratio")
    a = p.parse_args(ours)
    if os.path.exists(a.model_dir):
        p.error(f"--model_dir {a.model_dir} exists; use a fresh one (completed stages would be skipped)")
    targets = {"val_clean_accuracy": a.clean, "val_fgsm_accuracy": a.fgsm, "val_pgd40_accuracy": a.pgd40}

    official = None
    if a.official:
        from train_step import run_official
        print("official loop (PyTorch harness, 2 threads, batch 256) ...", flush=True)
        official = run_official(256)

    cmd = [sys.executable, "train.py", *train_flags, f"--model_dir={a.model_dir}",
           f"--val_examples={a.val_examples}", "--val_attacks=fgsm,pgd40", "--verbose=2"]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    wall = time.time() - t0
    if rc:
        print(f"train.py failed with status {rc}")
        return rc

    path = os.path.join(a.model_dir, "logs", "mid", "validation.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    summary = json.load(open(os.path.join(a.model_dir, "summary.json")))
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
    sys.exit(main())
