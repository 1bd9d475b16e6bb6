"""The robustness report: every model, every attack, two threat models, known vs unknown, sanity flags.

    report = build_report(models, x, y, attacks=[...], pool=[...], ...)   # a dict (schema below)
    write_report(report, out_dir, grids)   # report.json, report.md, PNG figures
    log_tensorboard(report, log_dir, grids)

Threat models (side by side for every model):
  transfer   adversarials crafted once on the undefended target, classified by every model (the paper's
             protocol); for the target itself transfer == white-box
  whitebox   adversarials crafted end to end on the model that classifies them
Groups: an attack is *known* when its family (method, norm, targeted or not) is in the MID training
pool (pgd40 is known to a pool with pgd10), otherwise *unknown*. Per threat model and model: the
accuracy per attack, the mean over known, the mean over unknown, and the worst case (the minimum over
attacks, clean included). Eager-only attacks (CW, SPSA, ART's AutoAttack, DeepFool, Square, spatial,
JSMA) run on the first `slow_examples` images; the report records each attack's example count.
Regeneration: PSNR and SSIM (tf.image, max_val 1) of D_t(E_s(x~)) against x, per transfer attack.

Sanity flags (AutoAttack-style checks; each a sign of gradient masking, printed with the numbers):
  weaker_beats_stronger   white-box: a weaker attack leaves lower accuracy than a stronger one (not
                          checked for transfer, where iterative attacks overfit their source and
                          FGSM often transfers better than PGD: Kurakin et al. 2017)
  whitebox_above_transfer a model is more accurate under white-box than under the same transfer attack
  eps_not_monotone        white-box PGD accuracy rises as eps grows
  large_eps_not_zero      white-box PGD at eps >= 0.99 leaves more than 5% accuracy
  zero_gradients          more than 5% of test images have an exactly-zero input gradient of the
                          margin loss (logit_y - max other logit), which never saturates

report.json schema (`SCHEMA`, checked by `validate_report`):
  schema, created, dataset, examples, seed, versions{tensorflow,keras,cleverhans,art,python}, config,
  models[list], pool[list], attacks{name: {group, method, norm, eps, targeted, examples, spec}},
  clean{model: acc}, transfer{attack: {model: acc}}, whitebox{attack: {model: acc}},
  summary{threat: {model: {known_mean, unknown_mean, worst, worst_attack}}},
  regeneration{"clean"|attack: {psnr_db, ssim}}, eps_sweep{model: {eps: acc}},
  zero_gradient_fraction{model: frac}, sanity[list of {flag, model, message, numbers}]
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform

import numpy as np
import tensorflow as tf

from mid_tf.attacks import get_spec
from mid_tf.evaluation.memo import ReportMemo, fingerprint
from mid_tf.evaluation.robustness import accuracy, craft

SCHEMA = "mid_tf.eval_report/1"
REQUIRED_KEYS = {"schema": str, "created": str, "dataset": str, "examples": int, "seed": int, "versions": dict,
                 "config": dict, "models": list, "pool": list, "attacks": dict, "clean": dict, "transfer": dict,
                 "whitebox": dict, "summary": dict, "regeneration": dict, "eps_sweep": dict,
                 "zero_gradient_fraction": dict, "sanity": list}
# (weaker, stronger): the stronger attack of a pair must not leave higher accuracy than the weaker one.
STRENGTH_PAIRS = (("fgsm", "bim40"), ("fgsm", "pgd40"), ("fgsm", "mim40"), ("fgsm_t0", "pgd40_t0"),
                  ("pgd10", "pgd40"), ("pgd40", "autoattack"), ("apgd_ce", "autoattack"),
                  ("apgd_dlr", "autoattack"), ("square", "autoattack"))
TOLERANCE = 0.01  # accuracy points (as a fraction) a check allows before it flags


def base_name(attack: str) -> str:
    return attack.split(":", 1)[0]


def pool_names(pool) -> list[str]:
    """A pool given as the --attack_pool string or a sequence -> its attack names."""
    from mid_tf.attacks.registry import split_attack_list
    return split_attack_list(pool) if isinstance(pool, str) else list(pool)


def family(spec) -> tuple:
    return (spec.method, float(spec.norm), spec.targeted)


def attack_group(attack: str, pool) -> str:
    fams = {family(get_spec(p)) for p in pool if base_name(p) != "clean"}
    return "known" if family(get_spec(attack)) in fams else "unknown"


def _versions() -> dict:
    import keras
    out = {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()}
    for mod, key in (("cleverhans", "cleverhans"), ("art", "art")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informative only
            out[key] = "unknown"
    return out


def _as_fn(model):
    import keras
    if isinstance(model, keras.Model):
        return lambda z, _m=model: _m(z, training=False)
    return model


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


def _summarise(table: dict, clean: dict, attacks: dict, models) -> dict:
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
    flags = []
    for threat in ("whitebox",):
        table = report[threat]
        for weak, strong in STRENGTH_PAIRS:
            if weak in table and strong in table:
                for m in set(table[weak]) & set(table[strong]):
                    a, b = table[weak][m], table[strong][m]
                    if a < b - tol:
                        flags.append({"flag": "weaker_beats_stronger", "model": m, "numbers": {weak: a, strong: b},
                                      "message": f"{threat}: {weak} leaves {a:.2%} on {m} but the stronger {strong} "
                                                 f"{b:.2%}"})
    for attack in set(report["transfer"]) & set(report["whitebox"]):
        for m in set(report["transfer"][attack]) & set(report["whitebox"][attack]):
            if m == "target":
                continue
            t, w = report["transfer"][attack][m], report["whitebox"][attack][m]
            if w > t + tol:
                flags.append({"flag": "whitebox_above_transfer", "model": m, "numbers": {"transfer": t, "whitebox": w},
                              "message": f"{attack}: {m} is more accurate under white-box ({w:.2%}) than under "
                                         f"transfer ({t:.2%}): its own gradients mislead the attack"})
    for m, sweep in report["eps_sweep"].items():
        pts = sorted((float(e), a) for e, a in sweep.items())
        for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
            if a1 > a0 + tol:
                flags.append({"flag": "eps_not_monotone", "model": m, "numbers": {str(e0): a0, str(e1): a1},
                              "message": f"{m}: white-box PGD accuracy rises from {a0:.2%} at eps {e0:g} to "
                                         f"{a1:.2%} at eps {e1:g}"})
        for e, a in pts:
            if e >= 0.99 and a > 0.05:
                flags.append({"flag": "large_eps_not_zero", "model": m, "numbers": {str(e): a},
                              "message": f"{m}: white-box PGD at eps {e:g} (the whole image) leaves {a:.2%}; it "
                                         "should reach ~0%"})
    for m, frac in report["zero_gradient_fraction"].items():
        if frac > 0.05:
            flags.append({"flag": "zero_gradients", "model": m, "numbers": {"fraction": frac},
                          "message": f"{m}: {frac:.1%} of test images have an exactly-zero margin-loss gradient"})
    return flags


def build_report(models: dict, x: np.ndarray, y: np.ndarray, *, attacks, whitebox_attacks=None, pool=(),
                 target: str = "target", regenerator=None, slow_examples: int = 1000, seed: int = 0,
                 eps_sweep=(0.1, 0.2, 0.3, 1.0), sweep_attack: str = "pgd40", dataset: str = "mnist",
                 config: dict | None = None, progress: bool = True, batch_size: int = 500, log=print,
                 grid_attacks=(), grid_images: int = 8, memo: ReportMemo | None = None,
                 poll_s: float = 10.0, wait_for_others: bool = True) -> tuple[dict | None, dict]:
    """(report, grids). `models`: name -> Keras model or logits fn, including `target` (the transfer
    source). `attacks`: transfer attacks; `whitebox_attacks` (default: the same). `regenerator`:
    x -> D_t(E_s(x)) for the regeneration metrics and the image grids (optional). `memo`: finished
    pieces on disk (evaluation/memo.py), so that a killed evaluation resumes where it stopped, and
    several processes started with the same memo share the work (`poll_s`: how often a worker that
    has finished its own pieces looks for the others'). With `wait_for_others=False` (a helper
    worker) it returns (None, grids) as soon as every piece is done or held by another worker."""
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    y = np.asarray(y).astype(np.int64)
    whitebox_attacks = list(attacks if whitebox_attacks is None else whitebox_attacks)
    fns = {m: _as_fn(f) for m, f in models.items()}
    if target not in fns:
        raise ValueError(f"models must include the transfer source '{target}'")
    names = list(fns)
    report = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dataset": dataset, "examples": int(len(x)), "seed": int(seed), "versions": _versions(),
              "config": config or {}, "models": names, "pool": [base_name(p) for p in pool], "attacks": {},
              "clean": {m: accuracy(f, x, y) for m, f in fns.items()}, "transfer": {}, "whitebox": {},
              "regeneration": {}, "eps_sweep": {}, "zero_gradient_fraction": {}}
    grids = {}
    memo = memo or ReportMemo(None)
    fps = {m: fingerprint(f) for m, f in models.items()}
    fps["data"] = hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()  # same images, same labels
    regen_fp = fingerprint(regenerator) if regenerator is not None else "none"
    regen_fn = _as_fn(regenerator) if regenerator is not None else None
    if regen_fn is not None:
        report["regeneration"]["clean"] = _regeneration_quality(regen_fn, x, x)

    def n_for(spec):
        return len(x) if spec.graph_safe else min(len(x), slow_examples)

    def describe(attack):
        spec = get_spec(attack)
        key = base_name(attack)
        report["attacks"].setdefault(key, {"group": attack_group(attack, pool), "method": spec.method,
                                           "norm": "inf" if spec.norm == np.inf else float(spec.norm),
                                           "eps": spec.eps, "targeted": spec.targeted, "examples": n_for(spec),
                                           "spec": attack})
        return spec, key, n_for(spec)

    # The report is a list of pieces, each (memo key, label, compute() -> value, apply(value)): a
    # piece found in the memo is applied, one claimed by another worker is awaited at the end.
    pieces = []

    def transfer_piece(attack):
        spec, key, n = describe(attack)
        report["transfer"][key] = None

        def compute():
            adv = craft(attack, fns[target], x[:n], y[:n], batch_size=batch_size, seed=seed, progress=progress)
            value = {"accuracy": {m: accuracy(f, adv, y[:n]) for m, f in fns.items()}, "regeneration": None,
                     "grid": None}
            if regen_fn is not None:
                value["regeneration"] = _regeneration_quality(regen_fn, adv, x[:n])
                if key in grid_attacks:
                    k = min(grid_images, n)
                    value["grid"] = np.stack([x[:k], adv[:k], np.clip(np.asarray(regen_fn(tf.constant(adv[:k]))),
                                                                       0, 1)]).tolist()
            return value

        def apply(done):
            report["transfer"][key] = done["accuracy"]
            if done.get("regeneration"):
                report["regeneration"][key] = done["regeneration"]
            if done.get("grid") is not None:
                grids[key] = np.asarray(done["grid"], np.float32)

        pieces.append((ReportMemo.key("transfer", attack, n, seed, target, fps, regen_fp, key in grid_attacks),
                       f"transfer {key} on {n} images (crafted on {target})", compute, apply))

    shared_with_transfer = []  # (key, target): white-box on the target = its transfer numbers

    def whitebox_piece(attack, m, f):
        spec, key, n = describe(attack)
        report["whitebox"].setdefault(key, {})[m] = None
        if m == target and attack in attacks and base_name(attack) == key:
            shared_with_transfer.append(key)  # same adversarials, same source
            return

        def compute():
            adv = craft(attack, f, x[:n], y[:n], batch_size=batch_size, seed=seed, progress=progress)
            return accuracy(f, adv, y[:n])

        def apply(done):
            report["whitebox"][key][m] = done

        pieces.append((ReportMemo.key("whitebox", attack, n, seed, m, fps[m], fps["data"]),
                       f"white-box {key} on {m}, {n} images", compute, apply))

    def checks_piece(m, f):
        n = min(len(x), 1000)
        report["zero_gradient_fraction"][m] = None
        if eps_sweep:
            report["eps_sweep"][m] = None

        def compute():
            value = {"zero_gradient_fraction": zero_gradient_fraction(f, x[:n], y[:n]), "eps_sweep": None}
            if eps_sweep:
                value["eps_sweep"] = {}
                for eps in eps_sweep:
                    spec = get_spec(sweep_attack).replace(eps=float(eps), eps_iter=max(float(eps) / 10, 0.01))
                    adv = craft(spec, f, x[:n], y[:n], batch_size=batch_size, seed=seed, progress=False)
                    value["eps_sweep"][f"{float(eps):g}"] = accuracy(f, adv, y[:n])
            return value

        def apply(done):
            report["zero_gradient_fraction"][m] = done["zero_gradient_fraction"]
            if eps_sweep:
                report["eps_sweep"][m] = done["eps_sweep"]

        pieces.append((ReportMemo.key("checks", m, fps[m], fps["data"], seed, n, list(eps_sweep or ()), sweep_attack),
                       f"gradient and eps checks on {m}, {n} images", compute, apply))

    for attack in attacks:
        transfer_piece(attack)
    for attack in whitebox_attacks:
        for m, f in fns.items():
            whitebox_piece(attack, m, f)
    for m, f in fns.items():
        checks_piece(m, f)
    left = _run_pieces(pieces, memo, log if progress else (lambda *_: None), poll_s, wait_for_others)
    if left:
        log(f"{left} piece(s) left to the other workers")
        return None, grids
    for key in shared_with_transfer:
        report["whitebox"][key][target] = report["transfer"][key][target]
    report["summary"] = {t: _summarise(report[t], report["clean"], report["attacks"], names)
                         for t in ("transfer", "whitebox")}
    report["sanity"] = sanity_flags(report)
    return report, grids


def _compute_claimed(memo: ReportMemo, key, compute):
    """Crafts a piece this worker has claimed, stores it, and always lets the claim go (a crash frees
    the piece for the others at once instead of after the holder is seen dead)."""
    try:
        done = compute()
        memo.put(key, done)
    finally:
        memo.release(key)
    return done


def _run_pieces(pieces, memo: ReportMemo, log, poll_s: float, wait: bool = True) -> int:
    """Apply every piece: from the memo, else crafted here if this worker can claim it; pieces that
    another live worker holds are awaited (and taken over if it dies) unless `wait` is False.
    Returns how many pieces are left to other workers (0 when waiting)."""
    import time
    pending = []
    for key, label, compute, apply in pieces:
        done = memo.get(key)
        if done is not None:
            log(f"{label}: done earlier (memo)")
        elif memo.claim(key):
            log(label)
            done = _compute_claimed(memo, key, compute)
        else:
            done = memo.get(key)  # finished by another worker meanwhile, or still in its hands
        if done is None:
            log(f"{label}: another worker is on it")
            pending.append((key, label, compute, apply))
        else:
            apply(done)
    while pending and wait:
        time.sleep(poll_s)
        memo.refresh()
        still = []
        for key, label, compute, apply in pending:
            done = memo.get(key)
            if done is None and not memo.holder_alive(key) and memo.claim(key):
                log(f"{label} (its worker stopped)")
                done = _compute_claimed(memo, key, compute)
            if done is None:
                still.append((key, label, compute, apply))
            else:
                apply(done)
        pending = still
    return len(pending)


def _regeneration_quality(regen_fn, x_in, x_ref, batch_size: int = 500) -> dict:
    psnr, ssim = [], []
    for s in range(0, len(x_in), batch_size):
        out = tf.clip_by_value(tf.cast(regen_fn(tf.constant(x_in[s:s + batch_size])), tf.float32), 0.0, 1.0)
        ref = tf.constant(x_ref[s:s + batch_size])
        psnr.append(tf.image.psnr(out, ref, max_val=1.0).numpy())
        ssim.append(tf.image.ssim(out, ref, max_val=1.0).numpy())
    p, q = np.concatenate(psnr), np.concatenate(ssim)
    return {"psnr_db": float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else float("inf"),
            "ssim": float(np.mean(q))}


def validate_report(report: dict) -> None:
    """Raises ValueError naming the first key that breaks the documented schema."""
    for key, typ in REQUIRED_KEYS.items():
        if key not in report:
            raise ValueError(f"report.json: missing key '{key}'")
        if not isinstance(report[key], typ):
            raise ValueError(f"report.json: '{key}' must be {typ.__name__}, got {type(report[key]).__name__}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report.json: schema {report['schema']!r}, expected {SCHEMA!r}")
    for threat in ("transfer", "whitebox"):
        for attack, row in report[threat].items():
            if attack not in report["attacks"]:
                raise ValueError(f"report.json: {threat}.{attack} is not described in 'attacks'")
            for m, acc in row.items():
                if m not in report["models"] or not 0.0 <= acc <= 1.0:
                    raise ValueError(f"report.json: {threat}.{attack}.{m} = {acc!r} is not a model's accuracy")
        if set(report["summary"].get(threat, {})) != set(report["models"]):
            raise ValueError(f"report.json: summary.{threat} must have one entry per model")
    for flag in report["sanity"]:
        if not {"flag", "model", "message", "numbers"} <= set(flag):
            raise ValueError(f"report.json: sanity entry {flag} lacks flag/model/message/numbers")


# ------------------------------------------------------------------------------------------ outputs
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_markdown(report: dict) -> str:
    models = report["models"]
    lines = [f"# Robustness report: {report['dataset']}, {report['examples']} test images",
             "", f"Created {report['created']}, seed {report['seed']}, versions "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
             f"Known = the attack's family is in the MID training pool {report['pool']}; eager-only attacks "
             "use the example count in their row. Accuracies in %.", "",
             "| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models),
             "| clean | " + " | ".join(_pct(report["clean"][m]) for m in models) + " |"]
    for threat, title in (("transfer", "Transfer (crafted on the target, the paper's protocol)"),
                          ("whitebox", "White-box (crafted on each model itself)")):
        table = report[threat]
        if not table:
            continue
        lines += ["", f"## {title}", "", "| attack | group | images | " + " | ".join(models) + " |",
                  "|---|---|---:|" + "---:|" * len(models)]
        for group in ("known", "unknown"):
            for a in (a for a in table if report["attacks"][a]["group"] == group):
                lines.append(f"| {a} | {group} | {report['attacks'][a]['examples']} | "
                             + " | ".join(_pct(table[a].get(m)) for m in models) + " |")
        s = report["summary"][threat]
        lines.append("| **mean known** | | | " + " | ".join(_pct(s[m]["known_mean"]) for m in models) + " |")
        lines.append("| **mean unknown** | | | " + " | ".join(_pct(s[m]["unknown_mean"]) for m in models) + " |")
        lines.append("| **worst case** | | | " + " | ".join(f"{_pct(s[m]['worst'])} ({s[m]['worst_attack']})"
                                                           for m in models) + " |")
    if report["regeneration"]:
        lines += ["", "## Robust regeneration D_t(E_s(x~)) against x", "", "| input | PSNR dB | SSIM |",
                  "|---|---:|---:|"]
        lines += [f"| {a} | {r['psnr_db']:.2f} | {r['ssim']:.4f} |" for a, r in report["regeneration"].items()]
    if report["eps_sweep"]:
        eps = sorted({e for sw in report["eps_sweep"].values() for e in sw}, key=float)
        lines += ["", "## White-box PGD accuracy by eps", "", "| model | " + " | ".join(eps) + " |",
                  "|---|" + "---:|" * len(eps)]
        lines += [f"| {m} | " + " | ".join(_pct(sw.get(e)) for e in eps) + " |" for m, sw in report["eps_sweep"].items()]
    lines += ["", "## Sanity checks", ""]
    lines += ([f"- **{f['flag']}** ({f['model']}): {f['message']}" for f in report["sanity"]]
              or ["None fired: no sign of gradient masking among the checks."])
    zg = report["zero_gradient_fraction"]
    if zg:
        lines.append("")
        lines.append("Zero margin-loss gradients: " + ", ".join(f"{m} {v:.1%}" for m, v in zg.items()) + ".")
    return "\n".join(lines) + "\n"


def _bar_figure(report: dict, threat: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, models = report[threat], report["models"]
    attacks = ([a for a in table if report["attacks"][a]["group"] == "known"]
               + [a for a in table if report["attacks"][a]["group"] == "unknown"])
    labels = ["clean"] + attacks
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) * max(len(models), 1) / 2 + 2), 4.2))
    xs = np.arange(len(labels))
    for i, m in enumerate(models):
        vals = [report["clean"][m]] + [table[a].get(m, np.nan) for a in attacks]
        ax.bar(xs + (i - (len(models) - 1) / 2) * width, 100 * np.asarray(vals, float), width, label=m)
    n_known = sum(report["attacks"][a]["group"] == "known" for a in attacks)
    if n_known:
        ax.axvspan(0.5, n_known + 0.5, color="0.92", zorder=0, label="known (in the pool)")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{threat}: robust accuracy per attack ({report['examples']} images)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid_png(grid: np.ndarray, path: str) -> None:
    """grid [3, n, H, W, C] (clean | adversarial | regenerated rows) -> PNG."""
    rows = [np.concatenate(list(r), axis=1) for r in grid]
    img = np.clip(np.concatenate(rows, axis=0), 0, 1)
    tf.io.write_file(path, tf.io.encode_png(tf.cast(tf.round(img * 255), tf.uint8)))


def write_report(report: dict, out_dir: str, grids: dict | None = None) -> dict:
    """Writes report.json, report.md and the PNGs atomically; returns {name: path}."""
    from mid_tf.artifacts import write_json_atomic
    validate_report(report)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    write_json_atomic(paths["json"], report)
    tmp = paths["md"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(format_markdown(report))
    os.replace(tmp, paths["md"])
    for threat in ("transfer", "whitebox"):
        if report[threat]:
            paths[f"{threat}_png"] = os.path.join(out_dir, f"robust_accuracy_{threat}.png")
            _bar_figure(report, threat, paths[f"{threat}_png"])
    for attack, grid in (grids or {}).items():
        paths[f"grid_{attack}"] = os.path.join(out_dir, f"grid_{attack}.png")
        _grid_png(grid, paths[f"grid_{attack}"])
    return paths


def log_tensorboard(report: dict, log_dir: str, grids: dict | None = None) -> None:
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=0):
        for m, v in report["clean"].items():
            tf.summary.scalar(f"clean/{m}", v)
        for threat in ("transfer", "whitebox"):
            for a, row in report[threat].items():
                for m, v in row.items():
                    tf.summary.scalar(f"{threat}/{a}/{m}", v)
        for a, r in report["regeneration"].items():
            tf.summary.scalar(f"regeneration_psnr_db/{a}", r["psnr_db"])
            tf.summary.scalar(f"regeneration_ssim/{a}", r["ssim"])
        for a, grid in (grids or {}).items():
            rows = [np.concatenate(list(r), axis=1) for r in grid]
            tf.summary.image(f"clean|{a}|regenerated", np.concatenate(rows, axis=0)[None])
        tf.summary.text("report", format_markdown(report))
    writer.flush()


def format_console(report: dict) -> str:
    """A compact text table for the end of train.py."""
    models = report["models"]
    head = f"  {'':<24}" + "".join(f"{m:>10}" for m in models)
    lines = [f"evaluation on {report['examples']} test images", head,
             f"  {'clean':<24}" + "".join(f"{100 * report['clean'][m]:>9.2f}%" for m in models)]
    for threat, label in (("transfer", "transfer"), ("whitebox", "white-box")):
        for a, row in report[threat].items():
            lines.append(f"  {label + ' ' + a:<24}" + "".join(
                f"{100 * row[m]:>9.2f}%" if m in row else f"{'-':>10}" for m in models))
    if "clean" in report["regeneration"]:
        lines.append(f"  regeneration PSNR D_t(E_s(x)): {report['regeneration']['clean']['psnr_db']:.2f} dB")
    for f in report["sanity"]:
        lines.append(f"  WARNING {f['flag']} ({f['model']}): {f['message']}")
    return "\n".join(lines)


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    validate_report(report)
    return report
