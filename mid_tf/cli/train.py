"""`mid-train` / `python train.py`: trains every stage of mid_tf, resumably.

    python train.py --flagfile=configs/mnist.flags [--stages=target,teacher]

The flags are a view of `mid_tf.config`: each maps to one config field, takes its default from there,
and is validated there; a `ConfigError` naming a field is reported with the flag that sets it. Kill
the run and rerun the same command to continue. The summary is printed and written to
<model_dir>/summary.json (docs/training.md).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from mid_tf import config  # noqa: E402
from mid_tf.cli.common import fail  # noqa: E402  (no TensorFlow import: a bad flag fails within a second)

FLAGS = flags.FLAGS

# flag, the config field it sets (its default and validation live there), help. Continuation lines are indented.
TABLE = """
model_dir                  model_dir                   Directory for checkpoints, TensorBoard logs, weights and
    summary.json; rerunning with the same directory resumes.
data_dir                   data.data_dir               Dataset directory: the four MNIST IDX files (.gz or raw) or a
    prepared TFDS data dir. Default: $MID_DATA_DIR, else TFDS's default directory.
download                   data.download               Let TFDS download the dataset when it is not found (with a
    progress bar); without network the run fails within seconds naming --data_dir. --nodownload: never download.
dataset                    data.dataset                Dataset: mnist | fashion_mnist | cifar10 | svhn_cropped (TFDS
    names) | image_folder (--data_dir holds train/<class>/* and test/<class>/*, or train.tar and test.tar).
stages                     stages                      Stages to run, in pipeline order: target, teacher, pgd_at,
    trades, mid, surrogate (a plain CNN, seed + 1000: the eval stage's transfer source MID never saw), regen (the
    regeneration decoder D_s fitted to the trained student), eval.
seed                       seed                        Random seed: weights, data order, attacks. Same seed, same run.
train_examples             data.train_examples         Use only the first N training examples (default: all).
eval_examples              data.eval_examples          Use only the first N test examples (default: all).
width                      width                       Channel multiplier of every network (1 = the official one).
decoder_unpool             decoder_unpool              LeNet's decoder D_t (and D_s): switches (the official
    max-unpooling to the encoder's maxima) | nearest (upsampling; the decoder then depends on the features alone,
    which the pixel term can shape: switches carry no gradient). Fixed for a model_dir, like --width.
batch_size                 target.batch_size           Training batch size of stage 1, the surrogate and the
    baselines (and of MID unless --mid_batch_size is set).
target_epochs              target.epochs               Epochs for the target model.
target_lr                  target.learning_rate        Adam learning rate of the target.
teacher_epochs             teacher.epochs              Epochs for the teacher.
teacher_lr                 teacher.learning_rate       Adam learning rate of the teacher.
reconstruction_weight      teacher.reconstruction_weight  Teacher loss: CE + w * MSE reconstruction.
surrogate_epochs           surrogate.epochs            Epochs for the surrogate (stage surrogate).
surrogate_lr               surrogate.learning_rate     Adam learning rate of the surrogate.
lr_schedule                target.lr_schedule          Learning-rate schedule of stage 1, the surrogate and the
    baselines: constant | cosine.
augment                    target.augment              Random crops (zero-padded by 4) and horizontal flips in the
    training stream of the target, the teacher, the surrogate and the baselines (natural images; not MID: its
    cached attacks belong to the unaugmented images).
stage1_precision           target.precision            Compute dtype of target, teacher and surrogate training:
    auto | float32 | mixed_bfloat16 (as --mid_precision).
checkpoint_every           checkpoint_every            Steps between mid-epoch checkpoints.
verbose                    verbose                     Keras progress: 0 silent, 1 progress bar, 2 a line per epoch.
strategy                   strategy                    tf.distribute strategy: default | mirrored | multi_worker
    (multi_worker reads the cluster from TF_CONFIG).
mid_epochs                 mid.epochs                  Epochs of MID meta-training.
mid_steps_per_epoch        mid.steps_per_epoch         Cap on MID steps per epoch (default: one pass).
mid_lr                     mid.learning_rate           Adam learning rate of the student.
mid_lr_schedule            mid.lr_schedule             MID learning-rate schedule: constant | cosine.
mid_lr_final_fraction      mid.lr_final_fraction       Cosine schedule: final rate as a fraction of --mid_lr.
attack_pool                mid.pool                    Attacker Pool: comma list of registry attacks (name or
    name:key=value,...); 'clean' is the clean batch as a task (default: the official 'addclean' pool).
num_meta_train             mid.num_meta_train          Meta-train tasks sampled per step (default: all but the
    held-out one).
attack_source              mid.attack_source           Model the pool's attacks are crafted on: target (the paper's
    transfer protocol) | student (C(E_s(.)), white-box).
attack_cache_epochs        mid.attack_cache_epochs     Transfer protocol only: craft the pool's attacks on the target
    once and reuse them for K epochs, then recraft with new random starts (0: every step).
attack_cache_overlap       mid.attack_cache_overlap    With --attack_cache_epochs: craft the cache in a background
    thread, in the order training consumes it (the same cache either way).
student_init               mid.student_init            Initial weights of the student encoder: random (official) |
    teacher (a copy of E_t's).
train_head                 mid.train_head              Also train a student copy C_s of the teacher head with E_s
    (label term); the deployed pipeline becomes C_s(E_s(.)) and C stays frozen. Off: the paper's C(E_s(.)).
mid_eps_warmup_epochs      mid.eps_warmup_epochs       The pool's eps (and steps) ramp linearly from 0 to full over
    this many epochs, attacks crafted in the shrunk ball (0: off, as the official code).
mid_precision              mid.precision               Compute dtype of MID training: auto | float32 |
    mixed_bfloat16 (bfloat16 activations, float32 weights and losses; auto picks it where bfloat16 is native:
    CPU AVX512_BF16/AMX-BF16, GPU compute capability >= 8.0). Saved networks stay float32.
meta_alpha                 mid.alpha                   Inner step size alpha: theta' = theta - alpha grad L_train.
meta_beta                  mid.beta                    Weight beta of the meta-test loss.
meta_order                 mid.meta_order              2: exact second-order meta-gradient; 1: first-order.
meta_train_weights         mid.train_weights           Meta-train loss weights w_LC,w_AC,w_CC.
meta_test_weights          mid.test_weights            Meta-test loss weights w_LC,w_AC,w_CC.
pixel_weight               mid.pixel_weight            Weight w_PC of the pixel consistency, the mean L1 between the
    regeneration D_t(E_s(x~)) and the clean x, in the meta-train and the meta-test loss (0: off; the official
    code computes this term but never adds it).
kl_reduction               mid.kl_reduction            Reduction of the feature KL terms: elementwise_mean (PyTorch
    KLDivLoss's default, as the official code) | distribution_mean (per-location KL, averaged).
softmax_axis               mid.softmax_axis            Feature softmax axis of the KL terms (-1: channels).
val_examples               mid.val_examples            Test images for the per-epoch MID validation (0: off).
val_attacks                mid.val_attacks             Attacks (crafted on the target) in the per-epoch validation.
val_whitebox_attacks       mid.val_whitebox_attacks    Attacks crafted on the current C(E_s(.)) in the per-epoch
    validation (empty: none).
baseline_epochs            baseline.epochs             Epochs of the adversarial-training baselines (pgd_at, trades).
baseline_lr                baseline.learning_rate      Adam learning rate of the baselines.
baseline_attack            baseline.attack             Inner attack of PGD-AT / TRADES (registry name: untargeted
    PGD, BIM or FGSM; Madry's MNIST setting is pgd40).
trades_beta                baseline.trades_beta        TRADES: weight of the KL robustness term.
baseline_eps_warmup_epochs baseline.eps_warmup_epochs  PGD-AT / TRADES: the inner attack's eps (and step) ramp
    linearly from 0 over these epochs; 0: full eps from the first step (Madry's recipe; docs/training.md).
baseline_precision         baseline.precision          Compute dtype of PGD-AT / TRADES training: auto | float32 |
    mixed_bfloat16 (as --mid_precision; to compare them with MID at equal training time on one CPU).
regen_epochs               regen.epochs                Epochs of stage regen: the decoder D_s of the deployed
    regeneration D_s(E_s(x)), fitted to the trained E_s (and C_s), which stay as they are.
regen_lr                   regen.learning_rate         Adam learning rate of D_s (stage regen).
regen_attack               regen.attack                Stage regen: attack crafted on C_s(E_s(.)) every step whose
    images D_s learns to regenerate (with the clean ones); a graph-safe registry attack.
eval_attacks               eval_attacks                Eval stage: transfer attacks crafted on the target (and, when
    stage surrogate is done, also on the surrogate: rows of a source MID never saw).
eval_whitebox_attacks      eval_whitebox_attacks       Eval stage: white-box attacks, crafted on each evaluated model
    itself (MID's C(E_s(.)), the target, the baselines).
eval_slow_examples         eval_slow_examples          Eval stage: test images for the eager-only attacks (CW-L2,
    SPSA, AutoAttack, DeepFool, Square, spatial, JSMA), which are far slower on a CPU.
eval_eps_sweep             eval_eps_sweep              Eval stage: eps values of the white-box PGD-40 sweep behind the
    sanity flags (accuracy must fall as eps grows and reach ~0 at eps 1); empty: off.
eval_workers               eval_workers                Eval stage: processes that craft the attacks together (this one
    plus N-1 helpers sharing <model_dir>/eval/memo.json).
eval_helper                eval_helper                 Internal: set on the helper processes --eval_workers starts.
"""
# Config fields set by a flag of another field (batch size, schedule and precision are shared).
SHARED = {"teacher.batch_size": "batch_size", "baseline.batch_size": "batch_size", "mid.batch_size": "mid_batch_size",
          "teacher.lr_schedule": "lr_schedule", "baseline.lr_schedule": "lr_schedule",
          "teacher.precision": "stage1_precision", "surrogate.batch_size": "batch_size",
          "surrogate.lr_schedule": "lr_schedule", "surrogate.precision": "stage1_precision",
          "teacher.augment": "augment", "baseline.augment": "augment", "surrogate.augment": "augment",
          "regen.batch_size": "mid_batch_size", "regen.lr_schedule": "lr_schedule", "regen.precision": "mid_precision"}
# Fields given as absl comma lists (the other tuples are attack lists, strings: their specs hold commas).
LISTS = ("mid.train_weights", "mid.test_weights", "eval_eps_sweep", "stages")


def parse_table(text: str = TABLE) -> dict:
    """{flag: (field, help)} from TABLE."""
    rows: dict = {}
    for line in text.strip("\n").splitlines():
        if line.startswith(" "):
            flag = next(reversed(rows))
            rows[flag] = (rows[flag][0], rows[flag][1] + " " + line.strip())
        else:
            flag, field, help_text = line.split(None, 2)
            rows[flag] = (field, help_text)
    return rows


FIELDS = {flag: field for flag, (field, _) in parse_table().items()}


def _define(flag: str, field: str, help_text: str) -> None:
    default, kind = config.default(field), config.field_type(field)
    if field in LISTS:
        flags.DEFINE_list(flag, [str(v) for v in default], help_text)
    elif isinstance(default, tuple):
        flags.DEFINE_string(flag, ",".join(default), help_text)
    else:
        define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float}
        define.get(kind, flags.DEFINE_string)(flag, default, help_text)


def _define_flags() -> None:
    for flag, (field, help_text) in parse_table().items():
        _define(flag, field, help_text)
    flags.DEFINE_integer("mid_batch_size", None, "Batch size of the MID stage (default: --batch_size).")
    flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into N logical devices (to exercise "
                         "--strategy=mirrored without GPUs).")
    flags.DEFINE_list("retrain", [], "Stages to train again although --model_dir holds them (done or started, "
                      "e.g. with other settings): each is discarded with the stages built on it, then trained; "
                      "each must be in --stages.")
    flags.DEFINE_bool("deterministic", False, "Enable TF op determinism (bitwise repeatable, somewhat slower).")
    flags.DEFINE_string("xla_kernels", "auto", "Compiled CPU kernels for LeNet's convolutions and unpooling: "
                        "auto (by CPU; docs/performance.md) | on | off.")


_define_flags()  # --model_dir is required by the config (RunConfig.validate), which says so with exit code 2


class FlagError(ValueError):
    """A flag value that does not parse; the message names the flag."""


def _numbers(flag: str, values, count: int | None = None) -> tuple:
    try:
        out = tuple(float(v) for v in values if str(v).strip())
    except ValueError:
        raise FlagError(f"--{flag} takes numbers, got {','.join(values)}") from None
    if count is not None and len(out) != count:
        raise FlagError(f"--{flag} takes {count} numbers, got {','.join(values)}")
    return out


def _specs(text: str) -> tuple:
    """'fgsm,pgd40:eps=0.2,nb_iter=10' -> ('fgsm', 'pgd40:eps=0.2,nb_iter=10') (registry syntax)."""
    from mid_tf.attacks.registry import split_attack_list
    return tuple(split_attack_list(text))


def _precision(flag: str) -> str:
    """--<flag> with `auto` resolved for this machine (training/precision.py), said once when resolved."""
    value = getattr(FLAGS, flag)
    if value != "auto":
        return value
    from mid_tf.training.precision import resolve
    chosen, why = resolve(value)
    print(f"--{flag}=auto -> {chosen} ({why.removeprefix('auto: ')})", flush=True)
    return chosen


def build_config() -> config.RunConfig:
    """The RunConfig the flags describe (not yet validated: `RunConfig.validate()` does that)."""
    F = FLAGS
    data = config.DataConfig(dataset=F.dataset, data_dir=F.data_dir, download=F.download,
                             train_examples=F.train_examples, eval_examples=F.eval_examples)
    common = dict(batch_size=F.batch_size, lr_schedule=F.lr_schedule, precision=_precision("stage1_precision"),
                  augment=F.augment)
    mid = config.MIDStageConfig(
        epochs=F.mid_epochs, batch_size=F.mid_batch_size or F.batch_size, learning_rate=F.mid_lr,
        lr_schedule=F.mid_lr_schedule, lr_final_fraction=F.mid_lr_final_fraction,
        steps_per_epoch=F.mid_steps_per_epoch, pool=F.attack_pool, num_meta_train=F.num_meta_train,
        alpha=F.meta_alpha, beta=F.meta_beta, meta_order=F.meta_order,
        train_weights=_numbers("meta_train_weights", F.meta_train_weights, 3),
        test_weights=_numbers("meta_test_weights", F.meta_test_weights, 3), pixel_weight=F.pixel_weight,
        softmax_axis=F.softmax_axis, kl_reduction=F.kl_reduction, attack_source=F.attack_source,
        val_examples=F.val_examples, attack_cache_epochs=F.attack_cache_epochs, attack_cache_overlap=F.attack_cache_overlap,
        student_init=F.student_init, train_head=F.train_head, eps_warmup_epochs=F.mid_eps_warmup_epochs,
        precision=_precision("mid_precision"), val_attacks=_specs(F.val_attacks),
        val_whitebox_attacks=_specs(F.val_whitebox_attacks))
    baseline = config.BaselineConfig(
        epochs=F.baseline_epochs, batch_size=F.batch_size, learning_rate=F.baseline_lr, lr_schedule=F.lr_schedule,
        attack=F.baseline_attack, trades_beta=F.trades_beta, eps_warmup_epochs=F.baseline_eps_warmup_epochs,
        augment=F.augment, precision=_precision("baseline_precision"))
    regen = config.RegenConfig(epochs=F.regen_epochs, batch_size=mid.batch_size, learning_rate=F.regen_lr,
                               lr_schedule=F.lr_schedule, attack=F.regen_attack, precision=mid.precision)
    return config.RunConfig(
        model_dir=F.model_dir, data=data, stages=tuple(s.strip() for s in F.stages if s.strip()), seed=F.seed,
        width=F.width, decoder_unpool=F.decoder_unpool, checkpoint_every=F.checkpoint_every, verbose=F.verbose,
        target=config.StageTrainConfig(epochs=F.target_epochs, learning_rate=F.target_lr, **common),
        teacher=config.StageTrainConfig(epochs=F.teacher_epochs, learning_rate=F.teacher_lr,
                                        reconstruction_weight=F.reconstruction_weight, **common),
        surrogate=config.StageTrainConfig(epochs=F.surrogate_epochs, learning_rate=F.surrogate_lr, **common),
        mid=mid, baseline=baseline, regen=regen, strategy=F.strategy, eval_attacks=_specs(F.eval_attacks),
        eval_whitebox_attacks=_specs(F.eval_whitebox_attacks), eval_slow_examples=F.eval_slow_examples,
        eval_eps_sweep=_numbers("eval_eps_sweep", F.eval_eps_sweep), eval_workers=F.eval_workers,
        eval_helper=F.eval_helper)


def flag_for(field: str) -> str | None:
    """The flag that sets a config field (None for fields without one)."""
    return SHARED.get(field) or next((flag for flag, f in FIELDS.items() if f == field), None)


def explain(error: config.ConfigError) -> str:
    """A ConfigError in the words of the command line: the flag instead of the field."""
    flag = flag_for(error.field)
    return f"--{flag} {error.message}" if flag else str(error)


def _retrain() -> tuple:
    """--retrain, checked: trained stages only (the eval stage redoes what changed by itself)."""
    names = tuple(s.strip() for s in FLAGS.retrain if s.strip())
    trained = [s for s in config.KNOWN_STAGES if s != "eval"]
    unknown = [s for s in names if s not in trained]
    if unknown:
        raise FlagError(f"--retrain has unknown or untrained stage(s) {unknown}; choose from {', '.join(trained)}")
    return names


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint saver logs every save at INFO
    from mid_tf.data.datasets import DataError, preflight

    try:  # before TensorFlow is imported: a missing dataset is reported within a second or two
        preflight(FLAGS.dataset, FLAGS.data_dir, FLAGS.download)
    except DataError as e:
        return fail(e)
    from mid_tf.artifacts import ArtifactError, FingerprintError
    from mid_tf.training.resumable import NonFiniteError

    try:
        cfg, retrain = build_config().validate(), _retrain()
        from mid_tf.kernels import xla
        xla.configure(FLAGS.xla_kernels)
        print(xla.describe(), flush=True)
        if FLAGS.logical_cpus:
            from mid_tf.training.distribute import configure_logical_cpus
            configure_logical_cpus(FLAGS.logical_cpus)
        if FLAGS.deterministic:
            import tensorflow as tf
            tf.config.experimental.enable_op_determinism()
        from mid_tf import stages
        summary = stages.run(cfg, retrain=retrain)
    except config.ConfigError as e:
        return fail(explain(e))
    except (FingerprintError, NonFiniteError) as e:
        return fail(e.describe(flag_for))
    except (DataError, ArtifactError, FlagError, ValueError) as e:
        return fail(e)
    print(stages.format_summary(summary))
    print(f"summary written to {os.path.join(cfg.model_dir, 'summary.json')}")
    return 0


def run() -> None:
    """Console-script entry point (`--help` lists this module's flags, whichever script started it)."""
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


if __name__ == "__main__":
    run()
