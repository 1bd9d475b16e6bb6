"""The parallel scheduler of the eval stage: pieces claimed and crafted by whichever process gets them first.

The robustness report is a list of independent pieces (one transfer attack, one white-box attack on
one model, one model's checks; evaluation/pieces.py). Every process walks the same list: a piece in
the memo (evaluation/memo.py) is applied as it is; otherwise the process claims it, crafts it and
stores it; a piece another live process holds is awaited, and taken over if its holder dies.

`--eval_workers=N` starts N-1 helper processes with the main process's configuration (written to
`<model_dir>/eval/helper-config.json`, `stages=("eval",)`, `eval_helper=True`) through the entry point
`python -m mid_tf.cli.eval_helper --config=<that file>`. The eager-only attacks (CleverHans' CW-L2 and
SPSA loops, ART's AutoAttack, DeepFool, Square) spend much of their time in Python and keep about one
core busy, so a second process crafting other pieces puts another core to work. Helpers exit when no
unclaimed piece is left; the main process waits for the pieces they hold and writes the report, and
stops its helpers when it fails. Helper output goes to `<model_dir>/eval/helper-<i>.log`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import Any, Callable

from mid_tf.config import RunConfig
from mid_tf.evaluation.memo import ReportMemo

HELPER_ENTRY_POINT = "mid_tf.cli.eval_helper"
# The checkout holding the mid_tf package: a helper imports the same code even when it is not installed.


@dataclasses.dataclass(frozen=True)
class Piece:
    """One independent part of the report: `compute()` crafts it (a JSON-able value, memoized under
    `key`; None: never memoized), `apply(value)` puts the value in the report."""
    key: str | None
    label: str
    compute: Callable[[], Any]
    apply: Callable[[Any], None]


def compute_claimed(memo: ReportMemo, piece: Piece):
    """Crafts a piece this worker has claimed, stores it, and always lets the claim go (a crash frees
    the piece for the others at once instead of after the holder is seen dead)."""
    try:
        done = piece.compute()
        memo.put(piece.key, done)
    finally:
        memo.release(piece.key)
    return done


def run_pieces(pieces: list[Piece], memo: ReportMemo, log, poll_s: float, wait: bool = True) -> int:
    """Apply every piece: from the memo, else crafted here if this worker can claim it; pieces that
    another live worker holds are awaited (and taken over if it dies) unless `wait` is False.
    Returns how many pieces are left to other workers (0 when waiting)."""
    pending = []
    for piece in pieces:
        done = memo.get(piece.key)
        if done is not None:
            log(f"{piece.label}: done earlier (memo)")
        elif memo.claim(piece.key):
            log(piece.label)
            done = compute_claimed(memo, piece)
        else:
            done = memo.get(piece.key)  # finished by another worker meanwhile, or still in its hands
        if done is None:
            log(f"{piece.label}: another worker is on it")
            pending.append(piece)
        else:
            piece.apply(done)
    while pending and wait:
        time.sleep(poll_s)
        memo.refresh()
        pending = [p for p in pending if not _settle(p, memo, log)]
    return len(pending)


def _settle(piece: Piece, memo: ReportMemo, log) -> bool:
    """Applies an awaited piece once it is in the memo, or crafts it here when its holder died;
    False while another live worker still holds it."""
    done = memo.get(piece.key)
    if done is None and not memo.holder_alive(piece.key) and memo.claim(piece.key):
        log(f"{piece.label} (its worker stopped)")
        done = compute_claimed(memo, piece)
    if done is None:
        return False
    piece.apply(done)
    return True


def helper_command(config_path: str) -> list[str]:
    """The command line of one helper process (it traces the kernels this process chose)."""
    from mid_tf.kernels import xla
    return [sys.executable, "-m", HELPER_ENTRY_POINT, f"--config={config_path}", f"--xla_kernels={xla.mode()}"]


def start_helpers(cfg: RunConfig, count: int) -> list[subprocess.Popen]:
    """Starts `count` helper processes evaluating `cfg.model_dir`; returns them."""
    if count <= 0:
        return []
    from mid_tf.artifacts import write_json_atomic

    helper = dataclasses.replace(cfg, stages=("eval",), eval_helper=True, eval_workers=1)
    eval_dir = os.path.join(cfg.model_dir, "eval")
    path = os.path.join(eval_dir, "helper-config.json")
    write_json_atomic(path, helper.to_json())
    procs = []  # started through the package's entry point: mid_tf is importable (installed, or run from its checkout)
    for i in range(1, count + 1):
        with open(os.path.join(eval_dir, f"helper-{i}.log"), "w") as log:
            procs.append(subprocess.Popen(helper_command(path), stdout=log, stderr=subprocess.STDOUT))
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
