"""Run configuration: frozen dataclasses, validated once, with errors that name the flag to fix.

Only `train.py` / `export.py` read absl flags; they build these objects and hand them to the
library. Tests build them directly.
"""

from __future__ import annotations

import dataclasses

from mid_tf.data.datasets import DATASET_SHAPES

KNOWN_STAGES = ("target", "teacher", "pgd_at", "trades", "mid", "eval")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None       # --data_dir, else $MID_DATA_DIR, else TFDS's default
    download: bool = False            # allow TFDS downloads (needs network)
    train_examples: int | None = None  # first N training examples (None = all)
    eval_examples: int | None = None   # first N test examples (None = all)

    def validate(self) -> None:
        if self.dataset not in DATASET_SHAPES:
            raise ConfigError(f"--dataset={self.dataset} is unknown; choose one of {sorted(DATASET_SHAPES)}")
        for flag, value in (("--train_examples", self.train_examples), ("--eval_examples", self.eval_examples)):
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be positive (or unset for all examples), got {value}")


@dataclasses.dataclass(frozen=True)
class StageTrainConfig:
    """Optimisation settings of one supervised stage (target or teacher)."""
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # constant | cosine (decays to 0 over the stage's steps)
    reconstruction_weight: float = 1.0  # teacher only: weight of the MSE reconstruction loss
    precision: str = "float32"  # float32 | mixed_bfloat16 (training only; the saved weights stay float32)

    def validate(self, stage: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"--{stage}_epochs must be >= 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch_size must be positive, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--{stage}_lr must be positive, got {self.learning_rate}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr_schedule must be constant or cosine, got {self.lr_schedule}")
        if self.precision not in ("float32", "mixed_bfloat16"):
            raise ConfigError(f"--stage1_precision must be float32 or mixed_bfloat16, got {self.precision}")


OFFICIAL_POOL = "clean,pgd40,pgd40_t0,mim40,mim40_t0"


@dataclasses.dataclass(frozen=True)
class MIDStageConfig:
    """Stage 2 (MID). Defaults follow the official code (mid-method.md §1.5)."""
    epochs: int = 120
    batch_size: int = 256
    learning_rate: float = 1e-4          # Adam, official 1e-4
    lr_schedule: str = "constant"        # constant (official) | cosine
    lr_final_fraction: float = 0.0       # cosine: final lr as a fraction of the initial one
    steps_per_epoch: int | None = None   # cap on steps per epoch (None: one pass over the data)
    pool: str = OFFICIAL_POOL            # Attacker Pool task names (registry), "clean" = the clean batch
    num_meta_train: int | None = None    # meta-train tasks per step (None: all but the held-out one)
    alpha: float = 1e-4                  # inner step size
    beta: float = 1.0                    # meta-test weight
    meta_order: int = 2                  # 2 exact, 1 first-order approximation
    train_weights: tuple = (1.0, 1.5, 0.8)   # (w_LC, w_AC, w_CC) meta-train
    test_weights: tuple = (1.0, 1.0, 1.0)    # (w_LC, w_AC, w_CC) meta-test
    softmax_axis: int = -1               # feature softmax axis (-1: channels, as the official code)
    kl_reduction: str = "elementwise_mean"   # official (PyTorch KLDivLoss default) | distribution_mean
    attack_source: str = "target"        # target | student
    sync_inner_gradient: bool = True
    val_examples: int = 500              # per-epoch validation slice (0: off)
    val_attacks: tuple = ("fgsm", "pgd40")
    val_whitebox_attacks: tuple = ()     # crafted on the current C(E_s(.)) each epoch
    log_every_steps: int = 10            # TensorBoard batch-level logging period
    attack_cache_epochs: int = 0         # transfer protocol: reuse crafted attacks for K epochs (0: craft every step)
    attack_cache_overlap: bool = True    # craft the cache in a background thread while training consumes it
    student_init: str = "random"         # random (official) | teacher (start E_s from E_t's weights)
    train_head: bool = False             # also train a student copy C_s of the teacher head (deployed C_s(E_s(.)))
    eps_warmup_epochs: float = 0.0       # pool eps ramps linearly from 0 to full over these epochs (0: off)
    precision: str = "float32"           # float32 | mixed_bfloat16 (training only; see training/precision.py)

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or not self.learning_rate > 0:
            raise ConfigError("--mid_epochs must be >= 0, --batch_size and --mid_lr positive")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--mid_lr_schedule must be constant or cosine, got {self.lr_schedule}")
        if self.meta_order not in (1, 2):
            raise ConfigError(f"--meta_order must be 1 or 2, got {self.meta_order}")
        if self.attack_source not in ("target", "student"):
            raise ConfigError(f"--attack_source must be target or student, got {self.attack_source}")
        for flag, w in (("--meta_train_weights", self.train_weights), ("--meta_test_weights", self.test_weights)):
            if len(w) != 3 or min(w) < 0:
                raise ConfigError(f"{flag} takes three non-negative weights LC,AC,CC, got {w}")
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError("--meta_alpha and --meta_beta must be >= 0")
        if self.kl_reduction not in ("elementwise_mean", "distribution_mean"):
            raise ConfigError(f"--kl_reduction must be elementwise_mean or distribution_mean, got {self.kl_reduction}")
        if self.precision not in ("float32", "mixed_bfloat16"):
            raise ConfigError(f"--mid_precision must be float32 or mixed_bfloat16, got {self.precision}")
        if self.student_init not in ("random", "teacher"):
            raise ConfigError(f"--student_init must be random or teacher, got {self.student_init}")
        if self.attack_cache_epochs < 0:
            raise ConfigError(f"--attack_cache_epochs must be >= 0, got {self.attack_cache_epochs}")
        if self.eps_warmup_epochs < 0:
            raise ConfigError(f"--mid_eps_warmup_epochs must be >= 0, got {self.eps_warmup_epochs}")
        if self.attack_cache_epochs and self.attack_source != "target":
            raise ConfigError("--attack_cache_epochs needs --attack_source=target: attacks on the student change "
                              "with every step and cannot be cached")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The adversarial-training baselines (stages pgd_at, trades; training/baselines.py)."""
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    attack: str = "pgd10"          # inner attack (registry name): untargeted PGD/BIM/FGSM
    trades_beta: float = 6.0       # TRADES robustness weight (Zhang et al. 2019 use 6 on MNIST)
    eps_warmup_epochs: float = 2.0  # eps ramps linearly from 0 to the attack's eps over these epochs

    def validate(self) -> None:
        if self.epochs < 0 or not self.learning_rate > 0:
            raise ConfigError("--baseline_epochs must be >= 0 and --baseline_lr positive")
        if self.trades_beta < 0:
            raise ConfigError(f"--trades_beta must be >= 0, got {self.trades_beta}")
        if self.eps_warmup_epochs < 0:
            raise ConfigError(f"--baseline_eps_warmup_epochs must be >= 0, got {self.eps_warmup_epochs}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr_schedule must be constant or cosine, got {self.lr_schedule}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_dir: str
    data: DataConfig = DataConfig()
    stages: tuple = ("target", "teacher")
    seed: int = 0
    width: float = 1.0                 # channel multiplier of every network (1 = official)
    target: StageTrainConfig = StageTrainConfig(epochs=8, learning_rate=1e-3)
    teacher: StageTrainConfig = StageTrainConfig(epochs=12, learning_rate=1e-3)
    checkpoint_every: int = 200        # steps between mid-epoch checkpoints
    verbose: int = 1                   # Keras progress: 0 silent, 1 bar, 2 one line per epoch
    eval_batch_size: int = 1000
    mid: MIDStageConfig = MIDStageConfig()
    baseline: BaselineConfig = BaselineConfig()
    strategy: str = "default"          # default | mirrored | multi_worker
    eval_attacks: tuple = ("fgsm", "pgd40")      # eval stage: transfer attacks crafted on the target
    eval_whitebox_attacks: tuple = ("pgd40",)    # eval stage: attacks crafted on each model itself
    eval_slow_examples: int = 1000               # eval stage: images for eager-only attacks (CW, SPSA, ART)
    eval_eps_sweep: tuple = (0.1, 0.2, 0.3, 1.0)  # eval stage: white-box PGD-40 eps sweep (sanity check)
    eval_workers: int = 1                        # eval stage: processes sharing the attacks (evaluation/memo.py)
    eval_helper: bool = False                    # this process is a helper started by --eval_workers
    extras: dict = dataclasses.field(default_factory=dict)  # stage configs added by later stages

    def validate(self) -> "RunConfig":
        if not self.model_dir:
            raise ConfigError("--model_dir is required: the directory for checkpoints, logs and the summary")
        self.data.validate()
        unknown = [s for s in self.stages if s not in KNOWN_STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"--stages has unknown stage(s) {unknown}; choose from {list(KNOWN_STAGES)}")
        if self.width <= 0:
            raise ConfigError(f"--width must be positive, got {self.width}")
        if self.checkpoint_every <= 0:
            raise ConfigError(f"--checkpoint_every must be positive, got {self.checkpoint_every}")
        self.target.validate("target")
        self.teacher.validate("teacher")
        self.mid.validate()
        self.baseline.validate()
        if self.eval_slow_examples <= 0:
            raise ConfigError(f"--eval_slow_examples must be positive, got {self.eval_slow_examples}")
        if self.eval_workers < 1:
            raise ConfigError(f"--eval_workers must be at least 1, got {self.eval_workers}")
        if self.eval_helper and tuple(self.stages) != ("eval",):
            raise ConfigError("--eval_helper is set on the processes --eval_workers starts, which run "
                              f"--stages=eval only; got --stages={','.join(self.stages)}")
        if any(not 0 < e <= 1 for e in self.eval_eps_sweep):
            raise ConfigError(f"--eval_eps_sweep values must be in (0, 1], got {self.eval_eps_sweep}")
        if self.strategy not in ("default", "mirrored", "multi_worker"):
            raise ConfigError(f"--strategy must be default, mirrored or multi_worker, got {self.strategy}")
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict) -> "RunConfig":
        """The inverse of to_json (lists back to tuples, nested configs rebuilt)."""
        return _from_dict(cls, payload)


def _from_dict(cls, payload: dict):
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in payload:
            continue
        value, default = payload[field.name], getattr(cls, field.name, None)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value)
        elif isinstance(value, list) and (isinstance(default, tuple) or default is None):
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)
