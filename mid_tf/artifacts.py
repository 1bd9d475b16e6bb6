"""The layout of `--model_dir` and atomic writes into it.

  <model_dir>/run.json                     dataset, width, seed of the run (guards against mixing runs)
  <model_dir>/<stage>/ckpt/                step checkpoints while a stage trains (tf.train.CheckpointManager)
  <model_dir>/<stage>/<net>.weights.h5     final weights, written to a temp file and renamed
  <model_dir>/<stage>/done.json            written last: the stage is complete (and its metrics)
  <model_dir>/logs/<stage>/                TensorBoard event files
  <model_dir>/summary.json                 the run summary (documented in docs/training.md)
A stage without `done.json` is incomplete: rerunning the same command resumes it from `ckpt/`.
"""

from __future__ import annotations

import json
import os
import tempfile

import keras

from mid_tf.models import MIDModels, build_models, copy_teacher_head

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
}


class ArtifactError(RuntimeError):
    """A model_dir that is missing pieces or belongs to another run; the message names the fix."""


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


def mark_done(model_dir: str, stage: str, models: MIDModels, metrics: dict) -> None:
    """Saves the stage's networks, then writes done.json (last, so a crash never marks a stage done)."""
    for net in STAGE_NETWORKS.get(stage, ()):
        save_weights_atomic(getattr(models, net), weights_path(model_dir, stage, net))
    write_json_atomic(os.path.join(stage_dir(model_dir, stage), "done.json"), metrics)


def check_run_identity(model_dir: str, identity: dict) -> None:
    """Records dataset/width on first use; refuses a model_dir made with different ones."""
    path = os.path.join(model_dir, "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
        diff = {k: (recorded.get(k), v) for k, v in identity.items() if recorded.get(k) != v}
        if diff:
            raise ArtifactError(
                f"--model_dir={model_dir} holds a run with different settings {diff} (recorded, requested). "
                "Use a new --model_dir, or the original settings to resume.")
        return
    write_json_atomic(path, identity)


def read_run_identity(model_dir: str) -> dict:
    path = os.path.join(model_dir, "run.json")
    if not os.path.isfile(path):
        raise ArtifactError(f"{model_dir} is not a mid_tf model_dir (no run.json). Train first with "
                            f"`python train.py --model_dir={model_dir}` or pass the right --model_dir.")
    with open(path) as f:
        return json.load(f)


def load_stage(model_dir: str, stage: str, models: MIDModels) -> dict:
    """Loads a completed stage's networks into `models`; returns its done.json metrics."""
    for net in STAGE_NETWORKS[stage]:
        path = weights_path(model_dir, stage, net)
        if (stage, net) in OPTIONAL_NETWORKS and not os.path.isfile(path):
            continue
        getattr(models, net).load_weights(path)
    if stage == "teacher":
        copy_teacher_head(models)  # C_s starts as C; a completed mid stage loads its own afterwards
    return read_done(model_dir, stage)


def load_models(model_dir: str, stages=("target", "teacher", "mid")) -> MIDModels:
    """Builds the networks recorded in run.json and loads the weights of the completed `stages`."""
    identity = read_run_identity(model_dir)
    models = build_models(identity["dataset"], width=identity.get("width", 1.0))
    for stage in stages:
        if not is_done(model_dir, stage):
            raise ArtifactError(f"stage '{stage}' has not completed in {model_dir}; run "
                                f"`python train.py --model_dir={model_dir} --stages=...,{stage}` first")
        load_stage(model_dir, stage, models)
    return models
