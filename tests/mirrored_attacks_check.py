"""Run in a subprocess by tests/test_pool.py: pool attacks under MirroredStrategy over 2 logical CPUs.

Logical devices must be configured before TensorFlow initialises, so this cannot share the pytest
process. Usage: python tests/mirrored_attacks_check.py WEIGHTS.h5 -> prints one JSON line with the
max |strategy.run result - eager result on the same shard| per check.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack_fixtures as F  # noqa: E402
from mid_tf.attacks import make_attack  # noqa: E402
from mid_tf.attacks.pool import AttackPool  # noqa: E402
from mid_tf.models.factory import build_models  # noqa: E402


def main(weights):
    strategy = tf.distribute.MirroredStrategy()
    model = build_models("mnist", width=0.25).target
    model.load_weights(weights)
    fn = lambda z: model(z, training=False)  # noqa: E731
    x, y = F.test_batch(64)
    half = len(x) // 2
    # The official pool's shape (clean, PGD and MIM, untargeted and targeted) with 10-step attacks: the
    # same code paths as the 40-step ones at a quarter of the unrolled graph (this check took ~2 min with 40).
    names = ("clean", "pgd10", "pgd10_t0", "mim10", "mim10_t0")
    pool = AttackPool(names, seed=3, batched_runner=True)
    seq_pool = AttackPool(names, seed=3, batched_runner=False)
    pgd = make_attack("pgd10")
    shard = lambda a: strategy.experimental_distribute_values_from_function(  # noqa: E731
        lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * half:(ctx.replica_id_in_sync_group + 1) * half]))
    xs, ys = shard(x), shard(y)

    @tf.function
    def step(xb, yb, s):
        def replica(xr, yr):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            tasks = tf.stack([pool.craft_all(fn, xr, yr, s), seq_pool.craft_all(fn, xr, yr, s)])
            mt, ho = pool.sample_tf(s)
            adv = pgd(fn, xr, yr, seed=tf.stack([tf.cast(s, tf.int64), tf.cast(rid, tf.int64)]))
            return tasks, ho, mt, adv
        return strategy.run(replica, args=(xb, yb))

    s = 7
    tasks, ho, mt, adv = step(xs, ys, tf.constant(s, tf.int64))
    out = {"replicas": strategy.num_replicas_in_sync, "pool": 0.0, "pool_seq": 0.0, "pgd": 0.0}
    # Fraction of pixels more than 1e-6 apart: a sign step may flip a near-zero gradient component when
    # the same maths runs at another batch size (the per-replica shard vs the eager call).
    off = lambda a, b: float(np.mean(np.abs(a - b) > 1e-6))  # noqa: E731
    locals_ = [strategy.experimental_local_results(v) for v in (tasks, ho, mt, adv)]
    eager_mt, eager_ho = pool.sample(s)
    out["held_out"] = [int(h) for h in locals_[1]]
    out["held_out_eager"] = eager_ho
    out["meta_train_equal"] = all(tuple(int(i) for i in m.numpy()) == eager_mt for m in locals_[2])
    for k in range(strategy.num_replicas_in_sync):
        xk, yk = x[k * half:(k + 1) * half], y[k * half:(k + 1) * half]
        ref = pool.craft_all(fn, xk, yk, s, replica_id=k).numpy()
        both = locals_[0][k].numpy()
        out["pool"] = max(out["pool"], off(both[0], ref))
        out["pool_seq"] = max(out["pool_seq"], off(both[1], ref))
        ref_pgd = pgd(fn, xk, yk, seed=tf.constant([s, k], tf.int64)).numpy()
        out["pgd"] = max(out["pgd"], off(locals_[3][k].numpy(), ref_pgd))
        out.setdefault("pool_changed", []).append(float(np.abs(ref[1] - xk).max()))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
