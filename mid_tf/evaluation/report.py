"""The robustness report: every model, every attack, two threat models, known vs unknown, sanity flags.

    report, grids = build_report(ReportInput(models, x, y, attacks=[...], pool=[...], ...))
    write_report(report, out_dir, grids)   # evaluation/writers.py: report.json, report.md, PNG figures

Threat models (side by side for every model):
  transfer   adversarials crafted once on the undefended target, classified by every model (the paper's
             protocol); for the target itself transfer == white-box
  transfer_unseen  (with an unseen source) the same attacks crafted once on a network that took no part
             in MID's training (the surrogate: another architecture, another seed), classified by every
             model; `unseen_source` names it and holds its own accuracy on them
  whitebox   adversarials crafted end to end on the model that classifies them
Per threat model and model: the accuracy per attack, the mean over the attacks *known* to the MID
training pool, the mean over the *unknown* ones and the worst case (evaluation/sanity.py).
Regeneration: PSNR and SSIM (tf.image, max_val 1) of D_t(E_s(x~)) against x, per transfer attack.

Where the parts live: the input (evaluation/inputs.py), the pieces the report is made of
(evaluation/pieces.py), how several processes share them (evaluation/scheduler.py), the sanity flags
(evaluation/sanity.py), the schema and the outputs (evaluation/writers.py).
"""

from __future__ import annotations

import datetime
import platform

import tensorflow as tf

from mid_tf.attacks import registry
from mid_tf.evaluation.inputs import ReportInput
from mid_tf.evaluation.memo import ReportMemo
from mid_tf.evaluation.pieces import Workbench, open_workbench, plan, regeneration_quality
from mid_tf.evaluation.robustness import accuracy
from mid_tf.evaluation.sanity import base_name, sanity_flags, summarise
from mid_tf.evaluation.scheduler import run_pieces
from mid_tf.evaluation.writers import SCHEMA, threats_of

__all__ = ["ReportInput", "build_report"]


def build_report(spec: ReportInput, *, memo: ReportMemo | None = None, progress: bool = True, log=print,
                 poll_s: float = 10.0, wait: bool = True) -> tuple[dict | None, dict]:
    """(report, grids) of `spec` (grids: transfer attack -> [clean, adversarial, regenerated] images).

    `memo`: finished pieces on disk (evaluation/memo.py), so that a killed evaluation resumes where it
    stopped, and several processes started with the same memo share the work (`poll_s`: how often a
    worker that has finished its own pieces looks for the others'). With `wait=False` (a helper
    process) it returns (None, grids) as soon as every piece is done or held by another worker."""
    bench = open_workbench(spec, progress)
    bench.report.update(_skeleton(bench))
    left = run_pieces(plan(bench), memo or ReportMemo(None), log if progress else _quiet, poll_s, wait)
    if left:
        log(f"{left} piece(s) left to the other workers")
        return None, bench.grids
    return _finish(bench), bench.grids


def _quiet(*_) -> None:
    pass


def _versions() -> dict:
    import keras
    out = {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}
    for mod, key in (("cleverhans", "cleverhans"), ("art", "art")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informative only
            out[key] = "unknown"
    return out


def _skeleton(bench: Workbench) -> dict:
    """The report before its pieces: what it is about, the clean accuracies, the clean regeneration."""
    s, x, y = bench.spec, bench.x, bench.y
    report = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dataset": s.dataset, "examples": int(len(x)), "seed": int(s.seed), "versions": _versions(),
              "config": s.config or {}, "models": list(bench.fns), "pool": [base_name(p) for p in s.pool],
              "attacks": {}, "clean": {m: accuracy(f, x, y) for m, f in bench.fns.items()}, "transfer": {},
              "whitebox": {}, "regeneration": {}, "eps_sweep": {}, "zero_gradient_fraction": {},
              "threat_model": registry.active_threat_model().describe()}
    if bench.regen_fn is not None:
        report["regenerator"] = s.regenerator_label
        report["regeneration"]["clean"] = regeneration_quality(bench.regen_fn, x, x)
    if s.unseen_source is not None:
        report["transfer_unseen"] = {}
        report["unseen_source"] = {"name": s.unseen_source.name, "label": s.unseen_source.label,
                                   "clean": accuracy(bench.source_fn, x, y), "accuracy": {}}
    return report


def _finish(bench: Workbench) -> dict:
    """Fills what follows from the pieces: the target's shared white-box numbers, summary, sanity flags."""
    report, target = bench.report, bench.spec.target
    for key in bench.shared_with_transfer:
        report["whitebox"][key][target] = report["transfer"][key][target]
    report["summary"] = {t: summarise(report[t], report["clean"], report["attacks"], report["models"])
                         for t in threats_of(report)}
    report["sanity"] = sanity_flags(report)
    return report
