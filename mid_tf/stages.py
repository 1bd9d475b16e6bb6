"""Runs the pipeline's stages in order, each resumable, and writes the run summary.

  target   the undefended LeNet-5 / ResNet the paper's attacks are crafted on
  teacher  E_t, D_t, C trained on clean data (CE + reconstruction), then frozen
  mid      the student encoder E_s meta-trained over the Attacker Pool (training/meta.py)
  pgd_at   baseline: the target's architecture trained by PGD adversarial training (Madry et al.)
  trades   baseline: the same architecture trained by TRADES (Zhang et al.)
  eval     robustness report: every model present, transfer and white-box attacks, known vs unknown
A completed stage (`<model_dir>/<stage>/done.json`) is loaded, not retrained; an interrupted one
resumes from its last step checkpoint. Every trained stage goes through one runner (`_run_stage`):
load or train, score, mark done, freeze.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Callable

import keras
import tensorflow as tf

import mid_tf
from mid_tf import artifacts
from mid_tf.config import KNOWN_STAGES, ConfigError, RunConfig
from mid_tf.data import eval_dataset, load_split
from mid_tf.models import MIDModels, build_autoencoder, build_models, build_pipeline, copy_teacher_head
from mid_tf.training import distribute, metrics, precision, stage1

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

    @property
    def fit_kwargs(self) -> dict:
        return dict(seed=self.cfg.seed, model_dir=self.cfg.model_dir, checkpoint_every=self.cfg.checkpoint_every,
                    verbose=self.cfg.verbose)

    def on_twin(self, stage: str, dtype: str, train) -> int:
        """Runs `train(networks)` on a twin of the networks computing in `dtype` (the float32 networks
        themselves for float32), then copies the stage's trained weights back; returns what `train` does."""
        twin = precision.mixed_twin(self.models, self.cfg.data.dataset, self.cfg.width, dtype)
        out = train(twin)
        precision.copy_back(twin, self.models, artifacts.STAGE_NETWORKS[stage])
        return out


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained stage: `fit` trains it (returns its result), `score` measures it (trained or loaded)."""
    fit: Callable[[Context], dict]
    score: Callable[[Context], dict]
    requires: tuple = ()
    freeze: bool = True  # frozen once done (the networks later stages build on)


def _fit_target(ctx: Context) -> dict:
    cfg = ctx.cfg
    resumed = ctx.on_twin("target", cfg.target.precision,
                          lambda nets: stage1.train_target(nets, ctx.train_split, cfg.target, **ctx.fit_kwargs))
    return {"epochs": cfg.target.epochs, "resumed_from_step": resumed, "precision": cfg.target.precision}


def _fit_teacher(ctx: Context) -> dict:
    cfg = ctx.cfg
    resumed = ctx.on_twin("teacher", cfg.teacher.precision,
                          lambda nets: stage1.train_teacher(nets, ctx.train_split, cfg.teacher, **ctx.fit_kwargs))
    copy_teacher_head(ctx.models)  # C_s := C (the deployed head unless --train_head trains C_s)
    return {"epochs": cfg.teacher.epochs, "resumed_from_step": resumed, "precision": cfg.teacher.precision}


def _fit_mid(ctx: Context) -> dict:
    from mid_tf.training import mid_stage

    cfg, mid = ctx.cfg, ctx.cfg.mid
    _, resumed = ctx.on_twin("mid", mid.precision, lambda nets: mid_stage.train_mid(
        nets, ctx.train_split, mid, val_split=ctx.test_split, **ctx.fit_kwargs))
    return {"epochs": mid.epochs, "resumed_from_step": resumed, "pool": mid.pool, "train_head": mid.train_head,
            "attack_source": mid.attack_source, "meta_order": mid.meta_order, "precision": mid.precision}


def _fit_baseline(method: str):
    def fit(ctx: Context) -> dict:
        from mid_tf.training import baselines

        b = ctx.cfg.baseline
        resumed = baselines.train_baseline(ctx.models, ctx.train_split, b, method, **ctx.fit_kwargs)
        return {"epochs": b.epochs, "attack": b.attack, "resumed_from_step": resumed,
                **({"trades_beta": b.trades_beta} if method == "trades" else {})}
    return fit


def _score_teacher(ctx: Context) -> dict:
    m = ctx.models
    teacher = build_autoencoder(m.teacher_encoder, m.decoder, m.classifier)
    rec = metrics.reconstruction_quality(lambda x: teacher(x)["reconstruction"], ctx.test_ds)
    return {"clean_accuracy": metrics.accuracy(lambda x: teacher(x)["logits"], ctx.test_ds),
            "reconstruction_psnr_db": rec["psnr_db"], "reconstruction_ssim": rec["ssim"],
            "reconstruction_mse": rec["mse"]}


def _clean_accuracy(network):
    return lambda ctx: {"clean_accuracy": metrics.accuracy(network(ctx.models), ctx.test_ds)}


STAGES = {
    "target": Stage(_fit_target, _clean_accuracy(lambda m: m.target)),
    "teacher": Stage(_fit_teacher, _score_teacher),
    "pgd_at": Stage(_fit_baseline("pgd_at"), _clean_accuracy(lambda m: m.pgd_at)),
    "trades": Stage(_fit_baseline("trades"), _clean_accuracy(lambda m: m.trades)),
    "mid": Stage(_fit_mid, _clean_accuracy(lambda m: build_pipeline(m.student_encoder, m.student_classifier)),
                 requires=("target", "teacher"), freeze=False),
}
# The eval stage scores the others; it needs the models the report is about.
EVAL_REQUIRES = ("target", "teacher", "mid")


def _run_stage(ctx: Context, name: str) -> dict:
    """Loads a completed stage, or trains it (resuming from its checkpoints); scores it; marks it done."""
    if name == "eval":
        from mid_tf.evaluation.stage import evaluate
        return evaluate(ctx.cfg, ctx.models, ctx.test_split)
    stage, model_dir, t0 = STAGES[name], ctx.cfg.model_dir, time.time()
    if artifacts.is_done(model_dir, name):
        result = artifacts.load_stage(model_dir, name, ctx.models)
    else:
        result = {**stage.fit(ctx), "train_examples": len(ctx.train_split),
                  "train_time_s": round(time.time() - t0, 1)}
    result.update(stage.score(ctx))
    artifacts.mark_done(model_dir, name, ctx.models, result)
    if stage.freeze:
        stage1.freeze(*(getattr(ctx.models, net) for net in artifacts.STAGE_NETWORKS[name]))
    return result


def _requires(stage: str) -> tuple:
    return EVAL_REQUIRES if stage == "eval" else STAGES[stage].requires


def _check_dependencies(cfg: RunConfig) -> None:
    for stage in cfg.stages:
        for dep in _requires(stage):
            if dep not in cfg.stages and not artifacts.is_done(cfg.model_dir, dep):
                raise ConfigError("stages", f"has '{stage}', which needs stage '{dep}', not completed in "
                                  f"{cfg.model_dir}: add it (e.g. {dep},{stage})")


def _run_stages(cfg: RunConfig, ctx: Context) -> dict:
    results = {}
    for stage in (s for s in KNOWN_STAGES if s in cfg.stages):
        if cfg.verbose:
            print(f"== stage {stage} ==", flush=True)
        # Dependencies completed earlier are loaded so this stage can use them.
        for dep in _requires(stage):
            if dep not in results:
                results[dep] = _run_stage(ctx, dep)
        results[stage] = _run_stage(ctx, stage)
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
