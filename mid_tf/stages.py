"""Runs the pipeline's stages in order, each resumable, and writes the run summary.

  target   the undefended LeNet-5 / ResNet the paper's attacks are crafted on
  teacher  E_t, D_t, C trained on clean data (CE + reconstruction), then frozen
  mid      the student encoder E_s meta-trained over the Attacker Pool (training/meta.py)
  pgd_at   baseline: the target's architecture trained by PGD adversarial training (Madry et al.)
  trades   baseline: the same architecture trained by TRADES (Zhang et al.)
  eval     robustness report: every model present, transfer and white-box attacks, known vs unknown
A completed stage (`<model_dir>/<stage>/done.json`) is loaded, not retrained; an interrupted one
resumes from its last step checkpoint. Further stages plug in through `register_stage`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import keras
import tensorflow as tf

import mid_tf
from mid_tf import artifacts
from mid_tf.config import KNOWN_STAGES, ConfigError, RunConfig
from mid_tf.data import eval_dataset, load_split
from mid_tf.models import MIDModels, build_autoencoder, build_models, build_pipeline, copy_teacher_head
from mid_tf.training import distribute, metrics, precision, stage1

# stage -> stages whose outputs it needs
_REQUIRES = {"target": (), "teacher": (), "pgd_at": (), "trades": (), "mid": ("target", "teacher"),
             "eval": ("target", "teacher", "mid")}


class Context:
    """What every stage sees: the config, the data, the networks."""

    def __init__(self, cfg: RunConfig, models: MIDModels, train_split, test_split):
        self.cfg, self.models = cfg, models
        self._train_split, self.test_split = train_split, test_split
        self.test_ds = eval_dataset(test_split, cfg.eval_batch_size)

    @property
    def train_split(self):
        if self._train_split is None:  # loaded lazily: a run with every stage done needs no training data
            d = self.cfg.data
            self._train_split = load_split(d.dataset, "train", d.data_dir, download=d.download,
                                           limit=d.train_examples)
        return self._train_split

    def fit_kwargs(self, stage: str) -> dict:
        return dict(seed=self.cfg.seed, model_dir=self.cfg.model_dir, checkpoint_every=self.cfg.checkpoint_every,
                    verbose=self.cfg.verbose)


def _run_target(ctx: Context) -> dict:
    cfg, models = ctx.cfg, ctx.models
    t0 = time.time()
    if artifacts.is_done(cfg.model_dir, "target"):
        result = artifacts.load_stage(cfg.model_dir, "target", models)
    else:
        twin = precision.mixed_twin(models, cfg.data.dataset, cfg.width, cfg.target.precision)
        resumed = stage1.train_target(twin, ctx.train_split, cfg.target, **ctx.fit_kwargs("target"))
        precision.copy_back(twin, models, ("target",))
        result = {"epochs": cfg.target.epochs, "resumed_from_step": resumed, "precision": cfg.target.precision,
                  "train_examples": len(ctx.train_split), "train_time_s": round(time.time() - t0, 1)}
    result["clean_accuracy"] = metrics.accuracy(models.target, ctx.test_ds)
    artifacts.mark_done(cfg.model_dir, "target", models, result)
    stage1.freeze(models.target)
    return result


def _run_teacher(ctx: Context) -> dict:
    cfg, models = ctx.cfg, ctx.models
    t0 = time.time()
    if artifacts.is_done(cfg.model_dir, "teacher"):
        result = artifacts.load_stage(cfg.model_dir, "teacher", models)
    else:
        twin = precision.mixed_twin(models, cfg.data.dataset, cfg.width, cfg.teacher.precision)
        resumed = stage1.train_teacher(twin, ctx.train_split, cfg.teacher, **ctx.fit_kwargs("teacher"))
        precision.copy_back(twin, models, ("teacher_encoder", "decoder", "classifier"))
        copy_teacher_head(models)  # C_s := C (the deployed head unless --train_head trains C_s)
        result = {"epochs": cfg.teacher.epochs, "resumed_from_step": resumed, "precision": cfg.teacher.precision,
                  "train_examples": len(ctx.train_split), "train_time_s": round(time.time() - t0, 1)}
    teacher = build_autoencoder(models.teacher_encoder, models.decoder, models.classifier)
    result["clean_accuracy"] = metrics.accuracy(lambda x: teacher(x)["logits"], ctx.test_ds)
    rec = metrics.reconstruction_quality(lambda x: teacher(x)["reconstruction"], ctx.test_ds)
    result.update({"reconstruction_psnr_db": rec["psnr_db"], "reconstruction_ssim": rec["ssim"],
                   "reconstruction_mse": rec["mse"]})
    artifacts.mark_done(cfg.model_dir, "teacher", models, result)
    stage1.freeze(models.teacher_encoder, models.decoder, models.classifier)
    return result


def _run_mid(ctx: Context) -> dict:
    from mid_tf.training import mid_stage

    cfg, models = ctx.cfg, ctx.models
    t0 = time.time()
    if artifacts.is_done(cfg.model_dir, "mid"):
        result = artifacts.load_stage(cfg.model_dir, "mid", models)
    else:
        # bfloat16 training runs on a twin of the networks; the float32 ones are saved and evaluated.
        twin = precision.mixed_twin(models, cfg.data.dataset, cfg.width, cfg.mid.precision)
        _, resumed = mid_stage.train_mid(twin, ctx.train_split, cfg.mid, seed=cfg.seed, model_dir=cfg.model_dir,
                                         checkpoint_every=cfg.checkpoint_every, verbose=cfg.verbose,
                                         val_split=ctx.test_split)
        precision.copy_back(twin, models, ("student_encoder", "student_classifier"))
        result = {"epochs": cfg.mid.epochs, "resumed_from_step": resumed, "pool": cfg.mid.pool,
                  "train_head": cfg.mid.train_head,
                  "attack_source": cfg.mid.attack_source, "meta_order": cfg.mid.meta_order,
                  "precision": cfg.mid.precision,
                  "train_examples": len(ctx.train_split), "train_time_s": round(time.time() - t0, 1)}
    pipeline = build_pipeline(models.student_encoder, models.student_classifier)
    result["clean_accuracy"] = metrics.accuracy(pipeline, ctx.test_ds)
    artifacts.mark_done(cfg.model_dir, "mid", models, result)
    return result


def _run_baseline(method: str):
    def run(ctx: Context) -> dict:
        from mid_tf.training import baselines

        cfg, models = ctx.cfg, ctx.models
        t0 = time.time()
        if artifacts.is_done(cfg.model_dir, method):
            result = artifacts.load_stage(cfg.model_dir, method, models)
        else:
            resumed = baselines.train_baseline(models, ctx.train_split, cfg.baseline, method, **ctx.fit_kwargs(method))
            result = {"epochs": cfg.baseline.epochs, "attack": cfg.baseline.attack, "resumed_from_step": resumed,
                      "train_examples": len(ctx.train_split), "train_time_s": round(time.time() - t0, 1)}
            if method == "trades":
                result["trades_beta"] = cfg.baseline.trades_beta
        result["clean_accuracy"] = metrics.accuracy(getattr(models, method), ctx.test_ds)
        artifacts.mark_done(cfg.model_dir, method, models, result)
        stage1.freeze(getattr(models, method))
        return result
    return run


def _run_eval(ctx: Context) -> dict:
    """The robustness report (evaluation/report.py) over every model this model_dir has."""
    from mid_tf.evaluation import report as report_lib
    from mid_tf.evaluation.memo import ReportMemo
    from mid_tf.models import build_regenerator

    cfg, models = ctx.cfg, ctx.models
    nets = {"target": models.target,
            "mid": build_pipeline(models.student_encoder, models.student_classifier, name="mid")}
    for baseline in ("pgd_at", "trades"):
        if artifacts.is_done(cfg.model_dir, baseline):
            if baseline not in cfg.stages:
                artifacts.load_stage(cfg.model_dir, baseline, models)
            nets[baseline] = getattr(models, baseline)
    helpers, helper_codes = [], None
    if cfg.eval_workers > 1 and not cfg.eval_helper:
        from mid_tf.evaluation.workers import start_helpers
        helpers = start_helpers(cfg, cfg.eval_workers - 1)
        print(f"eval: {len(helpers)} helper process(es) share the attacks (logs: "
              f"{os.path.join(cfg.model_dir, 'eval', 'helper-*.log')})", flush=True)
    finished = False
    try:
        report, grids = report_lib.build_report(
            nets, ctx.test_split.images, ctx.test_split.labels, attacks=list(cfg.eval_attacks),
            whitebox_attacks=list(cfg.eval_whitebox_attacks), pool=report_lib.pool_names(cfg.mid.pool),
            regenerator=build_regenerator(models.student_encoder, models.decoder),
            slow_examples=cfg.eval_slow_examples, seed=cfg.seed, eps_sweep=cfg.eval_eps_sweep,
            dataset=cfg.data.dataset, config=cfg.to_json(), progress=bool(cfg.verbose) or cfg.eval_helper,
            grid_attacks=tuple(report_lib.base_name(a) for a in cfg.eval_attacks[:3]),
            memo=ReportMemo(os.path.join(cfg.model_dir, "eval", "memo.json")),  # a killed evaluation resumes
            wait_for_others=not cfg.eval_helper)
        finished = True
    finally:
        if helpers:
            from mid_tf.evaluation.workers import stop_helpers
            helper_codes = stop_helpers(helpers, timeout=120 if finished else 0)
            print(f"eval: helpers exited with {helper_codes}", flush=True)
    if cfg.eval_helper:  # its pieces are in the memo; the main process writes the report
        return {"helper": True, "left_to_others": report is None}
    paths = report_lib.write_report(report, os.path.join(cfg.model_dir, "eval"), grids)
    report_lib.log_tensorboard(report, os.path.join(cfg.model_dir, "logs", "eval"), grids)
    print(report_lib.format_console(report), flush=True)
    print("report: " + ", ".join(paths.values()), flush=True)
    return {"examples": report["examples"], "report": paths["md"], "sanity_flags": len(report["sanity"]),
            "models": ",".join(report["models"]), "clean": report["clean"], "transfer": report["transfer"],
            "whitebox": report["whitebox"], "summary": report["summary"],
            **({"helpers_exit": helper_codes} if helper_codes is not None else {})}


_RUNNERS = {"target": _run_target, "teacher": _run_teacher, "pgd_at": _run_baseline("pgd_at"),
            "trades": _run_baseline("trades"), "mid": _run_mid, "eval": _run_eval}


def register_stage(name: str, runner) -> None:
    """Later stages (mid, eval, baselines) plug in here."""
    _RUNNERS[name] = runner


def _check_dependencies(cfg: RunConfig) -> None:
    for stage in cfg.stages:
        if stage not in _RUNNERS:
            raise ConfigError(f"stage '{stage}' is not available in this version of mid_tf; "
                              f"available: {list(_RUNNERS)}")
        for dep in _REQUIRES.get(stage, ()):
            if dep not in cfg.stages and not artifacts.is_done(cfg.model_dir, dep):
                raise ConfigError(f"stage '{stage}' needs stage '{dep}', which has not completed in "
                                  f"{cfg.model_dir}: add it to --stages (e.g. --stages={dep},{stage})")


def _run_stages(cfg: RunConfig, ctx: Context) -> dict:
    results = {}
    ordered = [s for s in KNOWN_STAGES if s in cfg.stages] + [s for s in cfg.stages if s not in KNOWN_STAGES]
    for stage in ordered:
        if cfg.verbose:
            print(f"== stage {stage} ==", flush=True)
        # Dependencies completed earlier are loaded so this stage can use them.
        for dep in _REQUIRES.get(stage, ()):
            if dep not in results:
                results[dep] = _RUNNERS[dep](ctx)
        results[stage] = _RUNNERS[stage](ctx)
    return results


def run(cfg: RunConfig) -> dict:
    """Runs `cfg.stages` in pipeline order; returns (and writes) the summary."""
    cfg.validate()
    strategy = distribute.make_strategy(cfg.strategy)
    if cfg.strategy == "multi_worker" and not distribute.is_chief():
        # Non-chief workers train in lockstep but keep their files apart from the chief's outputs.
        cfg = dataclasses.replace(cfg, model_dir=os.path.join(cfg.model_dir, f".worker-{os.getpid()}"), verbose=0)
    _check_dependencies(cfg)
    start = time.time()
    d = cfg.data
    # Test data first: it is small, and a missing dataset fails here, within seconds.
    test_split = load_split(d.dataset, "test", d.data_dir, download=d.download, limit=d.eval_examples)
    os.makedirs(cfg.model_dir, exist_ok=True)
    artifacts.check_run_identity(cfg.model_dir, {"dataset": d.dataset, "width": cfg.width, "seed": cfg.seed})
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():  # every network and optimizer is created under the strategy
        models = build_models(d.dataset, width=cfg.width)
        results = _run_stages(cfg, Context(cfg, models, None, test_split))
    summary = {
        "mid_tf_version": mid_tf.__version__,
        "dataset": d.dataset,
        "data_source": test_split.source,
        "seed": cfg.seed,
        "train_examples": d.train_examples,
        "eval_examples": len(test_split),
        "stages": results,
        "wall_time_s": round(time.time() - start, 1),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "config": cfg.to_json(),
    }
    if not cfg.eval_helper:  # a helper's partial view never replaces the main process's summary
        artifacts.write_json_atomic(os.path.join(cfg.model_dir, "summary.json"), summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"mid_tf summary  dataset={summary['dataset']}  test examples={summary['eval_examples']}  "
             f"wall time={summary['wall_time_s']:.1f}s"]
    for stage, res in summary["stages"].items():
        parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(res.items())
                 if isinstance(v, (int, float, str))]
        lines.append(f"  {stage:<8} " + "  ".join(parts))
    return "\n".join(lines)
