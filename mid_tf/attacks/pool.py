"""The Attacker Pool: the tasks MID trains on, the per-step meta-train / held-out split, and crafting.

The run's pool is `MIDStageConfig.pool` (mid_tf/config.py; default the official "addclean" MNIST pool).
Every step the pool picks one held-out (meta-test) task uniformly and `num_meta_train` meta-train
tasks (default: all the others), deterministically in (seed, step). Only graph-safe attacks are
allowed (they run inside the training step's `tf.function` and `strategy.run`); CW, SPSA and ART
attacks are refused with a message.

Use in a MID train step (inside tf.function, per replica under strategy.run):

    meta_train_idx, held_out = pool.sample_tf(step)                  # S and u: int32 [k], int32 scalar
    rows = pool.craft_step(source, x, y, step,                        # [k + 1, B, H, W, C], no gradient
                           tf.concat([meta_train_idx, held_out[None]], 0))
    x_meta_train, x_held_out = rows[:-1], rows[-1]

`craft_step` applies the pool's eps warm-up (`eps_warmup_steps`, attacks/warmup.py); `craft_all`
and `craft_tasks` craft at full eps.

`step` may be a Python int or an integer tensor (e.g. `optimizer.iterations`). The sampling does not
depend on the replica, so every replica holds out the same task; the attack seeds fold in the replica
id (auto-detected from the replica context, or `replica_id=`), so replicas draw distinct random
starts and `craft_all(..., replica_id=k)` on shard k eagerly reproduces replica k exactly.
"""

from __future__ import annotations

import tensorflow as tf

from mid_tf.attacks import batched, registry, warmup
from mid_tf.attacks.crafting import make_attack
from mid_tf.attacks.seeds import fold

_SAMPLE_STREAM, _CRAFT_STREAM = 1, 2


class AttackPool:
    """Tasks (registry names/specs), a seed, how many meta-train tasks to draw per step, and the number
    of optimizer steps over which `craft_step` ramps eps from 0 to full (0: no warm-up)."""

    def __init__(self, names, seed: int = 0, num_meta_train: int | None = None,
                 batched_runner: bool | None = None, registry_dict: dict | None = None, eps_warmup_steps: int = 0):
        if isinstance(names, str):
            self.specs = registry.parse_attack_list(names, registry_dict)
        else:
            self.specs = [registry.get_spec(n, registry_dict) for n in names]
        if len(self.specs) < 2:
            raise ValueError(f"a pool needs >= 2 tasks (meta-train + held-out), got {[s.name for s in self.specs]}")
        names_seen = [s.name for s in self.specs]
        if len(set(names_seen)) != len(names_seen):
            raise ValueError(f"duplicate tasks in pool: {names_seen}")
        bad = [s.name for s in self.specs if not s.graph_safe]
        if bad:
            ok = sorted(n for n, s in registry.REGISTRY.items() if s.graph_safe)
            raise ValueError(f"attacks {bad} are eager-only (CW-L2, SPSA and ART attacks cannot run inside the "
                             f"tf.function training step); use them for evaluation. Graph-safe attacks: {ok}")
        k = len(self.specs) - 1 if num_meta_train is None else int(num_meta_train)
        if not 1 <= k <= len(self.specs) - 1:
            raise ValueError(f"num_meta_train must be in [1, {len(self.specs) - 1}] for {len(self.specs)} tasks, got {k}")
        if batched_runner is None:  # on CPU a 4x batch costs about 4x: batch only where a GPU is visible
            batched_runner = bool(tf.config.list_physical_devices("GPU"))
        self.seed, self.num_meta_train, self.batched_runner = int(seed), k, bool(batched_runner)
        self.eps_warmup_steps = int(eps_warmup_steps)
        self._fns = [make_attack(s) for s in self.specs]

    @property
    def names(self) -> tuple:
        return tuple(s.name for s in self.specs)

    @property
    def num_tasks(self) -> int:
        return len(self.specs)

    # ------------------------------------------------------------ sampling
    def sample_tf(self, step):
        """Graph-safe: (meta_train_idx int32 [num_meta_train] sorted, held_out int32 []) from (seed, step)."""
        s = fold(tf.constant([self.seed, _SAMPLE_STREAM], tf.int64), tf.cast(step, tf.int64))
        perm = tf.argsort(tf.random.stateless_uniform([self.num_tasks], s), stable=True)
        perm = tf.cast(perm, tf.int32)
        return tf.sort(perm[1:1 + self.num_meta_train]), perm[0]

    def sample(self, step: int) -> tuple[tuple[int, ...], int]:
        """Eager/Python twin of `sample_tf` (same values): (meta_train indices, held-out index)."""
        mt, ho = self.sample_tf(step)
        return tuple(int(i) for i in mt.numpy()), int(ho.numpy())

    # ------------------------------------------------------------ crafting
    def task_seed(self, step, task_index: int, replica_id=0):
        return fold(tf.constant([self.seed, _CRAFT_STREAM], tf.int64), tf.cast(step, tf.int64),
                    tf.cast(replica_id, tf.int64), task_index)

    def _crafting_inputs(self, model_fn, x, step, replica_id):
        """(images -> logits callable, float32 x, one seed per task) for this step and replica."""
        if replica_id is None:
            ctx = tf.distribute.get_replica_context()
            replica_id = ctx.replica_id_in_sync_group if ctx is not None else 0
        seeds = [self.task_seed(step, i, replica_id) for i in range(self.num_tasks)]
        return as_model_fn(model_fn), tf.convert_to_tensor(x, tf.float32), seeds

    def craft_all(self, model_fn, x, y, step, replica_id=None) -> tf.Tensor:
        """All task inputs stacked: [num_tasks, B, H, W, C] (task order = `names`), no gradient path.

        `model_fn`: callable images -> logits (a Keras model is called with training=False). With
        `batched_runner=True` (default when a GPU is visible) attacks sharing a step count run as one
        batched loop (`batched.py`); otherwise the CleverHans functions run one after the other.
        Both give identical results.
        """
        model_fn, x, seeds = self._crafting_inputs(model_fn, x, step, replica_id)
        out = [None] * self.num_tasks
        groups: dict = {}
        for i, spec in enumerate(self.specs):
            key = batched.batch_key(spec) if self.batched_runner else None
            if spec.method == "clean":
                out[i] = x
            elif key is None:
                out[i] = self._fns[i](model_fn, x, y, seed=seeds[i])
            else:
                groups.setdefault(key, []).append(i)
        for idx in groups.values():
            advs = batched.run_linf_group([self.specs[i] for i in idx], model_fn, x, y, [seeds[i] for i in idx])
            for i, adv in zip(idx, advs):
                out[i] = adv
        return tf.stop_gradient(tf.stack(out, 0))

    def craft_tasks(self, model_fn, x, y, step, indices, replica_id=None) -> tf.Tensor:
        """Only the tasks listed in `indices` (int32 [n], static n, e.g. this step's meta-train tasks and
        its held-out one): [n, B, H, W, C], row j equal to `craft_all(...)[indices[j]]` (same seeds).

        Each row is a `tf.switch_case` over the pool, so only the chosen attacks run: with k meta-train
        tasks out of T, a step crafts k + 1 tasks instead of T (the white-box pool, crafted on the
        student every step, spends most of its time here). Attacks run one by one, not batched.
        """
        model_fn, x, seeds = self._crafting_inputs(model_fn, x, step, replica_id)

        def branch(i):
            if self.specs[i].method == "clean":
                return lambda: tf.identity(x)
            return lambda: tf.convert_to_tensor(self._fns[i](model_fn, x, y, seed=seeds[i]), tf.float32)

        branches = [branch(i) for i in range(self.num_tasks)]
        indices = tf.convert_to_tensor(indices, tf.int32)
        rows = [tf.switch_case(indices[j], branches) for j in range(int(indices.shape[0]))]
        return tf.stop_gradient(tf.stack(rows, 0))

    # ------------------------------------------------------------ one training step's tasks
    def eps_fraction(self, step):
        """r of the eps warm-up at optimizer step `step` (attacks/warmup.py; 1 without warm-up)."""
        return warmup.eps_fraction(step, self.eps_warmup_steps)

    def _warm(self, model_fn, x, step):
        """(model_fn, shrink) for the eps warm-up at `step`: the attack runs on z ↦ model(x + r(z − x)) and its
        result is pulled into the ball of radius r·eps around x (as the baselines' warm-up). Unchanged without."""
        if not self.eps_warmup_steps:
            return model_fn, (lambda t: t)
        r = tf.cast(self.eps_fraction(step), tf.float32)
        x_ref = tf.cast(x, tf.float32)

        def shrink(t):
            return warmup.shrink(x_ref, t, r)

        source = as_model_fn(model_fn)
        return (lambda z: source(shrink(z))), shrink

    def craft_step(self, model_fn, x, y, step, indices, tasks=None) -> tf.Tensor:
        """Rows `indices` (int32 [n], static n) of this step's tasks, in the eps warm-up's ball: [n, B, H, W, C].

        `tasks` [T, B, H, W, C]: all tasks crafted beforehand at full eps (the attack cache); their rows are
        shrunk by the warm-up. Otherwise the listed tasks alone are crafted on the warmed `model_fn` when
        they are fewer than the pool (`craft_tasks`: the others would be thrown away), else all of them
        (`craft_all`, batched where it can be). The clean task stays the clean batch. No gradient path.
        """
        model_fn, shrink = self._warm(model_fn, x, step)
        indices = tf.convert_to_tensor(indices, tf.int32)
        if tasks is None and int(indices.shape[0]) < self.num_tasks:
            return shrink(self.craft_tasks(model_fn, x, y, step, indices))
        if tasks is None:
            tasks = self.craft_all(model_fn, x, y, step)
        return tf.gather(shrink(tf.stop_gradient(tasks)), indices)

    def __repr__(self):
        warm = f", eps_warmup_steps={self.eps_warmup_steps}" if self.eps_warmup_steps else ""
        return f"AttackPool({list(self.names)}, seed={self.seed}, num_meta_train={self.num_meta_train}{warm})"


_FN_CACHE: dict = {}


def as_model_fn(model):
    """A stable images->logits callable. Keras models are wrapped once (training=False) and cached,
    because CleverHans' `compute_gradient` tf.function retraces for every new callable."""
    import keras
    if not isinstance(model, keras.Model):
        return model
    key = id(model)
    hit = _FN_CACHE.get(key)
    if hit is None or hit[0] is not model:
        def logits(z, _m=model):
            return _m(z, training=False)
        _FN_CACHE[key] = hit = (model, logits)
    return hit[1]
