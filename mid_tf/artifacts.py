"""The layout of `--model_dir` and atomic writes into it.

  <model_dir>/run.json                     dataset, width, seed of the run (guards against mixing runs)
  <model_dir>/.lock                        flock'ed by the process training in it (holds its pid)
  <model_dir>/<stage>/config.json          the stage's configuration fingerprint, written when it starts
  <model_dir>/<stage>/ckpt/                step checkpoints while a stage trains (tf.train.CheckpointManager)
  <model_dir>/<stage>/<net>.weights.h5     final weights, written to a temp file and renamed
  <model_dir>/<stage>/done.json            written last: the stage is complete (its metrics and fingerprint)
  <model_dir>/logs/<stage>/                TensorBoard event files
  <model_dir>/summary.json                 the run summary (documented in docs/training.md)
A stage without `done.json` is incomplete: rerunning the same command resumes it from `ckpt/`.
A stage's fingerprint is the configuration its weights depend on (which fields: mid_tf/stages.py);
a rerun asking for other values is refused rather than silently reusing or resuming the stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile

import keras

from mid_tf.config import DECODER_UNPOOLS
from mid_tf.data.datasets import KNOWN_DATASETS
from mid_tf.models import MIDModels, build_models, copy_teacher_parts

# Networks a completed stage may lack on disk (written by later versions): loading keeps their current
# weights. A mid stage from before --train_head has no student_classifier: its head is the teacher's C.
OPTIONAL_NETWORKS = {("mid", "student_classifier")}

# Which networks each stage produces.
STAGE_NETWORKS = {
    "target": ("target",),
    "teacher": ("teacher_encoder", "decoder", "classifier"),
    "mid": ("student_encoder", "student_classifier"),
    "pgd_at": ("pgd_at",),
    "trades": ("trades",),
    "surrogate": ("surrogate",),
    "regen": ("student_decoder",),
}


FINGERPRINT = "fingerprint"  # the done.json key holding the stage's fingerprint
# run.json keys written only where they differ from these (a run.json without them holds the default).
IDENTITY_DEFAULTS = {"decoder_unpool": "switches"}


class ArtifactError(RuntimeError):
    """A model_dir that is missing pieces or belongs to another run; the message names the fix."""


class FingerprintError(ArtifactError):
    """Stages of a model_dir made with another configuration than the one requested.

    `mismatches`: {stage: {field: (recorded, requested)}}; `discards`: {stage: the stages --retrain=stage
    also discards}. `describe(flag_for)` names each field's flag too (the apps know the flags)."""

    def __init__(self, model_dir: str, mismatches: dict, in_progress: set, discards: dict):
        self.model_dir, self.mismatches, self.in_progress, self.discards = model_dir, mismatches, in_progress, discards
        super().__init__(self.describe())

    def describe(self, flag_for=lambda field: None) -> str:
        lines = [f"--model_dir={self.model_dir} holds stages made with another configuration "
                 "(recorded -> requested):"]
        listed = set()
        for stage, diff in self.mismatches.items():
            state = "started, not done" if stage in self.in_progress else "done"
            new = [f for f in sorted(diff) if f not in listed]
            lines.append(f"  stage {stage} ({state})" + (":" if new else ": through the stages it is built on"))
            for field in new:
                flag = flag_for(field)
                recorded, requested = (json.dumps(v) for v in diff[field])
                lines.append(f"    {field} {recorded} -> {requested}" + (f" (--{flag})" if flag else ""))
            listed.update(diff)
        roots = [s for s in self.mismatches if not any(s in self.discards.get(r, ()) for r in self.mismatches)]
        also = sorted({d for r in roots for d in self.discards.get(r, ())} - set(roots))
        lines.append(f"Fix: rerun with the recorded values to reuse what is there, use a new --model_dir, or pass "
                     f"--retrain={','.join(roots)} to train {', '.join(roots)} again"
                     + (f" (this also discards {', '.join(also)}, built on {'it' if len(roots) == 1 else 'them'})."
                        if also else "."))
        return "\n".join(lines)


def stage_dir(model_dir: str, stage: str) -> str:
    return os.path.join(model_dir, stage)


def weights_path(model_dir: str, stage: str, network: str) -> str:
    return os.path.join(stage_dir(model_dir, stage), f"{network}.weights.h5")


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def save_weights_atomic(model: keras.Model, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save_weights(tmp)
    os.replace(tmp, path)


def is_done(model_dir: str, stage: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir(model_dir, stage), "done.json"))


def read_done(model_dir: str, stage: str) -> dict:
    with open(os.path.join(stage_dir(model_dir, stage), "done.json")) as f:
        return json.load(f)


def mark_done(model_dir: str, stage: str, models: MIDModels, metrics: dict, fingerprint: dict | None = None) -> None:
    """Saves the stage's networks, then writes done.json (last, so a crash never marks a stage done).
    `fingerprint`: the configuration that made the weights (None: unknown, as in a done.json from before
    fingerprints, which stays unknown rather than being vouched for by a later configuration)."""
    for net in STAGE_NETWORKS.get(stage, ()):
        save_weights_atomic(getattr(models, net), weights_path(model_dir, stage, net))
    extra = {FINGERPRINT: fingerprint} if fingerprint is not None else {}
    write_json_atomic(os.path.join(stage_dir(model_dir, stage), "done.json"), {**metrics, **extra})


def record_stage_config(model_dir: str, stage: str, fingerprint: dict) -> None:
    """Written as the stage starts training: its checkpoints belong to this configuration."""
    write_json_atomic(os.path.join(stage_dir(model_dir, stage), "config.json"), {FINGERPRINT: fingerprint})


def start_train_clock(model_dir: str, stage: str, now: float) -> float | None:
    """Starts a training run of `stage` at `now` (time.time()); returns the seconds of training its earlier,
    interrupted runs left in its checkpoints: 0 for a fresh start, None where checkpoints predate the clock.

    Each run records when it started and what came before it (train_clock.json); a run's kept work lasts
    from its start to its last checkpoint (the manager rewrites ckpt/checkpoint at every save), so the steps
    a killed run did after its last checkpoint, redone by the next, are counted once."""
    path, index = (os.path.join(stage_dir(model_dir, stage), n) for n in ("train_clock.json", "ckpt/checkpoint"))
    before = 0.0
    if os.path.isfile(index):
        try:
            with open(path) as f:
                clock = json.load(f)
            before = None if clock["seconds_before"] is None else clock["seconds_before"] + max(
                0.0, min(os.path.getmtime(index), now) - clock["started_at"])
        except (OSError, ValueError, KeyError, TypeError):
            before = None
    write_json_atomic(path, {"started_at": now, "seconds_before": before})
    return before


def recorded_fingerprint(model_dir: str, stage: str) -> tuple[dict | None, str]:
    """(fingerprint, state): state is "done", "started" (checkpoints, not done) or "new"; the fingerprint
    is None where none was recorded (new, or written before fingerprints existed)."""
    if is_done(model_dir, stage):
        return read_done(model_dir, stage).get(FINGERPRINT), "done"
    path = os.path.join(stage_dir(model_dir, stage), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get(FINGERPRINT), "started"
    return None, ("started" if os.path.isdir(os.path.join(stage_dir(model_dir, stage), "ckpt")) else "new")


def fingerprint_diff(recorded: dict, requested: dict) -> dict:
    """{field: (recorded, requested)} over the fields both know (a field added or retired by another
    version of mid_tf is not a difference: its default keeps the old behaviour)."""
    return {k: (recorded[k], requested[k]) for k in sorted(recorded.keys() & requested.keys())
            if recorded[k] != requested[k]}


def discard_stage(model_dir: str, stage: str) -> bool:
    """Removes a stage's outputs (weights, checkpoints, done.json, logs); True if there were any.
    The directory is renamed first, so a kill half-way never leaves a done stage with missing files."""
    found = False
    for path in (stage_dir(model_dir, stage), os.path.join(model_dir, "logs", stage)):
        if os.path.exists(path):
            found = True
            trash = os.path.join(model_dir, f".discarded-{os.getpid()}-{stage}")
            os.replace(path, trash)
            shutil.rmtree(trash)
    return found


def check_model_dir(model_dir: str) -> None:
    """Refuses a --model_dir that is a file or lies under one (before anything is loaded)."""
    path = os.path.abspath(model_dir)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        raise ArtifactError(f"--model_dir={model_dir}: {path} is a file, not a directory; pass a directory "
                            "(it is created if missing), e.g. --model_dir=runs/mnist")


@contextlib.contextmanager
def lock_model_dir(model_dir: str):
    """Holds <model_dir>/.lock for the block: a second process on the same model_dir fails fast naming
    the holder's pid. flock is released by the kernel when its holder dies (even by SIGKILL), so a lock
    file left by a dead process is simply taken over."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        f = open(os.path.join(model_dir, ".lock"), "a+")
    except OSError as e:
        raise ArtifactError(f"--model_dir={model_dir} cannot be used: {e}; pass a writable directory") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ArtifactError(f"--model_dir={model_dir} is in use by another mid_tf process (pid {holder}); wait "
                            "for it to finish, stop it, or use another --model_dir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def check_run_identity(model_dir: str, identity: dict) -> None:
    """Records dataset/width on first use; refuses a model_dir made with different ones."""
    path = os.path.join(model_dir, "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        keys = {*identity, *IDENTITY_DEFAULTS}
        diff = {k: (recorded.get(k, IDENTITY_DEFAULTS.get(k)), identity.get(k, IDENTITY_DEFAULTS.get(k)))
                for k in sorted(keys)}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        if diff:
            raise ArtifactError(
                f"--model_dir={model_dir} holds a run with different settings {diff} (recorded, requested). "
                "Use a new --model_dir, or the original settings to resume.")
        return
    write_json_atomic(path, identity)


def read_run_identity(model_dir: str) -> dict:
    """run.json, checked: {dataset, width, seed} as train.py writes it."""
    path = os.path.join(model_dir, "run.json")
    if not os.path.isfile(path):
        raise ArtifactError(f"{model_dir} is not a mid_tf model_dir (no run.json). Train first with "
                            f"`python train.py --model_dir={model_dir}` or pass the right --model_dir.")
    fix = "it is written by train.py: pass the --model_dir of a trained run, or retrain into a new one"
    try:
        with open(path) as f:
            identity = json.load(f)
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(identity, dict) or identity.get("dataset") not in KNOWN_DATASETS:
        raise ArtifactError(f"{path} names no known dataset (got {json.dumps(identity)[:80]}; expected one of "
                            f"{list(KNOWN_DATASETS)} under \"dataset\"); {fix}")
    if identity.get("decoder_unpool", IDENTITY_DEFAULTS["decoder_unpool"]) not in DECODER_UNPOOLS:
        raise ArtifactError(f"{path} names an unknown decoder_unpool {identity['decoder_unpool']!r} (one of "
                            f"{', '.join(DECODER_UNPOOLS)}); {fix}")
    return identity


def load_stage(model_dir: str, stage: str, models: MIDModels) -> dict:
    """Loads a completed stage's networks into `models`; returns its done.json metrics."""
    for net in STAGE_NETWORKS[stage]:
        path = weights_path(model_dir, stage, net)
        if (stage, net) in OPTIONAL_NETWORKS and not os.path.isfile(path):
            continue
        getattr(models, net).load_weights(path)
    if stage == "teacher":
        copy_teacher_parts(models)  # C_s, D_s start as C, D_t; completed mid / regen stages load their own afterwards
    done = read_done(model_dir, stage)
    done.pop(FINGERPRINT, None)  # the configuration, not a result
    return done


def load_models(model_dir: str, stages=("target", "teacher", "mid"), optional=("regen",)) -> MIDModels:
    """Builds the networks recorded in run.json and loads the weights of the completed `stages`, then of
    the `optional` stages that are completed (stage regen's D_s; without it D_s stays a copy of D_t)."""
    identity = read_run_identity(model_dir)
    models = build_models(identity["dataset"], width=identity.get("width", 1.0),
                          input_shape=identity.get("input_shape"),
                          num_classes=len(identity.get("class_names", ())) or None,
                          decoder_unpool=identity.get("decoder_unpool", IDENTITY_DEFAULTS["decoder_unpool"]))
    for stage in stages:
        if not is_done(model_dir, stage):
            raise ArtifactError(f"stage '{stage}' has not completed in {model_dir}; run "
                                f"`python train.py --model_dir={model_dir} --stages=...,{stage}` first")
        load_stage(model_dir, stage, models)
    for stage in optional:
        if stage not in stages and is_done(model_dir, stage):
            load_stage(model_dir, stage, models)
    return models
