"""Attack grouping (known / unknown), the per-model summary and the gradient-masking sanity checks.

Groups: an attack is *known* when its family (method, norm, targeted or not) is in the MID training
pool (pgd40 is known to a pool with pgd10), otherwise *unknown*. Per threat model and model the
summary holds the mean over known, the mean over unknown, and the worst case (the minimum over
attacks, clean included).

Sanity flags (AutoAttack-style checks; each a sign of gradient masking, printed with the numbers):
  weaker_beats_stronger   white-box: a weaker attack leaves lower accuracy than a stronger one (not
                          checked for transfer, where iterative attacks overfit their source and
                          FGSM often transfers better than PGD: Kurakin et al. 2017)
  whitebox_above_transfer a model is more accurate under white-box than under the same transfer attack
  eps_not_monotone        white-box PGD accuracy rises as eps grows
  large_eps_not_zero      white-box PGD at eps >= 0.99 leaves more than 5% accuracy
  zero_gradients          more than 5% of test images have an exactly-zero input gradient of the
                          margin loss (logit_y - max other logit), which never saturates
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mid_tf.attacks import get_spec

# (weaker, stronger): the stronger attack of a pair must not leave higher accuracy than the weaker one.
STRENGTH_PAIRS = (("fgsm", "bim40"), ("fgsm", "pgd40"), ("fgsm", "mim40"), ("fgsm_t0", "pgd40_t0"),
                  ("pgd10", "pgd40"), ("pgd40", "autoattack"), ("apgd_ce", "autoattack"),
                  ("apgd_dlr", "autoattack_fast"), ("autoattack_fast", "autoattack"), ("square", "autoattack"))
TOLERANCE = 0.01  # accuracy points (as a fraction) a check allows before it flags


def base_name(attack: str) -> str:
    """The registered name of an attack spec string ("pgd40:nb_iter=3" -> "pgd40")."""
    return attack.split(":", 1)[0]


def pool_names(pool) -> list[str]:
    """A pool given as the attack-pool string or a sequence -> its attack names."""
    from mid_tf.attacks.registry import split_attack_list
    return split_attack_list(pool) if isinstance(pool, str) else list(pool)


def family(spec) -> tuple:
    return (spec.method, float(spec.norm), spec.targeted)


def attack_group(attack: str, pool) -> str:
    fams = {family(get_spec(p)) for p in pool if base_name(p) != "clean"}
    return "known" if family(get_spec(attack)) in fams else "unknown"


def zero_gradient_fraction(model_fn, x, y, batch_size: int = 500) -> float:
    """Fraction of images whose margin-loss input gradient is exactly zero everywhere."""
    zeros = 0
    for s in range(0, len(x), batch_size):
        xb = tf.constant(x[s:s + batch_size], tf.float32)
        yb = tf.constant(y[s:s + batch_size], tf.int64)
        with tf.GradientTape() as tape:
            tape.watch(xb)
            logits = tf.cast(model_fn(xb), tf.float32)
            true = tf.gather(logits, yb, batch_dims=1)
            other = tf.reduce_max(logits - 1e9 * tf.one_hot(yb, tf.shape(logits)[-1]), axis=-1)
            loss = tf.reduce_sum(true - other)
        g = tape.gradient(loss, xb)
        g = tf.zeros_like(xb) if g is None else g
        zeros += int(tf.reduce_sum(tf.cast(tf.reduce_all(tf.equal(tf.reshape(g, [len(xb), -1]), 0.0), -1),
                                           tf.int32)))
    return zeros / max(len(x), 1)


def summarise(table: dict, clean: dict, attacks: dict, models) -> dict:
    """{model: {known_mean, unknown_mean, worst, worst_attack}} of one threat model's table."""
    out = {}
    for m in models:
        known = [table[a][m] for a in table if m in table[a] and attacks[a]["group"] == "known"]
        unknown = [table[a][m] for a in table if m in table[a] and attacks[a]["group"] == "unknown"]
        cands = [("clean", clean[m])] + [(a, table[a][m]) for a in table if m in table[a]]
        worst = min(cands, key=lambda kv: kv[1])
        out[m] = {"known_mean": float(np.mean(known)) if known else None,
                  "unknown_mean": float(np.mean(unknown)) if unknown else None,
                  "worst": float(worst[1]), "worst_attack": worst[0]}
    return out


def sanity_flags(report: dict, tol: float = TOLERANCE) -> list[dict]:
    """The gradient-masking checks of the module docstring, on a report dict."""
    return (_strength_flags(report, tol) + _threat_flags(report, tol) + _eps_flags(report, tol)
            + _gradient_flags(report))


def _flag(flag: str, model: str, numbers: dict, message: str) -> dict:
    return {"flag": flag, "model": model, "numbers": numbers, "message": message}


def _strength_flags(report: dict, tol: float) -> list[dict]:
    flags, threat = [], "whitebox"
    table = report[threat]
    for weak, strong in STRENGTH_PAIRS:
        if weak in table and strong in table:
            for m in set(table[weak]) & set(table[strong]):
                a, b = table[weak][m], table[strong][m]
                if a < b - tol:
                    flags.append(_flag("weaker_beats_stronger", m, {weak: a, strong: b},
                                       f"{threat}: {weak} leaves {a:.2%} on {m} but the stronger {strong} {b:.2%}"))
    return flags


def _threat_flags(report: dict, tol: float) -> list[dict]:
    flags = []
    for attack in set(report["transfer"]) & set(report["whitebox"]):
        for m in set(report["transfer"][attack]) & set(report["whitebox"][attack]):
            if m == "target":
                continue
            t, w = report["transfer"][attack][m], report["whitebox"][attack][m]
            if w > t + tol:
                flags.append(_flag("whitebox_above_transfer", m, {"transfer": t, "whitebox": w},
                                   f"{attack}: {m} is more accurate under white-box ({w:.2%}) than under "
                                   f"transfer ({t:.2%}): its own gradients mislead the attack"))
    return flags


def _eps_flags(report: dict, tol: float) -> list[dict]:
    flags = []
    for m, sweep in report["eps_sweep"].items():
        pts = sorted((float(e), a) for e, a in sweep.items())
        for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
            if a1 > a0 + tol:
                flags.append(_flag("eps_not_monotone", m, {str(e0): a0, str(e1): a1},
                                   f"{m}: white-box PGD accuracy rises from {a0:.2%} at eps {e0:g} to "
                                   f"{a1:.2%} at eps {e1:g}"))
        for e, a in pts:
            if e >= 0.99 and a > 0.05:
                flags.append(_flag("large_eps_not_zero", m, {str(e): a},
                                   f"{m}: white-box PGD at eps {e:g} (the whole image) leaves {a:.2%}; it "
                                   "should reach ~0%"))
    return flags


def _gradient_flags(report: dict) -> list[dict]:
    return [_flag("zero_gradients", m, {"fraction": frac},
                  f"{m}: {frac:.1%} of test images have an exactly-zero margin-loss gradient")
            for m, frac in report["zero_gradient_fraction"].items() if frac > 0.05]
