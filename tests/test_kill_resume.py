"""A real kill: `train.py` SIGKILLed mid-epoch in stage 1 and again in the MID stage, rerun to the end,
ends with the weights of a run never interrupted, having redone less than a checkpoint interval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import h5py
import numpy as np

from mid_tf.artifacts import STAGE_NETWORKS, weights_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY = 4  # --checkpoint_every
STEPS_PER_EPOCH = 2048 // 64  # --train_examples / --batch_size
FLAGS = ["--dataset=mnist", "--train_examples=2048", "--eval_examples=256", "--width=0.25", "--target_epochs=2",
         "--teacher_epochs=1", "--mid_epochs=2", "--stages=target,teacher,mid", f"--checkpoint_every={EVERY}",
         "--batch_size=64", "--attack_pool=clean,fgsm,pgd10:nb_iter=2", "--val_examples=0", "--verbose=2",
         "--stage1_precision=float32", "--mid_precision=float32", "--deterministic"]


def _start(model_dir, data_dir, log_path) -> subprocess.Popen:
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "train.py", *FLAGS, f"--model_dir={model_dir}",
                                 f"--data_dir={data_dir}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _tail(log_path) -> str:
    with open(log_path) as f:
        return f.read()[-3000:]


def _latest_step(model_dir, stage) -> int | None:
    """The step of the stage's newest checkpoint (the manager swaps its index file in atomically)."""
    try:
        with open(os.path.join(model_dir, stage, "ckpt", "checkpoint")) as f:
            match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', f.read(), re.M)
    except FileNotFoundError:
        return None
    return int(match.group(1)) if match else None


def _kill_in(proc, model_dir, stage, log_path, after_step=2 * EVERY, timeout=240.0) -> int:
    """SIGKILLs `proc` as soon as `stage` has a checkpoint at `after_step` or later (mid-epoch: the epoch
    has STEPS_PER_EPOCH steps); returns the stage's newest checkpoint once the process is gone."""
    deadline = time.time() + timeout
    while (_latest_step(model_dir, stage) or 0) < after_step:
        assert proc.poll() is None, f"train.py ended before it could be killed in {stage}:\n{_tail(log_path)}"
        assert time.time() < deadline, f"no {stage} checkpoint at step {after_step} in {timeout}s:\n{_tail(log_path)}"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler, no cleanup, no flush
    assert proc.wait(timeout=60) == -9
    step = _latest_step(model_dir, stage)
    assert step % EVERY == 0 and step % STEPS_PER_EPOCH, f"killed at an epoch boundary ({stage} step {step})"
    return step


def _weights(model_dir) -> dict:
    """{network/variable: array} of the saved networks, without the optimizer state a network saves
    along when it was compiled in this process (not when it was loaded from a finished stage)."""
    out = {}
    for stage in ("target", "teacher", "mid"):
        for net in STAGE_NETWORKS[stage]:
            with h5py.File(weights_path(model_dir, stage, net), "r") as f:
                f.visititems(lambda name, item, net=net: out.__setitem__(f"{net}/{name}", item[()])
                             if isinstance(item, h5py.Dataset) and not name.startswith("optimizer/") else None)
    return out


def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path, mnist_data_dir):
    killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
    log, ref_log = tmp_path / "killed.log", tmp_path / "reference.log"
    procs = [_start(reference, mnist_data_dir, ref_log)]  # alongside: the test takes one run's time, not two
    try:
        procs.append(_start(killed, mnist_data_dir, log))
        target_step = _kill_in(procs[-1], killed, "target", log)  # mid-epoch of stage 1
        assert not os.path.exists(os.path.join(killed, "target", "done.json"))
        procs.append(_start(killed, mnist_data_dir, log))  # takes over the dead process's lock
        mid_step = _kill_in(procs[-1], killed, "mid", log)  # mid-epoch of the MID stage
        procs.append(_start(killed, mnist_data_dir, log))
        assert procs[-1].wait(timeout=300) == 0, _tail(log)
        assert procs[0].wait(timeout=300) == 0, _tail(ref_log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(os.path.join(killed, "summary.json")) as f:
        summary = json.load(f)["stages"]
    # Each stage resumed from the newest checkpoint the killed process left: less than EVERY steps redone.
    assert summary["target"]["resumed_from_step"] == target_step > 0
    assert summary["mid"]["resumed_from_step"] == mid_step > 0
    assert summary["teacher"]["resumed_from_step"] == 0  # never interrupted
    # The killed runs' training up to their last checkpoints counts in the stage's train time.
    for stage in ("target", "mid"):
        assert 0 < summary[stage]["earlier_runs_train_time_s"] < summary[stage]["train_time_s"]
    assert summary["teacher"]["earlier_runs_train_time_s"] == 0
    with open(os.path.join(reference, "summary.json")) as f:
        ref = json.load(f)["stages"].values()
        assert all(s["resumed_from_step"] == 0 and s["earlier_runs_train_time_s"] == 0 for s in ref)
    got, want = _weights(killed), _weights(reference)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)
