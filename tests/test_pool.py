"""The Attacker Pool: sampling, graph-safe crafting, batched runner == CleverHans, MirroredStrategy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import attack_fixtures as F
from mid_tf.attacks import make_attack
from mid_tf.attacks.pool import AttackPool
from mid_tf.config import MIDStageConfig


@pytest.fixture(scope="session")
def fn():
    return F.model_fn()


@pytest.fixture(scope="session")
def batch():
    return F.test_batch(64)


def test_default_pool_is_official_addclean():
    pool = AttackPool(MIDStageConfig().pool)  # the default lives in the config, once
    assert pool.names == ("clean", "pgd40", "pgd40_t0", "mim40", "mim40_t0")
    assert pool.num_tasks == 5 and pool.num_meta_train == 4 and pool.eps_warmup_steps == 0


def test_sampling_is_deterministic_and_graph_equal():
    pool = AttackPool(MIDStageConfig().pool, seed=1)
    draws = [pool.sample(s) for s in range(200)]
    assert draws == [pool.sample(s) for s in range(200)]
    assert draws != [AttackPool(MIDStageConfig().pool, seed=2).sample(s) for s in range(200)]
    for mt, ho in draws:
        assert ho not in mt and len(mt) == 4 and sorted(set(mt)) == list(mt)
    counts = np.bincount([ho for _, ho in draws], minlength=5)
    assert counts.min() >= 20, counts  # every task gets held out, roughly uniformly
    graph = tf.function(pool.sample_tf)
    for s in (0, 5, 123):
        mt, ho = graph(tf.constant(s, tf.int64))
        assert (tuple(mt.numpy()), int(ho)) == draws[s]


def test_num_meta_train_and_refusals():
    pool = AttackPool(MIDStageConfig().pool, seed=0, num_meta_train=2)
    for s in range(20):
        mt, ho = pool.sample(s)
        assert len(mt) == 2 and ho not in mt
    with pytest.raises(ValueError, match=r"num_meta_train must be in \[1, 4\]"):
        AttackPool(MIDStageConfig().pool, num_meta_train=5)
    with pytest.raises(ValueError, match="eager-only.*Graph-safe attacks: .*pgd40"):
        AttackPool(["clean", "pgd40", "cw_l2"])
    with pytest.raises(ValueError, match="eager-only"):
        AttackPool("pgd40,autoattack")
    with pytest.raises(ValueError, match="duplicate"):
        AttackPool(["pgd40", "pgd40"])
    assert AttackPool("clean,pgd40:nb_iter=5,fgsm").names == ("clean", "pgd40:nb_iter=5", "fgsm")


def assert_same_attacks(got, want):
    """Equal up to float round-off. A sign step can turn a near-zero gradient component the other way
    when the same maths runs at another batch size (4 tasks batched vs one at a time: different matmul
    blocking), moving that pixel by one step; allow that for at most 1 pixel in 10,000."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    off = np.abs(got - want) > 1e-6
    assert off.mean() <= 1e-4, f"{off.sum()} of {off.size} pixels differ (max {np.abs(got - want).max():.3g})"


def test_craft_all_matches_cleverhans_and_tf_function(fn, batch):
    x, y = batch
    pool = AttackPool(MIDStageConfig().pool, seed=4, batched_runner=True)
    tasks = pool.craft_all(fn, x, y, step=3).numpy()
    assert tasks.shape == (5,) + x.shape
    np.testing.assert_array_equal(tasks[0], x)
    ref = np.stack([make_attack(s)(fn, x, y, seed=pool.task_seed(3, i)).numpy() for i, s in enumerate(pool.specs)])
    assert_same_attacks(tasks, ref)   # batched runner == per-attack CleverHans
    seq = AttackPool(MIDStageConfig().pool, seed=4, batched_runner=False).craft_all(fn, x, y, step=3).numpy()
    assert_same_attacks(seq, ref)
    graph = tf.function(lambda a, b, s: pool.craft_all(fn, a, b, s))
    assert_same_attacks(graph(x, y, tf.constant(3, tf.int64)).numpy(), tasks)
    for i in range(1, 5):
        assert np.abs(tasks[i] - x).max() <= 0.3 + 1e-6 and tasks[i].min() >= 0 and tasks[i].max() <= 1
        assert F.accuracy(fn, tasks[i], y) < 0.3, pool.names[i]
    other = pool.craft_all(fn, x, y, step=4).numpy()
    assert np.abs(other[1] - tasks[1]).max() > 1e-3  # PGD random start depends on the step
    np.testing.assert_array_equal(other[3], tasks[3])  # MIM has no randomness


def test_pool_with_a_mixed_group(fn, batch):
    x, y = batch[0][:16], batch[1][:16]
    pool = AttackPool("clean,fgsm,bim40,pgd40,pgd_l2:nb_iter=5", seed=0, num_meta_train=2, batched_runner=True)
    tasks = pool.craft_all(fn, x, y, 0).numpy()
    ref = np.stack([make_attack(s)(fn, x, y, seed=pool.task_seed(0, i)).numpy() for i, s in enumerate(pool.specs)])
    assert_same_attacks(tasks, ref)


def test_craft_tasks_crafts_only_the_chosen_rows_of_craft_all(fn, batch):
    """The MID step crafts only its k + 1 tasks (tf.switch_case): same tensors as craft_all's rows."""
    x, y = batch[0][:16], batch[1][:16]
    pool = AttackPool("clean,fgsm_rs,pgd5,pgd_l2_5,mim10", seed=3, num_meta_train=2, batched_runner=False)
    full = pool.craft_all(fn, x, y, 7).numpy()
    graph = tf.function(lambda a, b, s, i: pool.craft_tasks(fn, a, b, s, i))
    for idx in ([0, 2, 4], [3, 1, 0], [4, 4, 2]):
        got = graph(x, y, tf.constant(7, tf.int64), tf.constant(idx, tf.int32)).numpy()
        assert got.shape == (3,) + x.shape
        assert_same_attacks(got, full[idx])
    np.testing.assert_array_equal(pool.craft_tasks(fn, x, y, 7, [0, 1])[0], x)  # eager, the clean row
    other = graph(x, y, tf.constant(8, tf.int64), tf.constant([2, 2, 2], tf.int32)).numpy()
    assert np.abs(other[0] - full[2]).max() > 1e-3  # the random start follows the step, as in craft_all


def test_mirrored_strategy_matches_eager(tmp_path):
    weights = str(tmp_path / "target.weights.h5")
    F.tiny_target().save_weights(weights)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, MID_DATA_DIR=F.DATA_DIR)
    proc = subprocess.run([sys.executable, os.path.join(repo, "tests", "mirrored_attacks_check.py"), weights],
                          capture_output=True, text=True, timeout=300, env=env, cwd=repo)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["replicas"] == 2
    assert res["pool"] <= 1e-4 and res["pool_seq"] <= 1e-4 and res["pgd"] <= 1e-4, res  # fractions of pixels
    assert res["held_out"] == [res["held_out_eager"]] * 2 and res["meta_train_equal"]
    assert min(res["pool_changed"]) > 0.1


def test_craft_step_takes_the_rows_and_applies_the_eps_warmup():
    """craft_step on precomputed tasks (the attack cache): rows `indices`, pulled toward x by
    r = min(1, (step + 1) / eps_warmup_steps); without warm-up, or once r = 1, the rows themselves."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((4, 28, 28, 1)), tf.float32)
    tasks = tf.constant(rng.random((5, 4, 28, 28, 1)), tf.float32)
    idx = tf.constant([1, 3, 4, 0], tf.int32)
    plain, warm = AttackPool(MIDStageConfig().pool), AttackPool(MIDStageConfig().pool, eps_warmup_steps=4)
    np.testing.assert_array_equal(plain.craft_step(None, x, None, 0, idx, tasks=tasks), tf.gather(tasks, idx))
    for step, r in ((0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)):
        assert float(warm.eps_fraction(tf.constant(step, tf.int64))) == r
        got = warm.craft_step(None, x, None, tf.constant(step, tf.int64), idx, tasks=tasks).numpy()
        want = x.numpy() + r * (tf.gather(tasks, idx).numpy() - x.numpy())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert "eps_warmup_steps=4" in repr(warm) and "eps_warmup" not in repr(plain)
