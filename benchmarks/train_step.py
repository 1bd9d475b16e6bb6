"""One MID iteration at batch 256 with the official MNIST pool: variants side by side, and the official loop.

    python benchmarks/train_step.py [--data_dir=DIR] [--model_dir=runs/mnist] [--batch=256] [--iters=3]
        [--variants=graph,order1,cache,eager,xla,bf16,mirrored] [--official] [--xla_kernels=auto]
    python benchmarks/train_step.py --dataset=cifar10 --width=0.25 --batch=128 --variants=order1,cache,bf16_order1

`--dataset=cifar10`: the same iteration on the ResNet family (32x32x3, `--width` as train.py's) with the pool
in the 32x32 RGB threat model (8/255, steps of 2/255; mid_tf/attacks/registry.py), on random images, or on the
first `--batch` images of an image folder given by --data_dir (configs/cifar10.flags' data).

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
  stock     the graph step traced with TF's stock kernels (kernels/xla.py `stock_ops()`: oneDNN
            MaxPool/MaxPoolGrad and 1-channel conv instead of the compiled ones), attacks timed too
  compiled  the same with the compiled kernels forced on (`xla.compiled_ops()`). `graph` uses the
            `--xla_kernels` choice (default auto: compiled only without AVX-512), printed at the top
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

import dataclasses
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FLAGS, configure_xla_kernels, define_xla_kernels_flag, fail, parse_flags, run_official  # noqa: E402
from mid_tf.config import OFFICIAL_POOL  # noqa: E402

POOL = tuple(OFFICIAL_POOL.split(","))
VARIANTS = ("graph", "order1", "batched", "cache", "eager", "xla", "bf16", "bf16_order1", "mirrored", "stock",
            "compiled")

flags.DEFINE_string("data_dir", os.environ.get("MID_DATA_DIR"),
                    "MNIST IDX directory; without it the benchmark uses uniform random images")
flags.DEFINE_string("model_dir", None, "a train.py model_dir with target+teacher (else random init)")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "cifar10"], "mnist: LeNet-5, 28x28x1; cifar10: the ResNet family, "
                  "32x32x3, RGB threat model")
flags.DEFINE_float("width", 1.0, "channel multiplier of the networks (cifar10; train.py's --width)", lower_bound=0.01)
flags.DEFINE_integer("batch", 256, "images per iteration", lower_bound=1)
flags.DEFINE_integer("iters", 3, "timed iterations per variant (median)", lower_bound=1)
flags.DEFINE_integer("attack_steps", 40, "steps of each pool attack (40 = the official pool; fewer only for smoke "
                     "tests)", lower_bound=1)
flags.DEFINE_list("variants", list(VARIANTS), "variants to run (graph always runs): " + ",".join(VARIANTS))
flags.DEFINE_bool("official", False, "also run the official PyTorch loop and print the ratio")
define_xla_kernels_flag()


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
    fewer: the attacks are unrolled, and tracing 4 x 40 steps would dominate its run time)."""
    return POOL if attack_steps == 40 else tuple(n if n == "clean" else f"{n}:nb_iter={attack_steps}" for n in POOL)


def build_mid(tf, keras, model_dir, meta_order: int, seed: int = 0, batched_runner=None, attack_steps: int = 40):
    from mid_tf.artifacts import load_models
    from mid_tf.attacks.pool import AttackPool
    from mid_tf.models import build_models
    from mid_tf.config import MIDStageConfig
    from mid_tf.training.meta import MetaInvarianceDefense
    models = (load_models(model_dir, ("target", "teacher")) if model_dir
              else build_models(FLAGS.dataset, width=FLAGS.width if FLAGS.dataset == "cifar10" else 1.0))
    pool = AttackPool(pool_names(attack_steps), seed=seed, batched_runner=batched_runner)
    mid = MetaInvarianceDefense(student_encoder=models.student_encoder, teacher_encoder=models.teacher_encoder,
                                decoder=models.decoder, classifier=models.classifier, target=models.target,
                                pool=pool, config=MIDStageConfig(meta_order=meta_order), name="mid")
    mid.compile(optimizer=keras.optimizers.Adam(1e-4, beta_1=0.9, beta_2=0.99))
    mid.optimizer.build(mid.student_encoder.trainable_variables)
    return mid


@dataclasses.dataclass
class Bench:
    """One run's inputs and what the variants share: the `graph` row's time, its attack time and FLOPs."""
    tf: object
    keras: object
    x: object
    y: object
    step: object
    peak32: float
    results: dict = dataclasses.field(default_factory=dict)
    mid: object = None
    craft: object = None
    tasks: object = None
    t_total: float = 0.0
    t_attack: float = 0.0
    attack_flops: float = 0.0

    def build(self, meta_order: int = 2, batched_runner=None):
        return build_mid(self.tf, self.keras, FLAGS.model_dir, meta_order, batched_runner=batched_runner,
                         attack_steps=FLAGS.attack_steps)

    def time(self, fn, iters: int | None = None, warmup: int = 1) -> float:
        return timeit(fn, FLAGS.iters if iters is None else iters, warmup)

    def row(self, name, sec, note=""):
        self.results[name] = sec
        print(f"{name:11s} {sec:8.3f} {FLAGS.batch / sec:8.1f} {self.t_total / sec:8.2f}x  {note}", flush=True)


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments: {argv[1:]}")
    variants = [v.strip() for v in FLAGS.variants if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        return fail(f"--variants: unknown variants {sorted(unknown)}; known: {','.join(VARIANTS)}")
    if "graph" not in variants:
        variants.insert(0, "graph")
    if "mirrored" in variants and FLAGS.batch % 2:
        return fail("--batch must be even for the mirrored variant")
    if FLAGS.official and FLAGS.dataset != "mnist":
        return fail("--official times the official MNIST loop; it needs --dataset=mnist")
    from mid_tf.attacks import registry
    with registry.threat_model(registry.threat_model_for(FLAGS.dataset)) as threat:
        bench = setup(variants)
        print(f"threat model {threat.describe()}")
        graph_row(bench)
        kernel_rows(bench, variants)
        float32_rows(bench, variants)
        bf16_rows(bench, variants)
        if "mirrored" in variants:
            mirrored_row(bench)
        if FLAGS.official:
            official_comparison(bench)
    return 0


def setup(variants) -> Bench:
    """TensorFlow (with 2 logical CPUs for `mirrored`), the kernel choice, the batch and the matmul peak."""
    import tensorflow as tf
    if "mirrored" in variants:
        from mid_tf.training.distribute import configure_logical_cpus
        configure_logical_cpus(2)
    import keras
    from mid_tf.training.precision import native_bfloat16
    bf16_native, _ = native_bfloat16()
    print(f"cpu: {cpu_model()}  cores: {os.cpu_count()}  tensorflow {tf.__version__}  keras {keras.__version__}  "
          f"dataset {FLAGS.dataset} (width {FLAGS.width if FLAGS.dataset == 'cifar10' else 1.0})  batch {FLAGS.batch}  native bfloat16: {bf16_native}  weights: {FLAGS.model_dir or 'random init'}")
    print(f"default kernels (graph row): {configure_xla_kernels()}")
    shape = (28, 28, 1) if FLAGS.dataset == "mnist" else (32, 32, 3)
    if FLAGS.data_dir:
        from mid_tf.data.datasets import load_split
        name = "mnist" if FLAGS.dataset == "mnist" else "image_folder"
        split = load_split(name, "train", FLAGS.data_dir, limit=FLAGS.batch)
        x = tf.constant(split.images.astype(np.float32) / 255.0)
        y = tf.constant(split.labels.astype(np.int32))
    else:
        x = tf.random.stateless_uniform((FLAGS.batch, *shape), [0, 1])
        y = tf.random.stateless_uniform((FLAGS.batch,), [0, 2], 0, 10, tf.int32)
    peak32 = matmul_peak(tf, tf.float32)
    print(f"float32 2048x2048 matmul: {peak32:.0f} GFLOP/s")
    return Bench(tf, keras, x, y, tf.constant(1, tf.int64), peak32)


def graph_row(b: Bench) -> None:
    """The fused step, its split into attacks and meta update, and their FLOPs (stock kernels traced)."""
    from mid_tf.kernels import xla
    tf, x, y, step = b.tf, b.x, b.y, b.step
    b.mid = mid = b.build()
    b.craft = tf.function(lambda: mid.pool.craft_all(mid.target, x, y, step))
    b.tasks = tasks = tf.transpose(b.craft(), [1, 0, 2, 3, 4])  # [B, T, ...] as the cache feeds it
    fused = tf.function(lambda: mid.train_step((x, y)))
    meta_only = tf.function(lambda: mid.train_step((x, y, tasks)))
    b.t_total = b.time(lambda: fused()["loss"].numpy())
    b.t_attack = b.time(lambda: b.craft().numpy())
    t_meta = b.time(lambda: meta_only()["loss"].numpy())
    b.results["cache_meta"] = t_meta

    # FLOPs: one attack step (logits + input gradient) x steps x 4 attacks; the meta graph whole.
    def attack_step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, mid.target(z, training=False)))
        return tape.gradient(loss, z)
    with xla.stock_ops():  # same maths; the compiled kernels hide their ops inside function calls
        step_flops = graph_flops(tf.function(attack_step).get_concrete_function(tf.TensorSpec(x.shape, tf.float32)))
        meta_flops = graph_flops(tf.function(lambda: mid.train_step((x, y, tasks))).get_concrete_function())
    b.attack_flops = step_flops * FLAGS.attack_steps * 4
    print(f"\nFLOPs per iteration: attacks {b.attack_flops / 1e9:.1f} G (one step {step_flops / 1e6:.0f} M x "
          f"{FLAGS.attack_steps} x 4), meta update {meta_flops / 1e9:.1f} G")
    print(f"\n{'variant':11s} {'s/iter':>8s} {'img/s':>8s} {'vs graph':>9s}  notes")
    gflops = b.attack_flops / b.t_attack / 1e9
    b.row("graph", b.t_total, f"attacks {b.t_attack:.3f} s ({gflops:.0f} GFLOP/s = {gflops / b.peak32:.0%} of matmul "
          f"peak) + meta {t_meta:.3f} s ({meta_flops / t_meta / 1e9:.0f} GFLOP/s); fused total "
          f"{(b.attack_flops + meta_flops) / b.t_total / 1e9:.0f} GFLOP/s")


def kernel_rows(b: Bench, variants) -> None:
    """The same fused step traced with each kernel choice forced (kernels/xla.py), attacks timed alone too."""
    from mid_tf.kernels import xla
    tf, x, y, step = b.tf, b.x, b.y, b.step
    choices = {"stock": (xla.stock_ops, "TF's stock kernels"),
               "compiled": (xla.compiled_ops, "compiled kernels forced on")}
    for name, (switch, label) in choices.items():
        if name not in variants:
            continue
        with switch():
            midk = b.build()
            fk = tf.function(lambda: midk.train_step((x, y)))  # timed below, before the next choice rebinds midk
            ck = tf.function(lambda: midk.pool.craft_all(midk.target, x, y, step))
            fk.get_concrete_function(), ck.get_concrete_function()  # trace under the switch
        sec = b.time(lambda: fk()["loss"].numpy())
        tk = b.time(lambda: ck().numpy())
        b.row(name, sec, f"{label}: attacks {tk:.3f} s ({b.attack_flops / tk / 1e9:.0f} GFLOP/s = "
              f"{b.attack_flops / tk / 1e9 / b.peak32:.0%} of peak), {tk / b.t_attack:.2f}x the default's attack time")


def float32_rows(b: Bench, variants) -> None:
    tf, x, y = b.tf, b.x, b.y
    if "order1" in variants:
        mid1 = b.build(1)
        f1 = tf.function(lambda: mid1.train_step((x, y)))
        m1 = tf.function(lambda: mid1.train_step((x, y, b.tasks)))
        b.row("order1", b.time(lambda: f1()["loss"].numpy()),
              f"meta update alone {b.time(lambda: m1()['loss'].numpy()):.3f} s")
    if "batched" in variants:
        midb4 = b.build(batched_runner=True)
        fb4 = tf.function(lambda: midb4.train_step((x, y)))
        b.row("batched", b.time(lambda: fb4()["loss"].numpy()), "attacks as one 4x batch loop (same results up to "
              "round-off)")
    if "cache" in variants:
        b.row("cache", b.results["cache_meta"], "meta update only: adversarials from the attack cache (not identical "
              "work)")
    if "eager" in variants:
        b.row("eager", b.time(lambda: b.mid.train_step((x, y))["loss"].numpy(), 1, warmup=0),
              "no tf.function (1 iteration)")
    if "xla" in variants:
        try:
            fx = tf.function(lambda: b.mid.train_step((x, y)), jit_compile=True)
            b.row("xla", b.time(lambda: fx()["loss"].numpy()), "jit_compile=True")
        except Exception as e:  # report, keep going: XLA support differs by op and platform
            print(f"{'xla':11s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")


def bf16_rows(b: Bench, variants) -> None:
    from mid_tf.training.precision import native_bfloat16
    tf, keras, x, y = b.tf, b.keras, b.x, b.y
    wanted = [v for v in ("bf16", "bf16_order1") if v in variants]
    native, why = native_bfloat16()
    if wanted and not native:
        print(f"{'bf16':11s} skipped: {why}")
    if not wanted or not native:
        return
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        if "bf16" in variants:
            midb = b.build()
            fb = tf.function(lambda: midb.train_step((x, y)))
            cb = tf.function(lambda: midb.pool.craft_all(midb.target, x, y, b.step))
            sec = b.time(lambda: fb()["loss"].numpy())
            tb = b.time(lambda: cb().numpy())
            note = (f"attacks {tb:.3f} s ({b.attack_flops / tb / 1e9:.0f} GFLOP/s), peak bf16 matmul "
                    f"{matmul_peak(tf, tf.bfloat16):.0f} GFLOP/s")
            if FLAGS.model_dir:
                note += "; success (pgd40, pgd40_t0 hit 0, mim40, mim40_t0 hit 0) " + bf16_success(b, cb)
            b.row("bf16", sec, note)
        if "bf16_order1" in variants:
            midb1 = b.build(1)
            fb1 = tf.function(lambda: midb1.train_step((x, y)))
            b.row("bf16_order1", b.time(lambda: fb1()["loss"].numpy()), "mixed_bfloat16, --meta_order=1")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bf16_success(b: Bench, craft_bf16) -> str:
    """Success rates of the four attacks crafted in float32 and in bfloat16, both scored by the float32 target."""
    def success(tasks_, model):
        preds = [np.argmax(model(tasks_[i], training=False).numpy(), -1) for i in range(1, 5)]
        yy = b.y.numpy()
        return [float(np.mean(preds[0] != yy)), float(np.mean(preds[1] == 0)),
                float(np.mean(preds[2] != yy)), float(np.mean(preds[3] == 0))]
    s32 = success(b.craft().numpy(), b.mid.target)
    s16 = success(craft_bf16().numpy(), b.mid.target)
    return "float32 " + "/".join(f"{v:.1%}" for v in s32) + " vs bf16 " + "/".join(f"{v:.1%}" for v in s16)


def mirrored_row(b: Bench) -> None:
    from mid_tf.training.distribute import make_strategy
    tf = b.tf
    strategy = make_strategy("mirrored")
    with strategy.scope():
        midm = b.build()
    ds = tf.data.Dataset.from_tensors((b.x, b.y)).repeat().unbatch().batch(FLAGS.batch)
    it = iter(strategy.experimental_distribute_dataset(ds))
    fm = tf.function(lambda: strategy.run(midm.train_step, args=(next(it),)))
    b.row("mirrored", b.time(lambda: strategy.reduce("mean", fm()["loss"], None).numpy()),
          f"{strategy.num_replicas_in_sync} logical CPU replicas")


NOTES = {"graph": "float32, exact second order: more work than the official loop",
         "order1": "float32, first order: the official loop's work (same attacks; meta-train "
                   "and meta-test passes, no second-order term)",
         "batched": "float32, second order, attacks as one 4x batch",
         "bf16": "mixed bfloat16, second order", "bf16_order1": "mixed bfloat16, first order",
         "cache": "meta update only, attacks from the cache: not the same work",
         "stock": "float32, second order, TF's stock kernels (no compiled pooling/conv)",
         "compiled": "float32, second order, compiled pooling/conv kernels forced on"}


def official_comparison(b: Bench) -> None:
    print("\nofficial loop (PyTorch harness, 2 threads, real MNIST) ...", flush=True)
    off = run_official(FLAGS.batch)
    if not off:
        return
    print(f"official: {off['median_total_s']:.3f} s/iter = {off['images_per_s']:.1f} img/s "
          f"(attacks {off['median_attack_s']:.3f} s, meta {off['median_meta_s']:.3f} s)")
    ratios = {v: FLAGS.batch / b.results[v] / off["images_per_s"] for v in NOTES if v in b.results}
    for v, r in ratios.items():
        print(f"ratio mid_tf {v:11s} / official = {r:5.2f}x  ({NOTES[v]})")
    print(f"attack loop: {b.attack_flops / b.t_attack / 1e9 / b.peak32:.0%} of the float32 matmul peak "
          f"(target >= 60%)")
    if "order1" in ratios:
        print(f"target float32 >= 3x with the official loop's work: {ratios['order1']:.2f}x "
              f"{'met' if ratios['order1'] >= 3 else 'NOT met'}")
    best16 = max((ratios[v] for v in ("bf16", "bf16_order1") if v in ratios), default=None)
    if best16 is not None:
        print(f"target bfloat16 >= 5x: {best16:.2f}x {'met' if best16 >= 5 else 'NOT met'} "
              f"(attack strength: see the bf16 row's success rates, needs --model_dir)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
