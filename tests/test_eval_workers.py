"""Several processes share one evaluation (--eval_workers): memo writes merge, a piece held by a live
worker is awaited, one held by a dead worker is taken over, a helper leaves held pieces to others."""

import json
import os
import subprocess
import sys
import threading
import time

import attack_fixtures as F
import pytest

from mid_tf.config import BaselineConfig, MIDStageConfig, RunConfig
from mid_tf.evaluation.memo import ReportMemo, _holder
from mid_tf.evaluation.report import ReportInput, build_report
from mid_tf.evaluation.scheduler import helper_command

POOL = ("clean", "pgd10", "pgd10_t0", "mim10", "mim10_t0")
QUICK = "pgd40:nb_iter=3,eps_iter=0.1"


@pytest.fixture
def sleeper():
    """A live process standing for another worker (killed by the test or at teardown; it must outlive a slow run)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    yield p
    p.kill()
    p.wait()


def _hold(memo: ReportMemo, key: str, pid: int) -> None:
    os.makedirs(memo.claims_dir, exist_ok=True)
    with open(memo._claim_path(key), "w") as f:
        json.dump(_holder(pid), f)


def test_memo_writes_of_two_workers_merge(tmp_path):
    path = str(tmp_path / "memo.json")
    a, b = ReportMemo(path), ReportMemo(path)
    a.put("k1", 1)
    b.put("k2", 2)  # b never read k1: a plain rewrite would drop it
    assert ReportMemo(path).entries == {"k1": 1, "k2": 2}
    b.refresh()
    assert b.get("k1") == 1


def test_claims_exclude_a_live_holder_and_expire_with_it(tmp_path, sleeper):
    memo = ReportMemo(str(tmp_path / "memo.json"))
    assert memo.claim("mine") and not memo.holder_alive("mine")  # held by this process only
    _hold(memo, "k", sleeper.pid)
    assert memo.holder_alive("k") and not memo.claim("k")
    stale = dict(_holder(sleeper.pid), start="1")  # same pid, another process start: a reused pid
    with open(memo._claim_path("k"), "w") as f:
        json.dump(stale, f)
    assert not memo.holder_alive("k") and memo.claim("k")
    _hold(memo, "k2", sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert not memo.holder_alive("k2") and memo.claim("k2")
    ReportMemo(memo.path).put("k3", 0.5)  # finished by another worker since this one read the file
    assert not memo.claim("k3") and memo.get("k3") == 0.5
    assert ReportMemo(None).claim("anything")  # memo off: every piece is this process's


@pytest.fixture(scope="module")
def two_models():
    target = F.tiny_target()
    other = F.train_target(width=0.25, train_examples=2000, seed=1)
    x, y = F.test_batch(128)
    return {"target": target, "other": other}, x[:32], y[:32]


def _spec(models, x, y) -> ReportInput:
    return ReportInput(models, x, y, attacks=["fgsm"], whitebox_attacks=["fgsm", QUICK], pool=POOL, eps_sweep=(0.3,))


def _keys(path, kind, model):
    with open(path) as f:
        return {json.loads(k)[1]: k for k in json.load(f) if json.loads(k)[0] == kind and json.loads(k)[4] == model}


def test_a_worker_awaits_pieces_another_holds_and_takes_over_when_it_dies(two_models, tmp_path, sleeper):
    models, x, y = two_models
    ref_path = str(tmp_path / "ref.json")
    spec = _spec(models, x, y)
    fresh, _ = build_report(spec, memo=ReportMemo(ref_path), progress=False)
    held = _keys(ref_path, "whitebox", "other")
    assert set(held) == {"fgsm", QUICK}
    memo = ReportMemo(str(tmp_path / "memo.json"))
    for key in held.values():
        _hold(memo, key, sleeper.pid)
    lines, out = [], {}

    def worker():
        out["report"], _ = build_report(spec, memo=memo, poll_s=0.05, log=lines.append, progress=True)

    t = threading.Thread(target=worker)
    t.start()
    deadline = time.time() + 900  # generous: a loaded CI machine crafts the earlier pieces slowly; the loop exits as soon as both are seen
    while sum("another worker is on it" in s for s in lines) < 2 and time.time() < deadline and t.is_alive():
        time.sleep(0.05)
    assert sum("another worker is on it" in s for s in lines) == 2, lines
    assert t.is_alive()  # waiting for the two held pieces
    ReportMemo(memo.path).put(held["fgsm"], 0.123)  # the other worker delivers one piece, then dies
    sleeper.kill()
    sleeper.wait()
    t.join(900)
    assert not t.is_alive()
    report = out["report"]
    assert report["whitebox"]["fgsm"]["other"] == 0.123  # taken from the memo, not recrafted
    assert any("its worker stopped" in s and "pgd40" in s for s in lines), lines
    assert report["whitebox"]["pgd40"]["other"] == fresh["whitebox"]["pgd40"]["other"]
    for key in ("clean", "transfer", "eps_sweep", "zero_gradient_fraction"):
        assert report[key] == fresh[key], key
    assert not os.path.exists(memo._claim_path(held[QUICK]))  # the taken-over claim is released


def test_a_helper_leaves_held_pieces_to_the_others(two_models, tmp_path, sleeper):
    models, x, y = two_models
    ref_path = str(tmp_path / "ref.json")
    spec = _spec(models, x, y)
    build_report(spec, memo=ReportMemo(ref_path), progress=False)
    key = _keys(ref_path, "whitebox", "other")[QUICK]
    memo = ReportMemo(str(tmp_path / "memo.json"))
    _hold(memo, key, sleeper.pid)
    report, _ = build_report(spec, memo=memo, wait=False, progress=False)
    assert report is None
    with open(ref_path) as f:
        assert set(ReportMemo(memo.path).entries) == set(json.load(f)) - {key}  # everything else is done


def test_helper_configuration_round_trips_through_json():
    cfg = RunConfig(model_dir="m", stages=("eval",), eval_attacks=("fgsm", QUICK), eval_workers=3,
                    mid=MIDStageConfig(pool="clean,fgsm"), baseline=BaselineConfig(eps_warmup_epochs=0.5))
    assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_helpers_start_through_the_entry_point_which_refuses_a_main_configuration(tmp_path):
    from mid_tf.kernels import xla
    previous = xla.configure("off")
    try:  # the helper traces the kernels its main process chose
        assert helper_command("h.json") == [sys.executable, "-m", "mid_tf.cli.eval_helper", "--config=h.json",
                                            "--xla_kernels=off"]
    finally:
        xla.configure(previous)
    path = tmp_path / "helper-config.json"
    path.write_text(json.dumps(RunConfig(model_dir=str(tmp_path), stages=("eval",)).to_json()))
    done = subprocess.run(helper_command(str(path)), capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 2 and "not a helper configuration" in done.stderr, done.stderr[-2000:]
