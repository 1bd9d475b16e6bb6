"""One MID iteration at batch 256 with the official MNIST pool: variants side by side, and the official loop.

    python benchmarks/train_step.py [--data_dir DIR] [--model_dir runs/mnist] [--batch 256] [--iters 3]
        [--variants graph,order1,cache,eager,xla,bf16,mirrored] [--official]

One iteration = the official loop's work (mln66/MID, meta_defense_MNIST_cls_simi_cyc.py lines 193-271):
craft PGD-40 and MIM-40, untargeted and targeted to class 0 (eps 0.3, step 0.01), on the fixed LeNet-5
target for one batch, plus the clean task, then one MID meta update (4 meta-train tasks, 1 held out).
Unlike the official loop our meta update is exact second order and its cyclic term is not zero, so
it does strictly more work than the official one (`--variants order1` shows the first-order cost).

Variants (each printed with img/s and its ratio to `graph`):
  graph     attacks + meta update fused in one tf.function (what `train.py` runs without the cache)
  order1    the same, --meta_order=1
  batched   the graph step with the pool's four 40-step attacks run as one loop on a 4B batch
            (AttackPool(batched_runner=True), the default only when a GPU is visible)
  cache     the meta update alone on precomputed adversarials: the per-step cost with the attack cache
            (--attack_cache_epochs; a different algorithm: attacks reused across epochs)
  eager     attacks and meta update run eagerly (no tf.function)
  xla       the fused step with jit_compile=True
  bf16      Keras 'mixed_bfloat16' policy (only if the CPU has AVX512_BF16 or AMX), exact second order;
            with --model_dir it also crafts the four attacks in float32 and bfloat16 on the same
            images with the trained target and prints both success rates
  bf16_order1  the same with --meta_order=1
  mirrored  MirroredStrategy over 2 logical CPU devices, 128 images per replica
  stock     the graph step traced with TF's stock kernels (models/xla_kernels.stock_ops(): oneDNN
            MaxPool/MaxPoolGrad and 1-channel conv instead of the compiled ones), attacks timed too
  compiled  the same with the compiled kernels forced on (xla_kernels.compiled_ops()). `graph` uses this
            CPU's default (MID_TF_XLA_KERNELS=auto: compiled only without AVX-512), printed at the top
For `graph` it splits the time into attack generation and meta update (each timed alone in its own
tf.function) and prints achieved GFLOP/s against a float32 2048x2048 matmul measured in this run.

FLOP counting: TensorFlow's graph profiler (`float_operation`: Conv2D, Conv2DBackpropInput/Filter,
MatMul, element-wise ops) on traced graphs with static shapes, pruned to what the outputs and side
effects need (the ops TF actually runs), traced with the stock kernels (the compiled ones are the
same maths inside function calls the profiler does not look into): (a) one attack step = target logits
+ input gradient at batch B, times 40 steps x 4 attacks (the while loop body is not seen by the
profiler, so we count one step and multiply); (b) the whole meta-update graph (no loops).
With --official it then runs the official harness (../shared/tools/official_mid_timing, PyTorch,
2 threads) on this machine, after the TF variants, and prints the ratio of img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POOL = ("clean", "pgd40", "pgd40_t0", "mim40", "mim40_t0")
OFFICIAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "tools",
                            "official_mid_timing")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fn, iters: int, warmup: int = 1) -> float:
    """Median seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def graph_flops(concrete) -> float:
    """Float operations of a traced graph (TF's registered `flops` statistics, as its profiler; needs
    static shapes), counting only the ops its outputs and side effects depend on: TF prunes the rest
    before running (e.g. the weight gradients a GradientTape builds but an attack never asks for), so
    they must not be counted."""
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops
    graph = concrete.graph
    dest = sorted({t.op.name for t in concrete.outputs} | {op.name for op in graph.control_outputs})
    live = tf.compat.v1.graph_util.extract_sub_graph(graph.as_graph_def(), dest)
    total = 0
    for node in live.node:
        try:
            stats = tf_ops.get_stats_for_node_def(graph, graph.get_operation_by_name(node.name).node_def, "flops")
        except (ValueError, KeyError):  # no statistics registered / unknown shape: not a float op we count
            continue
        total += stats.value or 0
    return float(total)


def matmul_peak(tf, dtype, n: int = 2048, iters: int = 10) -> float:
    a = tf.random.uniform((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    mm = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
    sec = min(timeit(lambda: mm().numpy(), 3) for _ in range(iters // 3 + 1))
    return 2 * n ** 3 / sec / 1e9


def pool_names(attack_steps: int = 40) -> tuple:
    """The official pool, its attacks cut to `attack_steps` steps (40 = the official pool; the smoke test uses
    fewer: the attacks are unrolled, and tracing 4 x 40 steps dominated its run time on a 2-core CPU)."""
    return POOL if attack_steps == 40 else tuple(n if n == "clean" else f"{n}:nb_iter={attack_steps}" for n in POOL)


def build_mid(tf, keras, model_dir, meta_order: int, seed: int = 0, batched_runner=None, attack_steps: int = 40):
    from mid_tf.artifacts import load_models
    from mid_tf.attacks.pool import AttackPool
    from mid_tf.models import build_models
    from mid_tf.training.meta import MetaConfig, MetaInvarianceDefense
    models = load_models(model_dir, ("target", "teacher")) if model_dir else build_models("mnist")
    pool = AttackPool(pool_names(attack_steps), seed=seed, batched_runner=batched_runner)
    mid = MetaInvarianceDefense(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                                decoder=models.decoder, classifier=models.classifier, target=models.target,
                                pool=pool, config=MetaConfig(meta_order=meta_order), name="mid")
    mid.compile(optimizer=keras.optimizers.Adam(1e-4, beta_1=0.9, beta_2=0.99))
    mid.optimizer.build(mid.student_encoder.trainable_variables)
    return mid


def run_official(batch: int) -> dict | None:
    """The official harness's JSON line, or None (with the reason printed) if it cannot run."""
    venv = os.environ.get("OFFICIAL_VENV", "/tmp/official_venv")
    py = os.path.join(venv, "bin", "python")
    here = os.path.abspath(OFFICIAL_DIR)
    if not os.path.exists(os.path.join(here, "train_timing.py")):
        print(f"official harness not found at {here}")
        return None
    if not os.path.exists(py):
        print(f"building the official harness venv at {venv} (set OFFICIAL_VENV to reuse one) ...", flush=True)
        r = subprocess.run(["bash", "setup.sh"], cwd=here, env={**os.environ, "VENV": venv})
        if r.returncode:
            print("official harness setup failed")
            return None
    r = subprocess.run([py, "train_timing.py", "--kl", "legacy", "--threads", "2", "--warmup", "1", "--iters", "4",
                        "--batch", str(batch)], cwd=here, capture_output=True, text=True)
    if r.returncode:
        print("official harness failed:\n" + r.stderr[-2000:])
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.environ.get("MID_DATA_DIR"),
                   help="MNIST IDX directory; without it the benchmark uses uniform random images")
    p.add_argument("--model_dir", default=None, help="a train.py model_dir with target+teacher (else random init)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant (median)")
    p.add_argument("--attack_steps", type=int, default=40,
                   help="steps of each pool attack (40 = the official pool; fewer only for smoke tests)")
    p.add_argument("--variants",
                   default="graph,order1,batched,cache,eager,xla,bf16,bf16_order1,mirrored,stock,compiled")
    p.add_argument("--official", action="store_true", help="also run the official PyTorch loop and print the ratio")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - {"graph", "order1", "batched", "cache", "eager", "xla", "bf16", "bf16_order1", "mirrored",
                               "stock", "compiled"}
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    if "graph" not in variants:
        variants.insert(0, "graph")
    if "mirrored" in variants and a.batch % 2:
        p.error("--batch must be even for the mirrored variant")
    if a.attack_steps < 1:
        p.error(f"--attack_steps must be >= 1, got {a.attack_steps}")

    import tensorflow as tf
    if "mirrored" in variants:
        from mid_tf.training.distribute import configure_logical_cpus
        configure_logical_cpus(2)
    import keras
    from mid_tf.training.precision import native_bfloat16
    bf16_native, bf16_why = native_bfloat16()

    print(f"cpu: {cpu_model()}  cores: {os.cpu_count()}  tensorflow {tf.__version__}  keras {keras.__version__}  "
          f"batch {a.batch}  native bfloat16: {bf16_native}  weights: {a.model_dir or 'random init'}")
    from mid_tf.models import xla_kernels
    print(f"default kernels (graph row): {xla_kernels.describe()}")
    if a.data_dir:
        from mid_tf.data.datasets import load_split
        split = load_split("mnist", "train", a.data_dir, limit=a.batch)
        x = tf.constant(split.images.astype(np.float32) / 255.0)
        y = tf.constant(split.labels.astype(np.int32))
    else:
        x = tf.random.stateless_uniform((a.batch, 28, 28, 1), [0, 1])
        y = tf.random.stateless_uniform((a.batch,), [0, 2], 0, 10, tf.int32)
    step = tf.constant(1, tf.int64)

    peak32 = matmul_peak(tf, tf.float32)
    print(f"float32 2048x2048 matmul: {peak32:.0f} GFLOP/s")
    results = {}

    # ---- graph: fused step, and its split
    mid = build_mid(tf, keras, a.model_dir, 2, attack_steps=a.attack_steps)
    craft = tf.function(lambda: mid.pool.craft_all(mid.target, x, y, step))
    tasks = tf.transpose(craft(), [1, 0, 2, 3, 4])  # [B, T, ...] as the cache feeds it
    fused = tf.function(lambda: mid.train_step((x, y)))
    meta_only = tf.function(lambda: mid.train_step((x, y, tasks)))
    t_total = timeit(lambda: fused()["loss"].numpy(), a.iters)
    t_attack = timeit(lambda: craft().numpy(), a.iters)
    t_meta = timeit(lambda: meta_only()["loss"].numpy(), a.iters)
    results["graph"] = t_total

    # FLOPs: one attack step (logits + input gradient) x 40 steps x 4 attacks; the meta graph whole.
    def attack_step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, mid.target(z, training=False)))
        return tape.gradient(loss, z)
    with xla_kernels.stock_ops():  # same maths; the compiled kernels hide their ops inside function calls
        step_flops = graph_flops(tf.function(attack_step).get_concrete_function(tf.TensorSpec(x.shape, tf.float32)))
        meta_flops = graph_flops(tf.function(lambda: mid.train_step((x, y, tasks))).get_concrete_function())
    attack_flops = step_flops * a.attack_steps * 4
    print(f"\nFLOPs per iteration: attacks {attack_flops / 1e9:.1f} G (one step {step_flops / 1e6:.0f} M x {a.attack_steps} x 4), "
          f"meta update {meta_flops / 1e9:.1f} G")
    print(f"\n{'variant':11s} {'s/iter':>8s} {'img/s':>8s} {'vs graph':>9s}  notes")

    def row(name, sec, note=""):
        print(f"{name:11s} {sec:8.3f} {a.batch / sec:8.1f} {t_total / sec:8.2f}x  {note}", flush=True)

    row("graph", t_total, f"attacks {t_attack:.3f} s ({attack_flops / t_attack / 1e9:.0f} GFLOP/s = "
        f"{attack_flops / t_attack / 1e9 / peak32:.0%} of matmul peak) + meta {t_meta:.3f} s "
        f"({meta_flops / t_meta / 1e9:.0f} GFLOP/s); fused total {(attack_flops + meta_flops) / t_total / 1e9:.0f} GFLOP/s")

    # The same fused step traced with each kernel choice forced (models/xla_kernels.py), attacks timed alone too.
    kernel_choices = {"stock": (xla_kernels.stock_ops, "TF's stock kernels"),
                      "compiled": (xla_kernels.compiled_ops, "compiled kernels forced on")}
    for name, (switch, label) in kernel_choices.items():
        if name not in variants:
            continue
        with switch():
            midk = build_mid(tf, keras, a.model_dir, 2, attack_steps=a.attack_steps)
            fk = tf.function(lambda: midk.train_step((x, y)))  # timed below, before the next choice rebinds midk
            ck = tf.function(lambda: midk.pool.craft_all(midk.target, x, y, step))
            fk.get_concrete_function(), ck.get_concrete_function()  # trace under the switch
        results[name] = timeit(lambda: fk()["loss"].numpy(), a.iters)
        tk = timeit(lambda: ck().numpy(), a.iters)
        row(name, results[name], f"{label}: attacks {tk:.3f} s ({attack_flops / tk / 1e9:.0f} GFLOP/s = "
            f"{attack_flops / tk / 1e9 / peak32:.0%} of peak), {tk / t_attack:.2f}x the default's attack time")
    if "order1" in variants:
        mid1 = build_mid(tf, keras, a.model_dir, 1, attack_steps=a.attack_steps)
        f1 = tf.function(lambda: mid1.train_step((x, y)))
        m1 = tf.function(lambda: mid1.train_step((x, y, tasks)))
        results["order1"] = timeit(lambda: f1()["loss"].numpy(), a.iters)
        row("order1", results["order1"], f"meta update alone {timeit(lambda: m1()['loss'].numpy(), a.iters):.3f} s")
    if "batched" in variants:
        midb4 = build_mid(tf, keras, a.model_dir, 2, batched_runner=True, attack_steps=a.attack_steps)
        fb4 = tf.function(lambda: midb4.train_step((x, y)))
        results["batched"] = timeit(lambda: fb4()["loss"].numpy(), a.iters)
        row("batched", results["batched"], "attacks as one 4x batch loop (same results up to round-off)")
    if "cache" in variants:
        results["cache"] = t_meta
        row("cache", t_meta, "meta update only: adversarials from the attack cache (not identical work)")
    if "eager" in variants:
        results["eager"] = timeit(lambda: mid.train_step((x, y))["loss"].numpy(), 1, warmup=0)
        row("eager", results["eager"], "no tf.function (1 iteration)")
    if "xla" in variants:
        try:
            fx = tf.function(lambda: mid.train_step((x, y)), jit_compile=True)
            results["xla"] = timeit(lambda: fx()["loss"].numpy(), a.iters)
            row("xla", results["xla"], "jit_compile=True")
        except Exception as e:  # report, keep going: XLA support differs by op and platform
            print(f"{'xla':11s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
    bf16_variants = [v for v in ("bf16", "bf16_order1") if v in variants]
    if bf16_variants and not bf16_native:
        print(f"{'bf16':11s} skipped: {bf16_why}")
    elif bf16_variants:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            if "bf16" in variants:
                midb = build_mid(tf, keras, a.model_dir, 2, attack_steps=a.attack_steps)
                fb = tf.function(lambda: midb.train_step((x, y)))
                cb = tf.function(lambda: midb.pool.craft_all(midb.target, x, y, step))
                results["bf16"] = timeit(lambda: fb()["loss"].numpy(), a.iters)
                tb = timeit(lambda: cb().numpy(), a.iters)
                note = (f"attacks {tb:.3f} s ({attack_flops / tb / 1e9:.0f} GFLOP/s), peak bf16 matmul "
                        f"{matmul_peak(tf, tf.bfloat16):.0f} GFLOP/s")
                if a.model_dir:
                    def success(tasks_, model):
                        preds = [np.argmax(model(tasks_[i], training=False).numpy(), -1) for i in range(1, 5)]
                        yy = y.numpy()
                        return [float(np.mean(preds[0] != yy)), float(np.mean(preds[1] == 0)),
                                float(np.mean(preds[2] != yy)), float(np.mean(preds[3] == 0))]
                    s32 = success(craft().numpy(), mid.target)
                    s16 = success(cb().numpy(), mid.target)  # both scored by the float32 target
                    note += ("; success (pgd40, pgd40_t0 hit 0, mim40, mim40_t0 hit 0) float32 "
                             + "/".join(f"{v:.1%}" for v in s32) + " vs bf16 " + "/".join(f"{v:.1%}" for v in s16))
                row("bf16", results["bf16"], note)
            if "bf16_order1" in variants:
                midb1 = build_mid(tf, keras, a.model_dir, 1, attack_steps=a.attack_steps)
                fb1 = tf.function(lambda: midb1.train_step((x, y)))
                results["bf16_order1"] = timeit(lambda: fb1()["loss"].numpy(), a.iters)
                row("bf16_order1", results["bf16_order1"], "mixed_bfloat16, --meta_order=1")
        finally:
            keras.mixed_precision.set_global_policy("float32")
    if "mirrored" in variants:
        from mid_tf.training.distribute import make_strategy
        strategy = make_strategy("mirrored")
        with strategy.scope():
            midm = build_mid(tf, keras, a.model_dir, 2, attack_steps=a.attack_steps)
        ds = tf.data.Dataset.from_tensors((x, y)).repeat().unbatch().batch(a.batch)
        it = iter(strategy.experimental_distribute_dataset(ds))
        fm = tf.function(lambda: strategy.run(midm.train_step, args=(next(it),)))
        results["mirrored"] = timeit(lambda: strategy.reduce("mean", fm()["loss"], None).numpy(), a.iters)
        row("mirrored", results["mirrored"], f"{strategy.num_replicas_in_sync} logical CPU replicas")

    if a.official:
        print("\nofficial loop (PyTorch harness, 2 threads, real MNIST) ...", flush=True)
        off = run_official(a.batch)
        if off:
            notes = {"graph": "float32, exact second order: more work than the official loop",
                     "order1": "float32, first order: the official loop's work (same attacks; meta-train "
                               "and meta-test passes, no second-order term)",
                     "batched": "float32, second order, attacks as one 4x batch",
                     "bf16": "mixed bfloat16, second order", "bf16_order1": "mixed bfloat16, first order",
                     "cache": "meta update only, attacks from the cache: not the same work",
                     "stock": "float32, second order, TF's stock kernels (no compiled pooling/conv)",
                     "compiled": "float32, second order, compiled pooling/conv kernels forced on"}
            print(f"official: {off['median_total_s']:.3f} s/iter = {off['images_per_s']:.1f} img/s "
                  f"(attacks {off['median_attack_s']:.3f} s, meta {off['median_meta_s']:.3f} s)")
            ratios = {v: a.batch / results[v] / off["images_per_s"] for v in notes if v in results}
            for v, r in ratios.items():
                print(f"ratio mid_tf {v:11s} / official = {r:5.2f}x  ({notes[v]})")
            print(f"attack loop: {attack_flops / t_attack / 1e9 / peak32:.0%} of the float32 matmul peak "
                  f"(target >= 60%)")
            if "order1" in ratios:
                print(f"target float32 >= 3x with the official loop's work: {ratios['order1']:.2f}x "
                      f"{'met' if ratios['order1'] >= 3 else 'NOT met'}")
            best16 = max((ratios[v] for v in ("bf16", "bf16_order1") if v in ratios), default=None)
            if best16 is not None:
                print(f"target bfloat16 >= 5x: {best16:.2f}x {'met' if best16 >= 5 else 'NOT met'} "
                      f"(attack strength: see the bf16 row's success rates, needs --model_dir)")
    return results


if __name__ == "__main__":
    main()
