"""Runs the pipeline's stages in order, each resumable, and writes the run summary.

  target   the undefended LeNet-5 / ResNet the paper's attacks are crafted on
  teacher  E_t, D_t, C trained on clean data (CE + reconstruction), then frozen
  mid      the student encoder E_s meta-trained over the Attacker Pool (training/meta.py)
  pgd_at   baseline: the target's architecture trained by PGD adversarial training (Madry et al.)
  trades   baseline: the same architecture trained by TRADES (Zhang et al.)
  surrogate  a plain CNN (models/surrogate.py: another family than the target's) trained on clean data with
           the run's seed + 1000 (config.SURROGATE_SEED_OFFSET): the eval stage's transfer source MID never saw
  regen    the regeneration decoder D_s fitted to the trained E_s on clean and attacked images (training/regen.py);
           E_s and C_s stay as they are. The deployed regeneration is D_s(E_s(x)) (D_t(E_s(x)) without this stage)
  eval     robustness report: every model present, transfer and white-box attacks, known vs unknown
A completed stage (`<model_dir>/<stage>/done.json`) is loaded, not retrained; an interrupted one resumes
from its last step checkpoint. Every trained stage goes through one runner (`_run_stage`): load or train,
score, mark done, freeze. Each records the fingerprint of the configuration it was trained with
(FINGERPRINT_FIELDS); a rerun asking for another one is refused before anything trains, unless `retrain`
names the stage (it and the stages built on it are discarded and trained again). One process at a time
trains in a model_dir (artifacts.lock_model_dir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import platform
import time
from typing import Callable

import keras
import tensorflow as tf

import mid_tf
from mid_tf import artifacts
from mid_tf.config import KNOWN_STAGES, ConfigError, RunConfig, flatten
from mid_tf.attacks.registry import threat_model, threat_model_for
from mid_tf.data import FOLDER_DATASETS, DataError, eval_dataset, load_split
from mid_tf.models import (MIDModels, build_autoencoder, build_models, build_pipeline, build_regenerator,
                           copy_teacher_parts)
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
            train = load_split(d.dataset, "train", d.data_dir, download=d.download, limit=d.train_examples)
            if train.images.shape[1:] != self.test_split.images.shape[1:] or (
                    train.class_names and train.class_names != self.test_split.class_names):
                raise DataError(f"{train.source}: the train split's images {train.images.shape[1:]} / classes "
                                f"{train.class_names} differ from the test split's {self.test_split.images.shape[1:]}"
                                f" / {self.test_split.class_names}; both splits must hold the same kind of images")
            self._train_split = train
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
    copy_teacher_parts(ctx.models)  # C_s := C, D_s := D_t (until --train_head / stage regen train them)
    return {"epochs": cfg.teacher.epochs, "resumed_from_step": resumed, "precision": cfg.teacher.precision}


def _fit_surrogate(ctx: Context) -> dict:
    cfg, sur = ctx.cfg, ctx.cfg.surrogate
    kwargs = {**ctx.fit_kwargs, "seed": cfg.surrogate_seed}  # its own data order, as its own initial weights
    resumed = ctx.on_twin("surrogate", sur.precision,
                          lambda nets: stage1.train_surrogate(nets, ctx.train_split, sur, **kwargs))
    return {"epochs": sur.epochs, "resumed_from_step": resumed, "precision": sur.precision,
            "seed": cfg.surrogate_seed}


def _fit_mid(ctx: Context) -> dict:
    from mid_tf.training import mid_stage

    cfg, mid = ctx.cfg, ctx.cfg.mid
    _, resumed = ctx.on_twin("mid", mid.precision, lambda nets: mid_stage.train_mid(
        nets, ctx.train_split, mid, val_split=ctx.test_split, **ctx.fit_kwargs))
    return {"epochs": mid.epochs, "resumed_from_step": resumed, "pool": mid.pool, "train_head": mid.train_head,
            "attack_source": mid.attack_source, "meta_order": mid.meta_order, "precision": mid.precision}


def _fit_regen(ctx: Context) -> dict:
    from mid_tf.training import regen

    r = ctx.cfg.regen
    resumed = ctx.on_twin("regen", r.precision, lambda nets: regen.train_regenerator(
        nets, ctx.train_split, r, **ctx.fit_kwargs))
    return {"epochs": r.epochs, "attack": r.attack, "resumed_from_step": resumed, "precision": r.precision}


def _score_regen(ctx: Context) -> dict:
    m = ctx.models
    rec = metrics.reconstruction_quality(build_regenerator(m.student_encoder, m.student_decoder), ctx.test_ds)
    return {"regeneration_psnr_db": rec["psnr_db"], "regeneration_ssim": rec["ssim"]}


def _fit_baseline(method: str):
    def fit(ctx: Context) -> dict:
        from mid_tf.training import baselines

        b = ctx.cfg.baseline
        resumed = ctx.on_twin(method, b.precision, lambda nets: baselines.train_baseline(
            nets, ctx.train_split, b, method, **ctx.fit_kwargs))
        return {"epochs": b.epochs, "attack": b.attack, "resumed_from_step": resumed, "precision": b.precision,
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
    "surrogate": Stage(_fit_surrogate, _clean_accuracy(lambda m: m.surrogate)),
    "mid": Stage(_fit_mid, _clean_accuracy(lambda m: build_pipeline(m.student_encoder, m.student_classifier)),
                 requires=("target", "teacher"), freeze=False),
    "regen": Stage(_fit_regen, _score_regen, requires=("teacher", "mid")),
}
# The eval stage scores the others. It needs the target (the transfer attacks' source); the MID pipeline
# (teacher + mid), the baselines and the surrogate are scored when done, not required: a model_dir holding only
# a baseline is evaluated on its own, and its rows set beside MID's from another run of the same seed and images.
EVAL_REQUIRES = ("target",)
EVAL_LOADS = ("teacher", "mid")

# The config section holding each trained stage's hyperparameters.
SECTION = {"target": "target", "teacher": "teacher", "mid": "mid", "pgd_at": "baseline", "trades": "baseline",
           "surrogate": "surrogate", "regen": "regen"}
_RUN_FIELDS = ("data.dataset", "data.train_examples", "seed", "width")
# The config fields a trained stage's weights depend on (fnmatch patterns; "!" excludes): its fingerprint,
# with its `requires` stages' fingerprints merged in. Left out, as they change no weight: data paths,
# checkpoint cadence, verbosity, strategy, the eval settings, and MID's logging and per-epoch validation
# (the attack cache's overlap builds the same cache either way).
FINGERPRINT_FIELDS = {
    "target": _RUN_FIELDS + ("target.*", "!target.reconstruction_weight"),
    "teacher": _RUN_FIELDS + ("teacher.*",),
    "pgd_at": _RUN_FIELDS + ("baseline.*", "!baseline.trades_beta"),
    "trades": _RUN_FIELDS + ("baseline.*",),
    "surrogate": _RUN_FIELDS + ("surrogate.*", "!surrogate.reconstruction_weight"),  # seed: its seed + 1000
    "mid": _RUN_FIELDS + ("mid.*", "!mid.val_examples", "!mid.val_attacks", "!mid.val_whitebox_attacks",
                          "!mid.log_every_steps", "!mid.attack_cache_overlap"),
    "regen": _RUN_FIELDS + ("regen.*",),  # with the fingerprints of the teacher and mid it builds on
}


def fingerprint(cfg: RunConfig, stage: str) -> dict:
    """{dotted field: value} the weights of `stage` (and of the stages it builds on) depend on, as JSON
    values (tuples become lists, as they read back from done.json)."""
    fields = {}
    for dep in STAGES[stage].requires:
        fields.update(fingerprint(cfg, dep))
    patterns = FINGERPRINT_FIELDS[stage]
    keep = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    for field, value in flatten(cfg.to_json()).items():
        if any(fnmatch.fnmatchcase(field, p) for p in keep) and not any(fnmatch.fnmatchcase(field, p) for p in drop):
            fields[field] = value
    return json.loads(json.dumps(fields, sort_keys=True))


def dependents(stage: str) -> tuple:
    """The trained stages built on `stage`, directly or not, in pipeline order."""
    found = {s for s in STAGES if stage in STAGES[s].requires}
    for s in tuple(found):
        found.update(dependents(s))
    return tuple(s for s in KNOWN_STAGES if s in found)


def _run_stage(ctx: Context, name: str) -> dict:
    """Loads a completed stage, or trains it (resuming from its checkpoints); scores it; marks it done."""
    if name == "eval":
        from mid_tf.evaluation.stage import evaluate
        return evaluate(ctx.cfg, ctx.models, ctx.test_split)
    stage, model_dir, t0 = STAGES[name], ctx.cfg.model_dir, time.time()
    if artifacts.is_done(model_dir, name):
        # Checked against this configuration before anything ran (_check_fingerprints); kept as recorded.
        recorded = artifacts.recorded_fingerprint(model_dir, name)[0]
        result = artifacts.load_stage(model_dir, name, ctx.models)
    else:
        recorded = fingerprint(ctx.cfg, name)
        artifacts.record_stage_config(model_dir, name, recorded)
        before = artifacts.start_train_clock(model_dir, name, t0)  # None: unknown (checkpoints before the clock)
        result = {**_fit_guarded(ctx, name), "train_examples": len(ctx.train_split),
                  "train_time_s": round(time.time() - t0 + (before or 0.0), 1),
                  "earlier_runs_train_time_s": None if before is None else round(before, 1)}
    result.update(stage.score(ctx))
    artifacts.mark_done(model_dir, name, ctx.models, result, recorded)
    if stage.freeze:
        stage1.freeze(*(getattr(ctx.models, net) for net in artifacts.STAGE_NETWORKS[name]))
    return result


def _fit_guarded(ctx: Context, name: str) -> dict:
    """`STAGES[name].fit`, its NaN/Inf guard's error told which stage and learning rate it is about."""
    from mid_tf.training.resumable import NonFiniteError

    try:
        return STAGES[name].fit(ctx)
    except NonFiniteError as e:
        e.stage, e.learning_rate_field = name, f"{SECTION[name]}.learning_rate"
        e.learning_rate = getattr(ctx.cfg, SECTION[name]).learning_rate
        raise


def _requires(stage: str) -> tuple:
    return EVAL_REQUIRES if stage == "eval" else STAGES[stage].requires


def _loads(cfg: RunConfig, stage: str) -> tuple:
    """The stages `stage` runs after: its requirements, and for eval the MID stages when they are done."""
    extra = tuple(s for s in EVAL_LOADS if artifacts.is_done(cfg.model_dir, s)) if stage == "eval" else ()
    return _requires(stage) + extra


def _check_dependencies(cfg: RunConfig, discard=()) -> None:
    for stage in cfg.stages:
        for dep in _requires(stage):
            if dep not in cfg.stages and (dep in discard or not artifacts.is_done(cfg.model_dir, dep)):
                raise ConfigError("stages", f"has '{stage}', which needs stage '{dep}', not completed in "
                                  f"{cfg.model_dir}: add it (e.g. {dep},{stage})")


def _retrain_plan(cfg: RunConfig, retrain) -> tuple:
    """The stages `retrain` discards: those it names and every stage built on them, in pipeline order."""
    for stage in retrain:
        if stage not in STAGES:
            raise ConfigError("stages", f"cannot retrain '{stage}': choose from {', '.join(STAGES)}")
        if stage not in cfg.stages:
            raise ConfigError("stages", f"does not include '{stage}', which is to be retrained: add it")
    found = {d for stage in retrain for d in (stage, *dependents(stage))}
    return tuple(s for s in KNOWN_STAGES if s in found)


def _check_fingerprints(cfg: RunConfig, discard=()) -> None:
    """Refuses, before anything trains, stages this run would reuse or resume that were made with another
    configuration; accepts those recorded before fingerprints existed, saying so."""
    used = {dep for stage in cfg.stages for dep in (stage, *_requires(stage))}
    mismatches, started = {}, set()
    for stage in (s for s in KNOWN_STAGES if s in used and s in STAGES and s not in discard):
        recorded, state = artifacts.recorded_fingerprint(cfg.model_dir, stage)
        if state == "new":
            continue
        if recorded is None:
            print(f"note: stage {stage} in {cfg.model_dir} was {'completed' if state == 'done' else 'started'} "
                  "before configurations were recorded; reusing it as it is, unchecked", flush=True)
            continue
        diff = artifacts.fingerprint_diff(recorded, fingerprint(cfg, stage))
        if diff:
            mismatches[stage] = diff
            if state == "started":
                started.add(stage)
    if mismatches:
        present = {s for s in STAGES if artifacts.recorded_fingerprint(cfg.model_dir, s)[1] != "new"}
        raise artifacts.FingerprintError(cfg.model_dir, mismatches, started,
                                         {s: tuple(d for d in dependents(s) if d in present) for s in mismatches})


def _run_stages(cfg: RunConfig, ctx: Context) -> dict:
    results = {}
    for stage in (s for s in KNOWN_STAGES if s in cfg.stages):
        if cfg.verbose:
            print(f"== stage {stage} ==", flush=True)
        # Dependencies completed earlier are loaded so this stage can use them.
        for dep in _loads(cfg, stage):
            if dep not in results:
                results[dep] = _run_stage(ctx, dep)
        results[stage] = _run_stage(ctx, stage)
    return results


def run(cfg: RunConfig, retrain=()) -> dict:
    """Runs `cfg.stages` in pipeline order; returns (and writes) the summary. `retrain`: stages (of
    `cfg.stages`) to discard, with the stages built on them, and train again."""
    cfg.validate()
    strategy = distribute.make_strategy(cfg.strategy)
    if cfg.strategy == "multi_worker" and not distribute.is_chief():
        # Non-chief workers train in lockstep but keep their files apart from the chief's outputs.
        cfg = dataclasses.replace(cfg, model_dir=os.path.join(cfg.model_dir, f".worker-{os.getpid()}"), verbose=0)
    artifacts.check_model_dir(cfg.model_dir)
    discard = _retrain_plan(cfg, tuple(retrain))
    _check_dependencies(cfg, discard)
    _check_fingerprints(cfg, discard)
    start = time.time()
    d = cfg.data
    # Test data first: it is small, and a missing dataset fails here, within seconds.
    test_split = load_split(d.dataset, "test", d.data_dir, download=d.download, limit=d.eval_examples)
    identity, shape = run_identity(cfg, test_split)
    threat = threat_model_for(d.dataset, shape[-1])
    # Helpers started by --eval_workers work in the main process's model_dir, under its lock.
    with contextlib.nullcontext() if cfg.eval_helper else artifacts.lock_model_dir(cfg.model_dir), \
            threat_model(threat):
        artifacts.check_run_identity(cfg.model_dir, identity)
        for stage in discard:
            if artifacts.discard_stage(cfg.model_dir, stage):
                print(f"retrain: discarded stage {stage} in {cfg.model_dir}", flush=True)
        keras.utils.set_random_seed(cfg.seed)
        with strategy.scope():  # every network and optimizer is created under the strategy
            models = build_models(d.dataset, width=cfg.width, input_shape=shape, decoder_unpool=cfg.decoder_unpool,
                                  num_classes=len(identity.get("class_names", ())) or None,
                                  surrogate_seed=cfg.surrogate_seed)
            results = _run_stages(cfg, Context(cfg, models, None, test_split))
        summary = _summary(cfg, test_split, results, time.time() - start)
        summary["threat_model"] = threat.describe()
        if not cfg.eval_helper:  # a helper's partial view never replaces the main process's summary
            artifacts.write_json_atomic(os.path.join(cfg.model_dir, "summary.json"), summary)
    return summary


def run_identity(cfg: RunConfig, test_split) -> tuple[dict, tuple]:
    """run.json's identity (dataset, width, seed; an image folder adds its image shape and class names, which
    the export needs) and the input shape of the networks."""
    identity = {"dataset": cfg.data.dataset, "width": cfg.width, "seed": cfg.seed}
    if cfg.decoder_unpool != "switches":  # recorded where it is not the default, read back with that default
        identity["decoder_unpool"] = cfg.decoder_unpool
    shape = tuple(int(v) for v in test_split.images.shape[1:])
    if cfg.data.dataset in FOLDER_DATASETS:
        identity.update(input_shape=list(shape), class_names=list(test_split.class_names))
    return identity, shape


def _summary(cfg: RunConfig, test_split, results: dict, wall_time_s: float) -> dict:
    return {
        "mid_tf_version": mid_tf.__version__,
        "dataset": cfg.data.dataset,
        "data_source": test_split.source,
        "seed": cfg.seed,
        "train_examples": cfg.data.train_examples,
        "eval_examples": len(test_split),
        "stages": results,
        "wall_time_s": round(wall_time_s, 1),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "config": cfg.to_json(),
    }


def format_summary(summary: dict) -> str:
    lines = [f"mid_tf summary  dataset={summary['dataset']}  test examples={summary['eval_examples']}  "
             f"wall time={summary['wall_time_s']:.1f}s  threat model={summary.get('threat_model', '?')}"]
    for stage, res in summary["stages"].items():
        parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(res.items())
                 if isinstance(v, (int, float, str))]
        lines.append(f"  {stage:<9} " + "  ".join(parts))
    return "\n".join(lines)
