"""Helper processes for the eval stage: `--eval_workers=N` crafts the report's attacks in N processes.

The robustness report is a list of independent pieces (one transfer attack, one white-box attack on
one model, one model's checks). The eager-only attacks (CleverHans' CW-L2 and SPSA loops, ART's
AutoAttack, DeepFool, Square) spend much of their time in Python and keep about one core busy, so on
a 2-core CPU a second process crafting other pieces nearly doubles their throughput.

The main process starts N-1 helpers with its own configuration (written to
`<model_dir>/eval/helper-config.json`) and `--stages=eval`. Every process walks the same list of
pieces and claims each before crafting it (evaluation/memo.py); helpers exit when no unclaimed piece
is left, the main process waits for the pieces they hold and writes the report. A helper that dies
leaves its claim to be taken over; the main process stops its helpers when it fails. Helper output
goes to `<model_dir>/eval/helper-<i>.log`.

    python -m mid_tf.evaluation.workers <helper-config.json>     # what a helper runs
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from mid_tf.config import RunConfig

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_helpers(cfg: RunConfig, count: int) -> list[subprocess.Popen]:
    """Starts `count` helper processes evaluating `cfg.model_dir`; returns them."""
    if count <= 0:
        return []
    from mid_tf.artifacts import write_json_atomic

    helper = dataclasses.replace(cfg, stages=("eval",), eval_helper=True, eval_workers=1)
    eval_dir = os.path.join(cfg.model_dir, "eval")
    path = os.path.join(eval_dir, "helper-config.json")
    write_json_atomic(path, helper.to_json())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    procs = []
    for i in range(1, count + 1):
        with open(os.path.join(eval_dir, f"helper-{i}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "mid_tf.evaluation.workers", path],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def stop_helpers(procs: list[subprocess.Popen], timeout: float = 60.0) -> list[int]:
    """Waits up to `timeout` s for helpers that are finishing, then terminates the rest; exit codes."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                codes.append(p.wait(timeout=10))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
    return codes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m mid_tf.evaluation.workers <helper-config.json>", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        cfg = RunConfig.from_json(json.load(f))
    if not cfg.eval_helper:
        print(f"error: {argv[1]} is not a helper configuration (eval_helper is false)", file=sys.stderr)
        return 2
    from mid_tf import stages
    stages.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
