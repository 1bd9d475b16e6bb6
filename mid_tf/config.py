"""Run configuration: the one home of every hyperparameter's default and of its validation.

Frozen dataclasses, validated once by `RunConfig.validate()`. Errors are `ConfigError`s naming the
config field (`mid.meta_order`); the apps (mid_tf/cli/) take their flag defaults from these classes
and translate field names back to the flags a user typed. Tests build the classes directly.
"""

from __future__ import annotations

import dataclasses

from mid_tf.data.datasets import KNOWN_DATASETS

# surrogate runs after mid and regen after surrogate: adding either to a run leaves every earlier stage's
# random draws as they were.
KNOWN_STAGES = ("target", "teacher", "pgd_at", "trades", "mid", "surrogate", "regen", "eval")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("float32", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored", "multi_worker")
ATTACK_SOURCES = ("target", "student")
STUDENT_INITS = ("random", "teacher")
KL_REDUCTIONS = ("elementwise_mean", "distribution_mean")
DECODER_UNPOOLS = ("switches", "nearest")
# The surrogate (stage surrogate, a transfer source MID never saw) trains with the run's seed + this: its
# initial weights and its data order differ from the target's, as another team's network would.
SURROGATE_SEED_OFFSET = 1000
# The official code's MNIST Attacker Pool with the clean batch as a task ("addclean").
OFFICIAL_POOL = "clean,pgd40,pgd40_t0,mim40,mim40_t0"


class ConfigError(ValueError):
    """A configuration value that cannot work. `field` is the dotted config field (`mid.meta_order`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _one_of(value, choices, field: str) -> None:
    _check(value in choices, field, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def _optimiser(cfg, prefix: str) -> None:
    """The fields every training stage shares: epochs, batch_size, learning_rate, lr_schedule."""
    _check(cfg.epochs >= 0, f"{prefix}.epochs", f"must be >= 0, got {cfg.epochs}")
    _check(cfg.batch_size > 0, f"{prefix}.batch_size", f"must be positive, got {cfg.batch_size}")
    _check(cfg.learning_rate > 0, f"{prefix}.learning_rate", f"must be positive, got {cfg.learning_rate}")
    _one_of(cfg.lr_schedule, LR_SCHEDULES, f"{prefix}.lr_schedule")


def _attack_names(specs, field: str) -> None:
    """Every entry is a registry attack (name or name:key=value,...)."""
    if not specs:
        return
    from mid_tf.attacks import registry
    try:
        registry.parse_attack_list(",".join(specs))
    except (KeyError, ValueError) as e:
        raise ConfigError(field, f"has an attack the registry does not know: {e}") from None


def _pool(names: str, num_meta_train) -> None:
    """The pool's own rules (attacks/pool.py: >= 2 distinct graph-safe tasks, a valid meta-train count)."""
    from mid_tf.attacks.pool import AttackPool
    try:
        AttackPool(names, num_meta_train=num_meta_train)
    except (KeyError, ValueError) as e:
        field = "mid.num_meta_train" if "num_meta_train" in str(e) else "mid.pool"
        raise ConfigError(field, f"does not make an Attacker Pool: {e}") from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None       # else $MID_DATA_DIR, else TFDS's default directory
    download: bool = True             # let TFDS download a missing dataset (fails fast without network)
    train_examples: int | None = None  # first N training examples (None = all)
    eval_examples: int | None = None   # first N test examples (None = all)

    def validate(self) -> None:
        _one_of(self.dataset, KNOWN_DATASETS, "data.dataset")
        for name in ("train_examples", "eval_examples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name}", f"must be positive (or unset for all), got {value}")


@dataclasses.dataclass(frozen=True)
class StageTrainConfig:
    """Optimisation settings of one supervised stage (target, teacher or surrogate)."""
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"         # cosine decays to 0 over the stage's steps
    reconstruction_weight: float = 1.0  # teacher only: CE + w * MSE reconstruction
    precision: str = "float32"          # training compute dtype; the saved weights stay float32
    augment: bool = False               # random crops (pad 4) and flips (data/pipeline.py; natural images)

    def validate(self, stage: str) -> None:
        _optimiser(self, stage)
        _check(self.reconstruction_weight >= 0, f"{stage}.reconstruction_weight",
               f"must be >= 0, got {self.reconstruction_weight}")
        _one_of(self.precision, PRECISIONS, f"{stage}.precision")


@dataclasses.dataclass(frozen=True)
class MIDStageConfig:
    """Stage 2 (MID). Defaults follow the official code (docs/method.md, "Defaults")."""
    epochs: int = 120
    batch_size: int = 256
    learning_rate: float = 1e-4          # Adam, betas (0.9, 0.99)
    lr_schedule: str = "constant"
    lr_final_fraction: float = 0.0       # cosine: final lr as a fraction of the initial one
    steps_per_epoch: int | None = None   # cap on steps per epoch (None: one pass over the data)
    pool: str = OFFICIAL_POOL            # Attacker Pool task names (registry); "clean" = the clean batch
    num_meta_train: int | None = None    # meta-train tasks per step (None: all but the held-out one)
    alpha: float = 1e-4                  # inner step size
    beta: float = 1.0                    # meta-test weight
    meta_order: int = 2                  # 2 exact, 1 first-order approximation
    train_weights: tuple = (1.0, 1.5, 0.8)   # (w_LC, w_AC, w_CC) meta-train
    test_weights: tuple = (1.0, 1.0, 1.0)    # (w_LC, w_AC, w_CC) meta-test
    pixel_weight: float = 0.0            # w_PC of the L1 pixel term |D_t(E_s(x~)) - x| in both losses (0: official)
    softmax_axis: int = -1               # feature softmax axis (-1: channels)
    kl_reduction: str = "elementwise_mean"   # PyTorch KLDivLoss's default, as the official code
    attack_source: str = "target"        # target (transfer protocol) | student (white-box)
    sync_inner_gradient: bool = True     # all-reduce the inner gradient across replicas
    val_examples: int = 500              # per-epoch validation slice (0: off)
    val_attacks: tuple = ("fgsm", "pgd40")
    val_whitebox_attacks: tuple = ()     # crafted on the current C(E_s(.)) each epoch
    log_every_steps: int = 10            # TensorBoard batch-level logging period
    attack_cache_epochs: int = 0         # transfer protocol: reuse crafted attacks for K epochs (0: every step)
    attack_cache_overlap: bool = True    # craft the cache in a background thread while training consumes it
    student_init: str = "random"         # random (official) | teacher (E_s starts from E_t's weights)
    train_head: bool = False             # also train a student copy C_s of the head (deployed C_s(E_s(.)))
    eps_warmup_epochs: float = 0.0       # pool eps ramps linearly from 0 to full over these epochs (0: off)
    precision: str = "float32"           # training compute dtype (training/precision.py)

    def validate(self) -> None:
        _optimiser(self, "mid")
        _check(0 <= self.lr_final_fraction <= 1, "mid.lr_final_fraction", f"must be in [0, 1], got {self.lr_final_fraction}")
        _check(self.steps_per_epoch is None or self.steps_per_epoch > 0, "mid.steps_per_epoch",
               f"must be positive (or unset), got {self.steps_per_epoch}")
        _check(self.num_meta_train is None or self.num_meta_train > 0, "mid.num_meta_train",
               f"must be positive (or unset), got {self.num_meta_train}")
        _one_of(self.meta_order, (1, 2), "mid.meta_order")
        _one_of(self.attack_source, ATTACK_SOURCES, "mid.attack_source")
        _one_of(self.kl_reduction, KL_REDUCTIONS, "mid.kl_reduction")
        _one_of(self.precision, PRECISIONS, "mid.precision")
        _one_of(self.student_init, STUDENT_INITS, "mid.student_init")
        for name in ("train_weights", "test_weights"):
            w = getattr(self, name)
            _check(len(w) == 3 and min(w) >= 0 and max(w) > 0, f"mid.{name}",
                   f"takes three non-negative weights LC,AC,CC, not all zero, got {w}")
        for name in ("alpha", "beta", "pixel_weight", "val_examples", "attack_cache_epochs", "eps_warmup_epochs"):
            _check(getattr(self, name) >= 0, f"mid.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(not (self.attack_cache_epochs and self.attack_source != "target"), "mid.attack_cache_epochs",
               "needs mid.attack_source=target: attacks on the student change with every step and cannot be cached")
        _pool(self.pool, self.num_meta_train)
        _attack_names(self.val_attacks, "mid.val_attacks")
        _attack_names(self.val_whitebox_attacks, "mid.val_whitebox_attacks")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The adversarial-training baselines (stages pgd_at, trades; training/baselines.py)."""
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    attack: str = "pgd10"          # inner attack (registry name): untargeted PGD/BIM/FGSM
    trades_beta: float = 6.0       # TRADES robustness weight (Zhang et al. 2019 on MNIST)
    eps_warmup_epochs: float = 2.0  # eps ramps linearly from 0 to the attack's eps (training/baselines.py says why)
    augment: bool = False           # random crops and flips, as the target's
    precision: str = "float32"      # training compute dtype; the saved network stays float32

    def validate(self) -> None:
        _optimiser(self, "baseline")
        _one_of(self.precision, PRECISIONS, "baseline.precision")
        _check(self.trades_beta >= 0, "baseline.trades_beta", f"must be >= 0, got {self.trades_beta}")
        _check(self.eps_warmup_epochs >= 0, "baseline.eps_warmup_epochs", f"must be >= 0, got {self.eps_warmup_epochs}")
        _attack_names((self.attack,), "baseline.attack")


@dataclasses.dataclass(frozen=True)
class RegenConfig:
    """Stage regen: the regeneration decoder D_s fitted to the trained student (training/regen.py)."""
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    attack: str = "pgd10"       # crafted on the deployed C_s(E_s(.)) every step (registry name, graph-safe)
    precision: str = "float32"  # training compute dtype; the saved D_s stays float32

    def validate(self) -> None:
        _optimiser(self, "regen")
        _one_of(self.precision, PRECISIONS, "regen.precision")
        _attack_names((self.attack,), "regen.attack")
        from mid_tf.attacks import get_spec
        _check(get_spec(self.attack).graph_safe, "regen.attack",
               f"must be a graph-safe attack (it runs inside the training step), got {self.attack!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_dir: str
    data: DataConfig = DataConfig()
    stages: tuple = ("target", "teacher")
    seed: int = 0
    width: float = 1.0                 # channel multiplier of every network (1 = official)
    decoder_unpool: str = "switches"   # LeNet's decoder: "switches" (official max-unpooling) | "nearest"
    target: StageTrainConfig = StageTrainConfig(epochs=8)
    teacher: StageTrainConfig = StageTrainConfig(epochs=12)
    surrogate: StageTrainConfig = StageTrainConfig(epochs=8)   # stage surrogate: a plain CNN on clean data
    checkpoint_every: int = 200        # steps between mid-epoch checkpoints
    verbose: int = 1                   # Keras progress: 0 silent, 1 bar, 2 one line per epoch
    eval_batch_size: int = 1000
    mid: MIDStageConfig = MIDStageConfig()
    baseline: BaselineConfig = BaselineConfig()
    regen: RegenConfig = RegenConfig()
    strategy: str = "default"          # tf.distribute strategy
    eval_attacks: tuple = ("fgsm", "pgd40")      # eval stage: transfer attacks crafted on the target
    eval_whitebox_attacks: tuple = ("pgd40",)    # eval stage: attacks crafted on each model itself
    eval_slow_examples: int = 1000               # eval stage: images for the eager-only attacks (CW, SPSA, ART)
    eval_eps_sweep: tuple = (0.1, 0.2, 0.3, 1.0)  # eval stage: white-box PGD-40 eps sweep (sanity check)
    eval_workers: int = 1                        # eval stage: processes sharing the attacks (evaluation/memo.py)
    eval_helper: bool = False                    # this process is a helper started by eval_workers

    def validate(self) -> "RunConfig":
        _check(bool(self.model_dir), "model_dir", "is required: the directory for checkpoints, logs and the summary")
        self.data.validate()
        unknown = [s for s in self.stages if s not in KNOWN_STAGES]
        _check(not unknown and bool(self.stages), "stages",
               f"has unknown stage(s) {unknown}; choose from {', '.join(KNOWN_STAGES)}")
        _check(self.width > 0, "width", f"must be positive, got {self.width}")
        _one_of(self.decoder_unpool, DECODER_UNPOOLS, "decoder_unpool")
        _check(self.checkpoint_every > 0, "checkpoint_every", f"must be positive, got {self.checkpoint_every}")
        _one_of(self.verbose, (0, 1, 2), "verbose")
        self.target.validate("target")
        self.teacher.validate("teacher")
        self.surrogate.validate("surrogate")
        self.mid.validate()
        self.baseline.validate()
        self.regen.validate()
        _check(self.eval_slow_examples > 0, "eval_slow_examples", f"must be positive, got {self.eval_slow_examples}")
        _check(self.eval_workers >= 1, "eval_workers", f"must be at least 1, got {self.eval_workers}")
        _check(not self.eval_helper or tuple(self.stages) == ("eval",), "eval_helper",
               f"is set on the processes eval_workers starts, which run the eval stage only; got stages "
               f"{','.join(self.stages)}")
        _check(all(0 < e <= 1 for e in self.eval_eps_sweep), "eval_eps_sweep",
               f"values must be in (0, 1], got {self.eval_eps_sweep}")
        _one_of(self.strategy, STRATEGIES, "strategy")
        _attack_names(self.eval_attacks, "eval_attacks")
        _attack_names(self.eval_whitebox_attacks, "eval_whitebox_attacks")
        return self

    @property
    def surrogate_seed(self) -> int:
        """The surrogate's seed (its initial weights and data order): the run's seed + SURROGATE_SEED_OFFSET."""
        return self.seed + SURROGATE_SEED_OFFSET

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict) -> "RunConfig":
        """The inverse of to_json (lists back to tuples, nested configs rebuilt)."""
        return _from_dict(cls, payload)


def default(field: str):
    """The default of a dotted config field, e.g. default("mid.alpha") == 1e-4 (the apps' flag defaults)."""
    value = RunConfig(model_dir="")
    for part in field.split("."):
        value = getattr(value, part)
    return value


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict (RunConfig.to_json(), or a report's "config") as {dotted field: value}."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def field_type(field: str) -> str:
    """The annotated type of a dotted config field without None: "int", "float", "str", "bool" or "tuple"."""
    cls, parts = RunConfig, field.split(".")
    for part in parts[:-1]:
        cls = type(getattr(RunConfig(model_dir=""), part))
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[parts[-1]]
    return str(annotation).replace("| None", "").strip()


def _from_dict(cls, payload: dict):
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in payload:
            continue
        value, default_value = payload[field.name], getattr(cls, field.name, None)
        if dataclasses.is_dataclass(default_value) and isinstance(value, dict):
            value = _from_dict(type(default_value), value)
        elif isinstance(value, list) and (isinstance(default_value, tuple) or default_value is None):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)
