"""Named attack configurations: `AttackSpec`, the default MNIST `REGISTRY`, and the spec syntax.

A spec says which attack, in which ball, with which steps and target policy; `crafting.make_attack`
turns it into a function. Specs are validated on construction (ValueError with the reason), and the
registry's names take overrides: `get_spec('pgd40:eps=0.2,nb_iter=10')`,
`parse_attack_list('pgd40:eps=0.2,nb_iter=10,mim40_t0')`. Untargeted attacks use the true labels,
targeted ones a target chosen by the spec's policy (`fixed:K`, `random`, `least_likely`).
Gradient attacks (FGM/BIM/PGD/MIM) are `graph_safe` (they run in `tf.function` / `strategy.run`);
CW-L2, SPSA (CleverHans) and the IBM ART attacks (`art_suite`) are eager-only.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from mid_tf.attacks import art_suite

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
          "cw_l2": (2,), "deepfool": (2,), "jsma": (np.inf,), "spatial": (np.inf,), "autoattack": (np.inf,),
          "autoattack_fast": (np.inf,)}
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
    if s.method in ("deepfool", "spatial", "autoattack", "autoattack_fast", "square") and s.target is not None:
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


# ---------------------------------------------------------------- per-dataset threat models
@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """The attack budget of a dataset: every registry spec's eps-ball is this one unless a spec overrides it.

    The registry above is written in MNIST's budget (L-inf 0.3, L2 2.0). For another budget, L-inf specs take
    eps = `linf` and step max(MNIST step scaled by linf / 0.3, linf / 4): 2/255 at 8/255, the standard PGD
    step on CIFAR-10 (Madry et al. 2018, Rice et al. 2020), so the 40-step attacks travel 10 eps and the short
    training attacks keep their step-to-eps ratio where it is larger; L2 specs scale eps and step by l2 / 2.0."""
    name: str
    linf: float
    l2: float

    def describe(self) -> str:
        return f"{self.name}: L-inf eps {self.linf:.4g} ({self.linf * 255:.3g}/255), L2 eps {self.l2:g}"

    def rescale(self, spec: AttackSpec) -> AttackSpec:
        if self == MNIST_THREAT or spec.eps is None:
            return spec
        if spec.kind == "linf":
            r, eps = self.linf / MNIST_THREAT.linf, self.linf
            step = None if spec.eps_iter is None else min(eps, max(spec.eps_iter * r, eps / 4))
        else:
            r = self.l2 / MNIST_THREAT.l2
            eps, step = spec.eps * r, None if spec.eps_iter is None else spec.eps_iter * r
        return dataclasses.replace(spec, eps=eps, eps_iter=step)


MNIST_THREAT = ThreatModel("mnist", 0.3, 2.0)
RGB_THREAT = ThreatModel("rgb", 8 / 255, 0.5)  # 32x32 natural images: CIFAR-10, SVHN, image folders
_GRAYSCALE_DATASETS = ("mnist", "fashion_mnist")


def threat_model_for(dataset: str, channels: int | None = None) -> ThreatModel:
    """MNIST's budget for MNIST, Fashion-MNIST and single-channel image folders, the RGB one otherwise."""
    return MNIST_THREAT if dataset in _GRAYSCALE_DATASETS or channels == 1 else RGB_THREAT


_active = {"threat": MNIST_THREAT, "registry": REGISTRY}


def active_threat_model() -> ThreatModel:
    return _active["threat"]


@contextlib.contextmanager
def threat_model(tm: ThreatModel):
    """Within the block, registry names resolve in `tm`'s budget (every thread: the attack cache crafts in
    one). A run enters it once for its dataset (stages.run); outside, the budget is MNIST's."""
    previous = dict(_active)
    _active.update(threat=tm, registry={n: tm.rescale(s) for n, s in REGISTRY.items()})
    try:
        yield tm
    finally:
        _active.update(previous)


def get_spec(name_or_spec, registry: dict | None = None) -> AttackSpec:
    """A spec from a registered name (in the active threat model's budget), optionally with overrides:
    'pgd40:eps=0.2,nb_iter=10'."""
    if isinstance(name_or_spec, AttackSpec):
        return name_or_spec
    reg = _active["registry"] if registry is None else registry
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
        raise ValueError(f"empty attack list; registered: {sorted(_active['registry'] if registry is None else registry)}")
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
