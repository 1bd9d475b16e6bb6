"""Named attack configurations (`AttackSpec`) and `make_attack(spec) -> fn(model_fn, x, y, seed)`.

Every attack is a plain CleverHans-style function: `model_fn` (float32 images in [0,1] -> logits) is
given at call time, so the same spec attacks the fixed target or the student pipeline. Untargeted
attacks use the true labels `y` (as the official advertorch code), targeted ones a target chosen by
the spec's policy (`fixed:K`, `random`, `least_likely`). Outputs are float32 tensors in [0,1] with
`tf.stop_gradient` applied: only input gradients are ever taken, never weight gradients, and an outer
training tape does not differentiate through the attack.

Gradient attacks (FGM/BIM/PGD/MIM) call CleverHans 4.0.0 with `sanity_checks=False`; they are
`graph_safe` (run in `tf.function` / `strategy.run`) and deterministic given `seed` (an int or a [2]
int tensor: the PGD random start and random targets come from stateless ops keyed by it; `seed=None`
draws fresh randomness). CW-L2 and SPSA (CleverHans, patched by `cleverhans_compat`) and the IBM ART
attacks (`art_suite`) are eager-only.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from mid_tf.attacks import art_suite, cleverhans_compat
from mid_tf.attacks.cleverhans_compat import as_seed, fold

GRADIENT_METHODS = ("fgm", "bim", "pgd", "mim")
EAGER_CH_METHODS = ("cw_l2", "spsa")
# Method-specific parameters with their defaults (overridable as `name:key=value`).
METHOD_PARAMS = {
    "cw_l2": {"binary_search_steps": 4, "max_iterations": 500, "confidence": 1.0, "initial_const": 1.0,
              "learning_rate": 1e-2, "abort_early": True, "batch_size": 128},
    "spsa": {"learning_rate": 0.01, "delta": 0.01, "spsa_samples": 128, "spsa_iters": 1,
             # Stop once the margin loss is < 0, i.e. the image is already misclassified (or hits its
             # target): the attack can only be as strong or stronger per image, as in Uesato et al. 2018.
             "early_stop_loss_threshold": 0.0},
    # PGD: `restarts` random starts, the per-image strongest kept (by the margin of the final point);
    # `loss` ce (CleverHans' default) or margin (max_{j!=y} z_j - z_y, CW's loss: it does not saturate).
    "pgd": {"restarts": 1, "loss": "ce"},
    **art_suite.ART_PARAMS,
}
METHODS = ("clean",) + GRADIENT_METHODS + EAGER_CH_METHODS + tuple(art_suite.ART_PARAMS)
_NORMS = {"fgm": (np.inf, 2), "bim": (np.inf, 2), "pgd": (np.inf, 2), "mim": (np.inf, 2), "spsa": (np.inf,),
          "cw_l2": (2,), "deepfool": (2,), "jsma": (np.inf,), "spatial": (np.inf,)}
_KINDS = {"clean": "none", "cw_l2": "l2", "deepfool": "l2", "jsma": "l0", "spatial": "spatial"}
_UNBOUNDED = ("clean", "cw_l2", "deepfool", "jsma", "spatial")  # no eps-ball (eps must be None)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One named attack configuration; validated on construction (ValueError with the reason)."""
    name: str
    method: str
    eps: float | None = 0.3
    norm: float = np.inf
    nb_iter: int = 1
    eps_iter: float | None = None
    rand_init: bool = False
    decay: float = 1.0
    target: str | None = None          # None = untargeted; "fixed:K" | "random" | "least_likely"
    params: tuple = ()                 # method-specific (key, value) pairs, see METHOD_PARAMS

    def __post_init__(self):
        _validate(self)

    @property
    def targeted(self) -> bool:
        return self.target is not None

    @property
    def kind(self) -> str:
        """linf / l2 / l0 / spatial / none: which bound `eps` refers to (for norm checks)."""
        return _KINDS.get(self.method, "linf" if self.norm == np.inf else "l2")

    @property
    def graph_safe(self) -> bool:
        """True when the attack runs inside tf.function and strategy.run (training pools need it)."""
        return self.method in ("clean",) + GRADIENT_METHODS

    def param(self, key: str):
        return dict(self.params).get(key, METHOD_PARAMS.get(self.method, {}).get(key))

    def replace(self, **overrides) -> "AttackSpec":
        """A copy with fields or method params overridden (`eps=0.2`, `max_iterations=50`)."""
        fields = {f.name for f in dataclasses.fields(self)}
        params = dict(self.params)
        direct = {}
        for k, v in overrides.items():
            if k in fields:
                direct[k] = v
            elif k in METHOD_PARAMS.get(self.method, {}):
                params[k] = v
            else:
                valid = sorted(fields - {"name", "method", "params"}) + sorted(METHOD_PARAMS.get(self.method, {}))
                raise ValueError(f"attack '{self.name}': unknown parameter '{k}'; valid: {valid}")
        return dataclasses.replace(self, **direct, params=tuple(sorted(params.items())))


def _validate(s: AttackSpec) -> None:
    def bad(msg):
        raise ValueError(f"attack '{s.name}': {msg}")
    if s.method not in METHODS:
        bad(f"unknown method '{s.method}'; valid methods: {list(METHODS)}")
    if s.method in _NORMS and s.norm not in _NORMS[s.method]:
        bad(f"norm {s.norm} not supported by {s.method}; valid: {list(_NORMS[s.method])}")
    if s.norm not in (np.inf, 2):
        bad(f"norm must be inf or 2, got {s.norm}")
    if s.method in _UNBOUNDED:
        if s.eps is not None:
            bad(f"{s.method} has no eps-ball; leave eps=None")
    elif s.eps is None or not s.eps > 0:
        bad(f"eps must be > 0, got {s.eps}")
    if int(s.nb_iter) != s.nb_iter or s.nb_iter < 1:
        bad(f"nb_iter must be a positive integer, got {s.nb_iter}")
    if s.method in ("bim", "pgd", "mim"):
        if s.eps_iter is None or not 0 < s.eps_iter <= s.eps:
            bad(f"eps_iter must be in (0, eps={s.eps}], got {s.eps_iter}")
    if s.decay < 0:
        bad(f"decay must be >= 0, got {s.decay}")
    if s.rand_init and s.method != "pgd":
        bad("rand_init is only supported by pgd")
    if s.method == "clean" and s.target is not None:
        bad("clean cannot be targeted")
    if s.method in ("deepfool", "spatial", "autoattack", "square") and s.target is not None:
        bad(f"{s.method} is untargeted only here")
    if s.method == "jsma" and s.target is None:
        bad("jsma needs a target policy (fixed:K, random or least_likely)")
    if s.target is not None:
        parse_target(s.target, s.name)
    known = METHOD_PARAMS.get(s.method, {})
    for k, _ in s.params:
        if k not in known:
            bad(f"unknown parameter '{k}' for {s.method}; valid: {sorted(known)}")
    if s.method == "pgd":
        if int(s.param("restarts")) != s.param("restarts") or s.param("restarts") < 1:
            bad(f"restarts must be a positive integer, got {s.param('restarts')}")
        if s.param("loss") not in ("ce", "margin"):
            bad(f"loss must be ce or margin, got {s.param('loss')!r}")
        if s.param("restarts") > 1 and not s.rand_init:
            bad("restarts > 1 needs rand_init=True (otherwise every restart is the same)")
    if s.method in art_suite.BROKEN:
        bad(f"excluded: {art_suite.BROKEN[s.method]}")


def parse_target(policy: str, name: str = "?") -> tuple[str, int | None]:
    """'fixed:K' -> ('fixed', K); 'random' / 'least_likely' -> (policy, None)."""
    if policy in ("random", "least_likely"):
        return policy, None
    if policy.startswith("fixed:") and policy[6:].isdigit():
        return "fixed", int(policy[6:])
    raise ValueError(f"attack '{name}': target policy '{policy}' invalid; use fixed:K, random or least_likely")


# ---------------------------------------------------------------- default MNIST registry
_NO_TARGETED_TWIN = ("pgd100x5", "pgd100x5_margin", "fgsm_rs", "pgd3", "pgd5", "pgd20", "pgd_l2_5")

def _mnist_defaults() -> dict[str, AttackSpec]:
    S = AttackSpec
    base = [
        S("clean", "clean", eps=None),
        S("fgsm", "fgm", eps=0.3),
        S("bim40", "bim", eps=0.3, eps_iter=0.05, nb_iter=40),
        S("pgd40", "pgd", eps=0.3, eps_iter=0.01, nb_iter=40, rand_init=True),
        S("mim40", "mim", eps=0.3, eps_iter=0.01, nb_iter=40, decay=1.0),
        # 10-step versions for CPU-sized training pools (step 0.04: 10 steps still travel past eps 0.3)
        S("pgd10", "pgd", eps=0.3, eps_iter=0.04, nb_iter=10, rand_init=True),
        S("mim10", "mim", eps=0.3, eps_iter=0.04, nb_iter=10, decay=1.0),
        S("pgd_l2", "pgd", eps=2.0, norm=2, eps_iter=0.1, nb_iter=40, rand_init=True),
        # Strong white-box evaluation (issue: white-box robust MID): 100 steps, 5 random restarts, on CE
        # and on the margin loss; the per-image worst restart counts.
        S("pgd100x5", "pgd", eps=0.3, eps_iter=0.01, nb_iter=100, rand_init=True, params=(("restarts", 5),)),
        S("pgd100x5_margin", "pgd", eps=0.3, eps_iter=0.01, nb_iter=100, rand_init=True,
          params=(("loss", "margin"), ("restarts", 5))),
        # Cheap white-box *training* members (attacks crafted on the student every step):
        # FGSM with a random start (Wong et al. 2020, "Fast is better than free"), PGD-3 / PGD-5 with
        # random starts and steps that still cross the ball, and a 5-step L2 PGD.
        S("fgsm_rs", "pgd", eps=0.3, eps_iter=0.3, nb_iter=1, rand_init=True),
        S("pgd3", "pgd", eps=0.3, eps_iter=0.1, nb_iter=3, rand_init=True),
        S("pgd5", "pgd", eps=0.3, eps_iter=0.075, nb_iter=5, rand_init=True),
        # 20 steps of 0.025 (travel 0.5, past the ball's diameter): the white-box pool's strongest member
        S("pgd20", "pgd", eps=0.3, eps_iter=0.025, nb_iter=20, rand_init=True),
        S("pgd_l2_5", "pgd", eps=2.0, norm=2, eps_iter=0.5, nb_iter=5, rand_init=True),
        S("cw_l2", "cw_l2", eps=None, norm=2),
        S("spsa", "spsa", eps=0.3, nb_iter=100),
    ]
    out = {}
    for s in base:
        out[s.name] = s
        if s.method != "clean" and s.name not in _NO_TARGETED_TWIN:  # targeted-to-class-0 twin, as the official `_T` attacks
            out[s.name + "_t0"] = dataclasses.replace(s, name=s.name + "_t0", target="fixed:0")
    for pol, suffix in (("random", "_trand"), ("least_likely", "_tll")):
        out["pgd40" + suffix] = dataclasses.replace(out["pgd40"], name="pgd40" + suffix, target=pol)
    for s in art_suite.default_specs(S):
        out[s.name] = s
    return out


REGISTRY: dict[str, AttackSpec] = _mnist_defaults()


def get_spec(name_or_spec, registry: dict | None = None) -> AttackSpec:
    """A spec from a registered name, optionally with overrides: 'pgd40:eps=0.2,nb_iter=10'."""
    if isinstance(name_or_spec, AttackSpec):
        return name_or_spec
    reg = REGISTRY if registry is None else registry
    name, _, over = str(name_or_spec).strip().partition(":")
    if name not in reg:
        raise ValueError(f"unknown attack '{name}'; registered: {sorted(reg)}")
    spec = reg[name]
    if over:
        kv = {}
        for item in over.split(","):
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"attack '{name}': override '{item}' is not key=value")
            kv[k.strip()] = _parse_value(k.strip(), v.strip())
        spec = spec.replace(**kv)
        spec = dataclasses.replace(spec, name=str(name_or_spec).strip())
    return spec


def split_attack_list(text: str) -> list[str]:
    """'pgd40:eps=0.2,nb_iter=10,mim40_t0' -> ['pgd40:eps=0.2,nb_iter=10', 'mim40_t0']. A comma item
    `key=value` (no ':' before its '=') continues the previous attack's overrides."""
    groups: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, eq, _ = item.partition("=")
        if eq and ":" not in key and groups:
            groups[-1] += "," + item
        else:
            groups.append(item)
    return groups


def parse_attack_list(text: str, registry: dict | None = None) -> list[AttackSpec]:
    """'pgd40:eps=0.2,nb_iter=10,mim40_t0' -> specs (see `split_attack_list`)."""
    groups = split_attack_list(text)
    if not groups:
        raise ValueError(f"empty attack list; registered: {sorted(REGISTRY if registry is None else registry)}")
    return [get_spec(g, registry) for g in groups]


def _parse_value(key: str, v: str):
    if key == "target":
        return None if v.lower() in ("none", "") else v
    if key == "norm":
        return np.inf if v.lower() in ("inf", "linf", "np.inf") else float(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


# ---------------------------------------------------------------- labels for an attack
def attack_labels(spec: AttackSpec, model_fn, x, y, seed=None) -> tf.Tensor:
    """int64 labels the attack optimises for: true labels (untargeted) or targets (targeted)."""
    if not spec.targeted:
        if y is None:
            return tf.argmax(model_fn(x), axis=-1)
        return tf.cast(y, tf.int64)
    policy, k = parse_target(spec.target, spec.name)
    if policy == "fixed":
        return tf.fill(tf.shape(x)[:1], tf.constant(k, tf.int64))
    logits = model_fn(x)
    if policy == "least_likely":
        return tf.argmin(logits, axis=-1)
    if y is None:
        y = tf.argmax(logits, axis=-1)
    c = tf.cast(tf.shape(logits)[-1], tf.int64)
    shape = tf.shape(x)[:1]
    if seed is None:
        off = tf.random.uniform(shape, 1, c, dtype=tf.int64)
    else:
        off = tf.random.stateless_uniform(shape, fold(seed, 1), 1, c, dtype=tf.int64)
    return (tf.cast(y, tf.int64) + off) % c


def start_seed(seed):
    """The seed of the PGD random start for an attack called with `seed` (shared with `batched`)."""
    return None if seed is None else fold(seed, 0)


# ---------------------------------------------------------------- attack functions
def make_attack(spec) -> callable:
    """`fn(model_fn, x, y, seed=None) -> x_adv` (float32 tensor in [0,1]) for a spec or a name."""
    spec = get_spec(spec)
    cleverhans_compat.apply()
    if spec.method == "clean":
        def clean(model_fn, x, y=None, seed=None):
            return tf.convert_to_tensor(x, tf.float32)
        return clean
    if spec.method in GRADIENT_METHODS:
        return _gradient_attack(spec)
    if spec.method == "cw_l2":
        return _cw_l2(spec)
    if spec.method == "spsa":
        return _spsa(spec)
    return art_suite.make_art_attack(spec, attack_labels)


def _gradient_attack(spec: AttackSpec):
    from cleverhans.tf2.attacks.basic_iterative_method import basic_iterative_method
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    def fn(model_fn, x, y=None, seed=None):
        x = tf.convert_to_tensor(x, tf.float32)
        labels = attack_labels(spec, model_fn, x, y, seed)
        common = dict(clip_min=0.0, clip_max=1.0, y=labels, targeted=spec.targeted, sanity_checks=False)
        if spec.method == "fgm":
            adv = fast_gradient_method(model_fn, x, spec.eps, spec.norm, **common)
        elif spec.method == "bim":
            adv = basic_iterative_method(model_fn, x, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm, **common)
        elif spec.method == "mim":
            adv = momentum_iterative_method(model_fn, x, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm,
                                            decay_factor=spec.decay, **common)
        else:
            adv = _pgd_with_restarts(spec, model_fn, x, labels, seed, common)
        return tf.stop_gradient(adv)
    return fn


def margin_loss(labels, logits):
    """max_{j != label} z_j - z_label per example: CW's loss, which never saturates like softmax CE."""
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return tf.reduce_max(logits - 1e9 * onehot, -1) - tf.reduce_sum(logits * onehot, -1)


def _pgd_with_restarts(spec: AttackSpec, model_fn, x, labels, seed, common):
    """CleverHans PGD, `restarts` times from different random starts; per image, the restart whose
    final point has the largest margin loss (untargeted) / smallest (targeted) is kept."""
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
    restarts, loss = int(spec.param("restarts")), spec.param("loss")
    extra = {"loss_fn": margin_loss} if loss == "margin" else {}
    best, best_score = None, None
    for r in range(restarts):
        r_seed = None if seed is None else (seed if restarts == 1 else fold(seed, 1000 + r))
        ctx = (cleverhans_compat.seeded_random_start(start_seed(r_seed))
               if spec.rand_init and r_seed is not None else contextlib.nullcontext())
        with ctx:
            adv = projected_gradient_descent(model_fn, x, spec.eps, spec.eps_iter, spec.nb_iter, spec.norm,
                                             rand_init=spec.rand_init, **extra, **common)
        if restarts == 1:
            return adv
        score = margin_loss(labels, model_fn(adv)) * (-1.0 if spec.targeted else 1.0)
        if best is None:
            best, best_score = adv, score
        else:
            take = score > best_score
            best = tf.where(tf.reshape(take, [-1] + [1] * (len(x.shape) - 1)), adv, best)
            best_score = tf.maximum(score, best_score)
    return best


def _require_eager(spec):
    if not tf.executing_eagerly():
        raise RuntimeError(f"attack '{spec.name}' ({spec.method}) is eager-only (graph_safe=False); call it "
                           "outside tf.function / strategy.run")


def _cw_l2(spec: AttackSpec):
    from cleverhans.tf2.attacks.carlini_wagner_l2 import carlini_wagner_l2

    def fn(model_fn, x, y=None, seed=None):
        _require_eager(spec)
        x = np.asarray(x, np.float32)
        # CleverHans CW is targeted iff y is given; untargeted uses the model's own predictions.
        tgt = attack_labels(spec, model_fn, tf.constant(x), y, seed).numpy() if spec.targeted else None
        p = {k: spec.param(k) for k in METHOD_PARAMS["cw_l2"]}
        # CleverHans chunks x by its batch_size but passes the whole y to every chunk: chunk here instead.
        bs = int(p["batch_size"])
        adv = np.concatenate([
            carlini_wagner_l2(model_fn, x[i:i + bs], y=None if tgt is None else tgt[i:i + bs],
                              targeted=spec.targeted, clip_min=0.0, clip_max=1.0, **p)
            for i in range(0, len(x), bs)])
        return tf.constant(np.clip(adv, 0.0, 1.0), tf.float32)
    return fn


def _spsa(spec: AttackSpec):
    from cleverhans.tf2.attacks import spsa as spsa_mod

    def fn(model_fn, x, y=None, seed=None):
        _require_eager(spec)
        x = tf.convert_to_tensor(x, tf.float32)
        labels = attack_labels(spec, model_fn, x, y, seed)
        sign = 1.0 if spec.targeted else -1.0
        base = None if seed is None else int(np.dot(as_seed(seed).numpy(), [1, 1_000_003]) % (2 ** 31 - 1))

        def loss_fn(xx, label):  # CleverHans' SPSA objective: margin loss, signed for (un)targeted
            logits = model_fn(xx)
            return sign * spsa_mod.margin_logit_loss(logits, label, nb_classes=logits.shape[-1])

        # One optimizer whose seeded generator is re-seeded per image, and one traced per-image loop:
        # CleverHans' `tf.while_loop` run eagerly costs ~10x the same loop inside `tf.function`.
        opt = cleverhans_compat.SPSAAdamPlain(lr=spec.param("learning_rate"), delta=spec.param("delta"),
                                              num_samples=spec.param("spsa_samples"),
                                              num_iters=spec.param("spsa_iters"),
                                              seed=None if base is None else base)

        @tf.function(reduce_retracing=True)
        def one(x_i, label_i, start_seed):  # SPSA needs a static batch of 1
            return spsa_mod.projected_optimization(
                loss_fn, x_i, label_i, spec.eps, spec.nb_iter, opt, 0.0, 1.0,
                spec.param("early_stop_loss_threshold"),
                project_perturbation=_seeded_init_projection(None if base is None else start_seed, spec.eps))

        out = []
        for i in range(int(x.shape[0])):
            if base is not None:
                opt._rng.reset_from_seed(base + 2 * i)
            s_i = 0 if base is None else base + 2 * i + 1
            out.append(one(x[i:i + 1], labels[i:i + 1], tf.constant(s_i, tf.int64)))
        return tf.stop_gradient(tf.clip_by_value(tf.concat(out, 0), 0.0, 1.0))
    return fn


def _seeded_init_projection(seed, eps):
    """CleverHans' L-inf projection; with a seed its first call (the random start) redraws the start
    from that seed, so SPSA is reproducible without touching TF's global seed."""
    from cleverhans.tf2.attacks.spsa import _project_perturbation
    calls = [0]

    def project(perturbation, epsilon, input_image, clip_min=None, clip_max=None):
        if calls[0] == 0 and seed is not None:
            perturbation = tf.random.stateless_uniform(
                tf.shape(input_image), tf.stack([tf.cast(seed, tf.int64), tf.constant(7, tf.int64)]), -eps, eps)
        calls[0] += 1
        return _project_perturbation(perturbation, epsilon, input_image, clip_min=clip_min, clip_max=clip_max)
    return project
