"""The eval stage: the robustness report over every model a model_dir has, written and printed.

The models: the undefended target, and the MID pipeline (E_s, C_s) and every baseline (PGD-AT, TRADES) that
is completed. When stage surrogate is done, every transfer attack is also crafted on the surrogate (a plain CNN,
seed + 1000, that took no part in training) and scored on every model: the report's transfer_unseen rows.
The report's pieces are kept in `<model_dir>/eval/memo.json`, so a killed evaluation resumes; with
`eval_workers > 1` helper processes share them (evaluation/scheduler.py). Outputs: `<model_dir>/eval/`
(report.json, report.md, figures) and `<model_dir>/logs/eval` (TensorBoard).
"""

from __future__ import annotations

import os

from mid_tf import artifacts
from mid_tf.config import SURROGATE_SEED_OFFSET, RunConfig
from mid_tf.evaluation import scheduler, writers
from mid_tf.evaluation.inputs import ReportInput, UnseenSource
from mid_tf.evaluation.memo import ReportMemo
from mid_tf.evaluation.report import build_report
from mid_tf.evaluation.sanity import base_name, pool_names
from mid_tf.models import MIDModels, build_pipeline, build_regenerator

BASELINES = ("pgd_at", "trades")


def evaluate(cfg: RunConfig, models: MIDModels, test_split) -> dict:
    """Builds, writes and prints the report; returns the stage's result (a helper process: what it left)."""
    spec = report_input(cfg, models, test_split)
    report, grids, helper_codes = _build_sharing(cfg, spec)
    if cfg.eval_helper:  # its pieces are in the memo; the main process writes the report
        return {"helper": True, "left_to_others": report is None}
    paths = writers.write_report(report, os.path.join(cfg.model_dir, "eval"), grids)
    writers.log_tensorboard(report, os.path.join(cfg.model_dir, "logs", "eval"), grids)
    print(writers.format_console(report), flush=True)
    print("report: " + ", ".join(paths.values()), flush=True)
    return {"examples": report["examples"], "report": paths["md"], "sanity_flags": len(report["sanity"]),
            "models": ",".join(report["models"]), "clean": report["clean"], "transfer": report["transfer"],
            "whitebox": report["whitebox"], "summary": report["summary"], **_unseen_entry(report),
            **({"helpers_exit": helper_codes} if helper_codes is not None else {})}


def evaluated_models(cfg: RunConfig, models: MIDModels) -> dict:
    """name -> network: the target, and the MID pipeline and each baseline completed in `cfg.model_dir`
    (stages.run loads MID's stages before this one; the baselines are loaded here unless this run trained them)."""
    nets = {"target": models.target}
    if artifacts.is_done(cfg.model_dir, "mid"):
        nets["mid"] = build_pipeline(models.student_encoder, models.student_classifier, name="mid")
    for baseline in BASELINES:
        if artifacts.is_done(cfg.model_dir, baseline):
            if baseline not in cfg.stages:
                artifacts.load_stage(cfg.model_dir, baseline, models)
            nets[baseline] = getattr(models, baseline)
    return nets


def unseen_source(cfg: RunConfig, models: MIDModels) -> UnseenSource | None:
    """The surrogate when stage surrogate is done in `cfg.model_dir` (loaded from disk unless this run
    trained it): a transfer source that took no part in MID's training; None otherwise."""
    if not artifacts.is_done(cfg.model_dir, "surrogate"):
        return None
    if "surrogate" not in cfg.stages:
        artifacts.load_stage(cfg.model_dir, "surrogate", models)
    return UnseenSource("surrogate", models.surrogate, f"surrogate CNN, seed+{SURROGATE_SEED_OFFSET}")


def regenerator(cfg: RunConfig, models: MIDModels) -> tuple:
    """(x -> D_s(E_s(x)), its label): D_s as stage regen fitted it when that stage is done in `cfg.model_dir`
    (loaded from disk unless this run trained it), else D_t(E_s(x)), the paper's regeneration; (None, None)
    without a MID student."""
    if not artifacts.is_done(cfg.model_dir, "mid"):
        return None, None
    if not artifacts.is_done(cfg.model_dir, "regen"):
        return build_regenerator(models.student_encoder, models.decoder), "D_t(E_s(.))"
    if "regen" not in cfg.stages:
        artifacts.load_stage(cfg.model_dir, "regen", models)
    return build_regenerator(models.student_encoder, models.student_decoder), "D_s(E_s(.)), D_s from stage regen"


def _unseen_entry(report: dict) -> dict:
    """The summary's eval entry for the unseen source: its rows and what it is (nothing without one)."""
    if "transfer_unseen" not in report:
        return {}
    return {"transfer_unseen": report["transfer_unseen"], "unseen_source": report["unseen_source"]["label"]}


def report_input(cfg: RunConfig, models: MIDModels, test_split) -> ReportInput:
    regen, regen_label = regenerator(cfg, models)
    return ReportInput(
        models=evaluated_models(cfg, models), x=test_split.images, y=test_split.labels,
        attacks=list(cfg.eval_attacks), whitebox_attacks=list(cfg.eval_whitebox_attacks),
        unseen_source=unseen_source(cfg, models),
        pool=pool_names(cfg.mid.pool), regenerator=regen, regenerator_label=regen_label,
        slow_examples=cfg.eval_slow_examples, seed=cfg.seed, eps_sweep=cfg.eval_eps_sweep,
        dataset=cfg.data.dataset, config=cfg.to_json(),
        grid_attacks=tuple(base_name(a) for a in cfg.eval_attacks[:3]))


def _build_sharing(cfg: RunConfig, spec: ReportInput) -> tuple[dict | None, dict, list | None]:
    """build_report with `cfg.eval_workers - 1` helper processes (the main process only); returns
    (report, grids, the helpers' exit codes or None when none ran)."""
    helpers, helper_codes = [], None
    if cfg.eval_workers > 1 and not cfg.eval_helper:
        helpers = scheduler.start_helpers(cfg, cfg.eval_workers - 1)
        print(f"eval: {len(helpers)} helper process(es) share the attacks (logs: "
              f"{os.path.join(cfg.model_dir, 'eval', 'helper-*.log')})", flush=True)
    finished = False
    try:
        report, grids = build_report(
            spec, memo=ReportMemo(os.path.join(cfg.model_dir, "eval", "memo.json")),  # a killed evaluation resumes
            progress=bool(cfg.verbose) or cfg.eval_helper, wait=not cfg.eval_helper)
        finished = True
    finally:
        if helpers:
            helper_codes = scheduler.stop_helpers(helpers, timeout=120 if finished else 0)
            print(f"eval: helpers exited with {helper_codes}", flush=True)
    return report, grids, helper_codes
