"""Trains mid_tf: `python train.py --flagfile=configs/mnist.flags [--stages=target,teacher]`.

Every stage is resumable: kill the run and rerun the same command to continue. The summary is
printed and written to <model_dir>/summary.json (see README, "The run summary").
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "Directory for checkpoints, TensorBoard logs, weights and summary.json. "
                    "Rerunning with the same directory resumes.")
flags.DEFINE_string("data_dir", None, "Directory with the dataset: the four MNIST IDX files (.gz or raw) or a "
                    "prepared TFDS data dir. Default: $MID_DATA_DIR, else TFDS's default directory.")
flags.DEFINE_bool("download", False, "Allow TFDS to download the dataset when it is not found (needs network).")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10", "svhn_cropped"], "Dataset (TFDS name).")
flags.DEFINE_list("stages", ["target", "teacher"], "Stages to run, in pipeline order: target, teacher, pgd_at, trades, mid, eval.")
flags.DEFINE_integer("seed", 0, "Random seed: weights, data order, attacks. Same seed, same run.")
flags.DEFINE_integer("train_examples", None, "Use only the first N training examples (default: all).", lower_bound=1)
flags.DEFINE_integer("eval_examples", None, "Use only the first N test examples (default: all).", lower_bound=1)
flags.DEFINE_float("width", 1.0, "Channel multiplier of every network (1.0 = the official architecture).")
flags.DEFINE_integer("batch_size", 256, "Training batch size (official: 256).", lower_bound=1)
flags.DEFINE_integer("mid_batch_size", None, "Batch size of the MID stage (default: --batch_size); the attack cache "
                     "is still crafted in chunks of >= 256.", lower_bound=1)
flags.DEFINE_integer("target_epochs", 8, "Epochs for the target model (official: 200).", lower_bound=0)
flags.DEFINE_float("target_lr", 1e-3, "Adam learning rate for the target (official: 1e-3).")
flags.DEFINE_integer("teacher_epochs", 12, "Epochs for the teacher (official: 200).", lower_bound=0)
flags.DEFINE_float("teacher_lr", 1e-3, "Adam learning rate for the teacher (official: 1e-4).")
flags.DEFINE_float("reconstruction_weight", 1.0, "Teacher loss: CE + w * MSE reconstruction (official: 1).")
flags.DEFINE_enum("lr_schedule", "cosine", ["constant", "cosine"], "Learning-rate schedule of stage-1 training.")
flags.DEFINE_integer("checkpoint_every", 200, "Steps between mid-epoch checkpoints.", lower_bound=1)
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.",
                     lower_bound=0, upper_bound=2)
# Stage 2: MID (defaults = the official code; the flagfile says where it departs).
flags.DEFINE_integer("mid_epochs", 120, "Epochs of MID meta-training (official: 120).", lower_bound=0)
flags.DEFINE_integer("mid_steps_per_epoch", None, "Cap on MID steps per epoch (default: one pass over the data).",
                     lower_bound=1)
flags.DEFINE_float("mid_lr", 1e-4, "Adam learning rate of the student encoder (official: 1e-4).")
flags.DEFINE_enum("mid_lr_schedule", "constant", ["constant", "cosine"], "MID learning-rate schedule.")
flags.DEFINE_float("mid_lr_final_fraction", 0.0, "Cosine schedule: final learning rate as a fraction of --mid_lr.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_string("attack_pool", "clean,pgd40,pgd40_t0,mim40,mim40_t0",
                    "Attacker Pool: comma list of registry attacks (name or name:key=value,...); 'clean' is the "
                    "clean batch as a task (official 'addclean' pool is the default).")
flags.DEFINE_integer("num_meta_train", None, "Meta-train tasks sampled per step (default: all but the held-out one).",
                     lower_bound=1)
flags.DEFINE_enum("attack_source", "target", ["target", "student"],
                  "Model the pool's attacks are crafted on: the fixed target (paper) or C(E_s(.)) (white-box).")
flags.DEFINE_integer("attack_cache_epochs", 0, "Transfer protocol only: craft the pool's attacks on the target once "
                     "and reuse them for K epochs, then recraft with new random starts (0: craft every step, as "
                     "the official code).", lower_bound=0)
flags.DEFINE_bool("attack_cache_overlap", True, "With --attack_cache_epochs: craft the cache in a background thread, "
                  "in the order training consumes it, so the meta steps start at once (the same cache either way).")
flags.DEFINE_enum("student_init", "random", ["random", "teacher"],
                  "Initial weights of the student encoder: random (official) or a copy of the teacher encoder's.")
flags.DEFINE_bool("train_head", False, "MID: also train the classifier head. The student gets its own copy C_s of "
                  "the teacher head C (initialised from C, trained with E_s on the label-consistency term) and the "
                  "deployed pipeline becomes C_s(E_s(.)); C itself stays frozen. Off: the paper's C(E_s(.)).")
flags.DEFINE_float("mid_eps_warmup_epochs", 0.0, "MID: the pool's eps (and steps) ramp linearly from 0 to full over "
                   "this many epochs, attacks crafted in the shrunk ball (0: off, as the official code). For a "
                   "student attacked white-box from a random init; with the attack cache the cached tasks are "
                   "scaled instead.", lower_bound=0.0)
flags.DEFINE_enum("stage1_precision", "float32", ["auto", "float32", "mixed_bfloat16"],
                  "Compute dtype of the target and teacher training (as --mid_precision): the saved networks and "
                  "everything after them stay float32.")
flags.DEFINE_enum("mid_precision", "float32", ["auto", "float32", "mixed_bfloat16"],
                  "Compute dtype of MID training: mixed_bfloat16 = bfloat16 activations with float32 weights and "
                  "losses (~1.65x faster on CPUs with AVX512_BF16/AMX; far slower on others, where TF emulates "
                  "bfloat16). auto = mixed_bfloat16 where bfloat16 is native (CPU AVX512_BF16/AMX-BF16, or a GPU "
                  "of compute capability >= 8.0), float32 elsewhere. The saved student, export and evaluation stay "
                  "float32.")
flags.DEFINE_float("meta_alpha", 1e-4, "Inner step size alpha: theta' = theta - alpha * grad L_train (official 1e-4).",
                   lower_bound=0.0)
flags.DEFINE_float("meta_beta", 1.0, "Weight beta of the meta-test loss (official 1).", lower_bound=0.0)
flags.DEFINE_enum("meta_order", "2", ["1", "2"], "2: exact second-order meta-gradient; 1: first-order approximation.")
flags.DEFINE_list("meta_train_weights", ["1", "1.5", "0.8"], "Meta-train loss weights w_LC,w_AC,w_CC (official).")
flags.DEFINE_list("meta_test_weights", ["1", "1", "1"], "Meta-test loss weights w_LC,w_AC,w_CC (official).")
flags.DEFINE_enum("kl_reduction", "elementwise_mean", ["elementwise_mean", "distribution_mean"],
                  "Reduction of the feature KL terms: elementwise_mean = mean over every element, PyTorch "
                  "KLDivLoss's default as in the official code (the per-location KL / #channels); "
                  "distribution_mean = the KL of each per-location distribution, averaged.")
flags.DEFINE_integer("softmax_axis", -1, "Feature softmax axis of the KL terms (-1: channels, as the official code).")
flags.DEFINE_integer("val_examples", 500, "Test images for the per-epoch MID validation (0: off).", lower_bound=0)
flags.DEFINE_string("val_attacks", "fgsm,pgd40", "Attacks (crafted on the target) in the per-epoch validation.")
flags.DEFINE_string("val_whitebox_attacks", "", "Attacks crafted on the current C(E_s(.)) in the per-epoch "
                    "validation (white-box; empty: none).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy; multi_worker reads the cluster from TF_CONFIG.")
flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into N logical devices (to exercise --strategy=mirrored "
                     "without GPUs). 0: leave as is.", lower_bound=0)
# Stage eval
flags.DEFINE_integer("baseline_epochs", 10, "Epochs of the adversarial-training baselines (stages pgd_at, trades).",
                     lower_bound=0)
flags.DEFINE_float("baseline_lr", 1e-3, "Adam learning rate of the baselines.")
flags.DEFINE_string("baseline_attack", "pgd10", "Inner attack of PGD-AT / TRADES (registry name: untargeted PGD, BIM "
                    "or FGSM; Madry's MNIST setting is pgd40).")
flags.DEFINE_float("trades_beta", 6.0, "TRADES: weight of the KL robustness term (Zhang et al. 2019: 6).",
                   lower_bound=0.0)
flags.DEFINE_float("baseline_eps_warmup_epochs", 2.0, "PGD-AT / TRADES: the inner attack's eps (and step) ramp "
                   "linearly from 0 to their values over these epochs; 0: full eps from the first step (Madry's "
                   "recipe, which stalls at chance accuracy on MNIST with Adam 1e-3: measured 11% still 1.2 epochs in).",
                   lower_bound=0.0)
flags.DEFINE_string("eval_attacks", "fgsm,pgd40", "Eval stage: transfer attacks crafted on the target.")
flags.DEFINE_string("eval_whitebox_attacks", "pgd40", "Eval stage: white-box attacks, crafted on each evaluated "
                    "model itself (MID's C(E_s(.)), the target, the baselines).")
flags.DEFINE_integer("eval_slow_examples", 1000, "Eval stage: test images for the eager-only attacks (CW-L2, "
                     "SPSA, AutoAttack, DeepFool, Square, spatial, JSMA), which are 10-1000x slower on CPU.",
                     lower_bound=1)
flags.DEFINE_list("eval_eps_sweep", ["0.1", "0.2", "0.3", "1.0"], "Eval stage: eps values of the white-box PGD-40 "
                  "sweep behind the sanity flags (accuracy must fall as eps grows and reach ~0 at eps 1); empty: off.")
flags.DEFINE_integer("eval_workers", 1, "Eval stage: processes that craft the attacks together (this one plus "
                     "N-1 helpers running `--stages=eval`, sharing <model_dir>/eval/memo.json). The eager-only "
                     "attacks (CW-L2, SPSA, ART's) keep about one core busy each, so 2 suits a 2-core CPU.",
                     lower_bound=1)
flags.DEFINE_bool("eval_helper", False, "Internal: set on the helper processes --eval_workers starts (they craft "
                  "unclaimed pieces of the report, then exit without writing it).")
flags.DEFINE_bool("deterministic", False, "Enable TF op determinism (bitwise repeatable, somewhat slower).")

flags.mark_flag_as_required("model_dir")
flags.register_validator("width", lambda w: w > 0, message="--width must be positive")
flags.register_validator("target_lr", lambda v: v > 0, message="--target_lr must be positive")
flags.register_validator("teacher_lr", lambda v: v > 0, message="--teacher_lr must be positive")


def _weights(flag, values):
    from mid_tf.config import ConfigError
    try:
        w = tuple(float(v) for v in values)
    except ValueError as e:
        raise ConfigError(f"--{flag} takes three numbers LC,AC,CC, got {values}") from e
    if len(w) != 3:
        raise ConfigError(f"--{flag} takes three numbers LC,AC,CC, got {values}")
    return w


def _floats(flag, values):
    from mid_tf.config import ConfigError
    try:
        return tuple(float(v) for v in values if str(v).strip())
    except ValueError as e:
        raise ConfigError(f"--{flag} takes numbers, got {values}") from e


def _attacks(text):
    """'fgsm,pgd40:eps=0.2,nb_iter=10' -> ('fgsm', 'pgd40:eps=0.2,nb_iter=10'), validated against the registry."""
    from mid_tf.attacks import parse_attack_list
    return tuple(spec.name for spec in parse_attack_list(text)) if text.strip() else ()


def _precision(flag: str) -> str:
    """--<flag> with `auto` resolved for this machine (training/precision.py), said once when resolved."""
    from mid_tf.training.precision import resolve
    chosen, why = resolve(getattr(FLAGS, flag))
    if getattr(FLAGS, flag) == "auto":
        print(f"--{flag}=auto -> {chosen} ({why.removeprefix('auto: ')})", flush=True)
    return chosen


def build_config():
    from mid_tf.config import BaselineConfig, DataConfig, MIDStageConfig, RunConfig, StageTrainConfig

    data = DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, download=FLAGS.download,
                      train_examples=FLAGS.train_examples, eval_examples=FLAGS.eval_examples)
    common = dict(batch_size=FLAGS.batch_size, lr_schedule=FLAGS.lr_schedule,
                  precision=_precision("stage1_precision"))
    return RunConfig(
        model_dir=FLAGS.model_dir, data=data, stages=tuple(s.strip() for s in FLAGS.stages if s.strip()),
        seed=FLAGS.seed, width=FLAGS.width, checkpoint_every=FLAGS.checkpoint_every, verbose=FLAGS.verbose,
        target=StageTrainConfig(epochs=FLAGS.target_epochs, learning_rate=FLAGS.target_lr, **common),
        teacher=StageTrainConfig(epochs=FLAGS.teacher_epochs, learning_rate=FLAGS.teacher_lr,
                                 reconstruction_weight=FLAGS.reconstruction_weight, **common),
        mid=MIDStageConfig(
            epochs=FLAGS.mid_epochs, batch_size=FLAGS.mid_batch_size or FLAGS.batch_size, learning_rate=FLAGS.mid_lr,
            lr_schedule=FLAGS.mid_lr_schedule, lr_final_fraction=FLAGS.mid_lr_final_fraction,
            steps_per_epoch=FLAGS.mid_steps_per_epoch, pool=FLAGS.attack_pool, num_meta_train=FLAGS.num_meta_train,
            alpha=FLAGS.meta_alpha, beta=FLAGS.meta_beta, meta_order=int(FLAGS.meta_order),
            train_weights=_weights("meta_train_weights", FLAGS.meta_train_weights),
            test_weights=_weights("meta_test_weights", FLAGS.meta_test_weights), softmax_axis=FLAGS.softmax_axis,
            kl_reduction=FLAGS.kl_reduction,
            attack_source=FLAGS.attack_source, val_examples=FLAGS.val_examples,
            attack_cache_epochs=FLAGS.attack_cache_epochs, attack_cache_overlap=FLAGS.attack_cache_overlap,
            student_init=FLAGS.student_init, train_head=FLAGS.train_head,
            eps_warmup_epochs=FLAGS.mid_eps_warmup_epochs,
            precision=_precision("mid_precision"),
            val_attacks=_attacks(FLAGS.val_attacks), val_whitebox_attacks=_attacks(FLAGS.val_whitebox_attacks)),
        baseline=BaselineConfig(epochs=FLAGS.baseline_epochs, batch_size=FLAGS.batch_size,
                                learning_rate=FLAGS.baseline_lr, lr_schedule=FLAGS.lr_schedule,
                                attack=_attacks(FLAGS.baseline_attack)[0] if FLAGS.baseline_attack else "pgd10",
                                trades_beta=FLAGS.trades_beta, eps_warmup_epochs=FLAGS.baseline_eps_warmup_epochs),
        strategy=FLAGS.strategy,
        eval_attacks=_attacks(FLAGS.eval_attacks), eval_whitebox_attacks=_attacks(FLAGS.eval_whitebox_attacks),
        eval_slow_examples=FLAGS.eval_slow_examples, eval_eps_sweep=_floats("eval_eps_sweep", FLAGS.eval_eps_sweep),
        eval_workers=FLAGS.eval_workers, eval_helper=FLAGS.eval_helper,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint saver logs every save at INFO
    from mid_tf.data.datasets import DataError, preflight

    try:  # before TensorFlow is imported: a missing dataset is reported within a second or two
        preflight(FLAGS.dataset, FLAGS.data_dir, FLAGS.download)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mid_tf.artifacts import ArtifactError
    from mid_tf.config import ConfigError

    try:
        cfg = build_config()
        if FLAGS.logical_cpus:
            from mid_tf.training.distribute import configure_logical_cpus
            configure_logical_cpus(FLAGS.logical_cpus)
        if FLAGS.deterministic:
            import tensorflow as tf
            tf.config.experimental.enable_op_determinism()
        from mid_tf import stages
        from mid_tf.models import xla_kernels
        print(xla_kernels.describe(), flush=True)  # an invalid MID_TF_XLA_KERNELS fails here, before training
        summary = stages.run(cfg)
    except (DataError, ConfigError, ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(stages.format_summary(summary))
    print(f"summary written to {os.path.join(cfg.model_dir, 'summary.json')}")
    return 0


if __name__ == "__main__":
    app.run(main)
