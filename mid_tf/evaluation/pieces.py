"""The pieces of a robustness report: what each one crafts and where its numbers go.

A report is a list of independent pieces (evaluation/scheduler.py runs them, evaluation/memo.py keeps
the finished ones):
  transfer   one attack crafted once on the target, its adversarials classified by every model, plus
             the regeneration quality D_t(E_s(x~)) against x and, for `grid_attacks`, an image grid
  unseen     one attack crafted once on the unseen source (a network MID never saw), its adversarials
             classified by every model and by the source itself (how strong the attack is where crafted)
  whitebox   one attack crafted end to end on one model, classified by that model, one piece per shard of
             `shard_examples` test images (workers share a long attack; a stopped run keeps finished shards), on the images the model
             gets right (the others count as broken, AutoAttack's rule: robust accuracy <= clean accuracy, and
             a robust model's misclassified images are not attacked for nothing); on the target it is the
             transfer piece's number (same adversarials, same source), so it is not crafted twice
  checks     one model's zero-gradient fraction and white-box eps sweep (the sanity checks' numbers)
Eager-only attacks (CW, SPSA, ART's AutoAttack, DeepFool, Square, spatial, JSMA) run on the first
`slow_examples` images; `attacks[name]["examples"]` records each attack's count.

A piece's memo key holds everything its numbers depend on: the attack spec, the example count, the
seed and the fingerprints of the models and images involved (an unseen piece: the source's name and
weights too, so another source is never matched to stale numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable

import numpy as np
import tensorflow as tf

from mid_tf.attacks import art_suite, get_spec
from mid_tf.evaluation.inputs import ReportInput
from mid_tf.evaluation.memo import ReportMemo, fingerprint
from mid_tf.evaluation.robustness import accuracy, craft
from mid_tf.evaluation.sanity import attack_group, base_name, zero_gradient_fraction
from mid_tf.evaluation.scheduler import Piece

CHECK_EXAMPLES = 1000  # images of the zero-gradient check and the eps sweep
# White-box pieces attack only the images the model gets right (the rest count as broken), in the memo key so
# that numbers from before the rule are not reused.
WHITEBOX_RULE = "attack-correct-only"


@dataclasses.dataclass
class Workbench:
    """What every piece reads (the input, its images as float32, its models as logits functions, the
    fingerprints that key the memo) and what the pieces fill (the report dict, the image grids)."""
    spec: ReportInput
    x: np.ndarray
    y: np.ndarray
    fns: dict
    fps: dict
    regen_fn: Callable | None
    regen_fp: str
    progress: bool
    source_fn: Callable | None = None   # the unseen source's logits function (None: no unseen source)
    source_fp: str | None = None
    report: dict = dataclasses.field(default_factory=dict)
    grids: dict = dataclasses.field(default_factory=dict)
    shared_with_transfer: list = dataclasses.field(default_factory=list)  # white-box on the target = transfer


def as_fn(model):
    """A Keras model as a compiled logits function in inference mode (one trace per batch shape: the
    eager-only attacks call it hundreds of times per batch, and a Keras call run eagerly took twice as long,
    docs/attacks.md); anything else as it is."""
    import keras
    if isinstance(model, keras.Model):
        return tf.function(lambda z, _m=model: _m(z, training=False), reduce_retracing=True)
    return model


def open_workbench(spec: ReportInput, progress: bool) -> Workbench:
    x = spec.x.astype(np.float32) / 255.0 if spec.x.dtype == np.uint8 else spec.x.astype(np.float32)
    y = np.asarray(spec.y).astype(np.int64)
    fns = {m: as_fn(f) for m, f in spec.models.items()}
    if spec.target not in fns:
        raise ValueError(f"models must include the transfer source '{spec.target}'")
    fps = {m: fingerprint(f) for m, f in spec.models.items()}
    fps["data"] = hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()  # same images, same labels
    regen, source = spec.regenerator, spec.unseen_source
    if source is not None and source.name in fns:
        raise ValueError(f"the unseen source '{source.name}' must not be one of the evaluated models {list(fns)}")
    return Workbench(spec, x, y, fns, fps, regen_fn=as_fn(regen) if regen is not None else None,
                     regen_fp=fingerprint(regen) if regen is not None else "none", progress=progress,
                     source_fn=as_fn(source.model) if source is not None else None,
                     source_fp=fingerprint(source.model) if source is not None else None)


def plan(bench: Workbench) -> list[Piece]:
    """Every piece of the report, in order: transfer attacks, the same crafted on the unseen source (if
    any), white-box attacks per model, checks per model; each leaves a None placeholder in the report where
    its numbers will go."""
    pieces = [transfer_piece(bench, attack) for attack in bench.spec.attacks]
    if bench.spec.unseen_source is not None:
        pieces += [unseen_piece(bench, attack) for attack in bench.spec.attacks]
    for attack in bench.spec.whitebox:
        pieces += [p for m in bench.fns for p in whitebox_pieces(bench, attack, m)]
    return pieces + [checks_piece(bench, m) for m in bench.fns]


def _describe(bench: Workbench, attack: str) -> tuple[str, int]:
    """Records the attack in report["attacks"]; returns its base name and example count."""
    spec, key, s = get_spec(attack), base_name(attack), bench.spec
    n = len(bench.x) if spec.graph_safe else min(len(bench.x), s.slow_examples)
    bench.report["attacks"].setdefault(key, {"group": attack_group(attack, s.pool), "method": spec.method,
                                             "norm": "inf" if spec.norm == np.inf else float(spec.norm),
                                             "eps": spec.eps, "targeted": spec.targeted, "examples": n,
                                             "spec": attack})
    if art_suite.components(spec):
        bench.report["attacks"][key]["components"] = art_suite.components(spec)
    return key, n


# ------------------------------------------------------------------------------------------ transfer
def transfer_piece(bench: Workbench, attack: str) -> Piece:
    key, n = _describe(bench, attack)
    s = bench.spec
    bench.report["transfer"][key] = None
    return Piece(ReportMemo.key("transfer", attack, n, s.seed, s.target, bench.fps, bench.regen_fp,
                                key in s.grid_attacks),
                 f"transfer {key} on {n} images (crafted on {s.target})",
                 functools.partial(_craft_transfer, bench, attack, key, n),
                 functools.partial(_apply_transfer, bench, key))


def _craft_transfer(bench: Workbench, attack: str, key: str, n: int) -> dict:
    s, x, y = bench.spec, bench.x, bench.y
    adv = craft(attack, bench.fns[s.target], x[:n], y[:n], batch_size=s.batch_size, seed=s.seed,
                progress=bench.progress)
    value = {"accuracy": {m: accuracy(f, adv, y[:n]) for m, f in bench.fns.items()}, "regeneration": None,
             "grid": None}
    if bench.regen_fn is not None:
        value["regeneration"] = regeneration_quality(bench.regen_fn, adv, x[:n])
        if key in s.grid_attacks:
            k = min(s.grid_images, n)
            regenerated = np.clip(np.asarray(bench.regen_fn(tf.constant(adv[:k]))), 0, 1)
            value["grid"] = np.stack([x[:k], adv[:k], regenerated]).tolist()
    return value


def _apply_transfer(bench: Workbench, key: str, done: dict) -> None:
    bench.report["transfer"][key] = done["accuracy"]
    if done.get("regeneration"):
        bench.report["regeneration"][key] = done["regeneration"]
    if done.get("grid") is not None:
        bench.grids[key] = np.asarray(done["grid"], np.float32)


# ------------------------------------------------------------------------------------------ unseen source
def unseen_piece(bench: Workbench, attack: str) -> Piece:
    """`attack` crafted on the unseen source; its numbers go to report["transfer_unseen"][attack]."""
    key, n = _describe(bench, attack)
    s, name = bench.spec, bench.spec.unseen_source.name
    bench.report["transfer_unseen"][key] = None
    return Piece(ReportMemo.key("transfer_unseen", attack, n, s.seed, name, bench.source_fp, bench.fps),
                 f"transfer {key} on {n} images (crafted on {name}, a source MID never saw)",
                 functools.partial(_craft_unseen, bench, attack, n),
                 functools.partial(_apply_unseen, bench, key))


def _craft_unseen(bench: Workbench, attack: str, n: int) -> dict:
    x, y = bench.x[:n], bench.y[:n]
    adv = craft(attack, bench.source_fn, x, y, batch_size=bench.spec.batch_size, seed=bench.spec.seed,
                progress=bench.progress)
    return {"accuracy": {m: accuracy(f, adv, y) for m, f in bench.fns.items()},
            "source": accuracy(bench.source_fn, adv, y)}


def _apply_unseen(bench: Workbench, key: str, done: dict) -> None:
    bench.report["transfer_unseen"][key] = done["accuracy"]
    bench.report["unseen_source"]["accuracy"][key] = done["source"]


# ------------------------------------------------------------------------------------------ white-box
def whitebox_pieces(bench: Workbench, attack: str, m: str) -> list[Piece]:
    """The pieces of `attack` crafted on model `m`, one per shard of `shard_examples` images (several
    workers share a long attack, and a stopped evaluation keeps its finished shards); none for a transfer
    attack on the target itself. A single shard keeps the unsharded memo key."""
    key, n = _describe(bench, attack)
    s = bench.spec
    bench.report["whitebox"].setdefault(key, {})[m] = None
    if m == s.target and attack in s.attacks:
        bench.shared_with_transfer.append(key)  # same adversarials, same source
        return []
    shards = [(a, min(a + s.shard_examples, n)) for a in range(0, n, s.shard_examples)]
    base = ("whitebox", attack, n, s.seed, m, bench.fps[m], bench.fps["data"], WHITEBOX_RULE)
    parts: dict = {}
    return [Piece(ReportMemo.key(*base) if len(shards) == 1 else ReportMemo.key(*base, "images", a, b),
                  f"white-box {key} on {m}, {n} images" if len(shards) == 1 else
                  f"white-box {key} on {m}, images {a}-{b} of {n}",
                  functools.partial(_craft_whitebox, bench, attack, m, a, b),
                  functools.partial(_apply_whitebox, bench, key, m, (a, b), parts, len(shards)))
            for a, b in shards]


def _craft_whitebox(bench: Workbench, attack: str, m: str, a: int, b: int) -> float:
    """Robust accuracy of model `m` on images a..b under `attack` crafted on it. Only the images `m`
    classifies correctly are attacked (WHITEBOX_RULE): the others count as broken already, as in AutoAttack.
    Batch i of the shard starting at image a is seeded (seed, a + i): shards never repeat a random start."""
    f, x, y = bench.fns[m], bench.x[a:b], bench.y[a:b]
    right = correct_mask(f, x, y)
    if not right.any():
        return 0.0
    adv = craft(attack, f, x[right], y[right], batch_size=bench.spec.batch_size, seed=bench.spec.seed,
                progress=bench.progress, first_batch=a)
    return accuracy(f, adv, y[right]) * float(right.sum()) / (b - a)


def correct_mask(classify_fn, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """bool[n]: which images `classify_fn` gets right."""
    pred = [np.argmax(np.asarray(classify_fn(tf.constant(x[s:s + batch_size]))), -1)
            for s in range(0, len(x), batch_size)]
    return np.concatenate(pred) == y if pred else np.zeros(0, bool)


def _apply_whitebox(bench: Workbench, key: str, m: str, shard: tuple, parts: dict, count: int, done: float) -> None:
    """Keeps a shard's accuracy; the last one fills the row with the image-weighted mean of all."""
    parts[shard] = done
    if len(parts) == count:
        n = max(b for _, b in parts)
        bench.report["whitebox"][key][m] = done if count == 1 else sum(acc * (b - a) for (a, b), acc in parts.items()) / n


# ------------------------------------------------------------------------------------------ checks
def checks_piece(bench: Workbench, m: str) -> Piece:
    s, n = bench.spec, min(len(bench.x), CHECK_EXAMPLES)
    bench.report["zero_gradient_fraction"][m] = None
    if s.eps_sweep:
        bench.report["eps_sweep"][m] = None
    return Piece(ReportMemo.key("checks", m, bench.fps[m], bench.fps["data"], s.seed, n, list(s.eps_sweep or ()),
                                s.sweep_attack),
                 f"gradient and eps checks on {m}, {n} images",
                 functools.partial(_run_checks, bench, m, n), functools.partial(_apply_checks, bench, m))


def _run_checks(bench: Workbench, m: str, n: int) -> dict:
    s, f, x, y = bench.spec, bench.fns[m], bench.x[:n], bench.y[:n]
    value = {"zero_gradient_fraction": zero_gradient_fraction(f, x, y), "eps_sweep": None}
    if s.eps_sweep:
        value["eps_sweep"] = {}
        for eps in s.eps_sweep:
            spec = get_spec(s.sweep_attack).replace(eps=float(eps), eps_iter=min(float(eps), max(float(eps) / 10, 0.01)))
            adv = craft(spec, f, x, y, batch_size=s.batch_size, seed=s.seed, progress=False)
            value["eps_sweep"][f"{float(eps):g}"] = accuracy(f, adv, y)
    return value


def _apply_checks(bench: Workbench, m: str, done: dict) -> None:
    bench.report["zero_gradient_fraction"][m] = done["zero_gradient_fraction"]
    if bench.spec.eps_sweep:
        bench.report["eps_sweep"][m] = done["eps_sweep"]


def regeneration_quality(regen_fn, x_in, x_ref, batch_size: int = 500) -> dict:
    """PSNR (dB) and SSIM of the regenerated `x_in` against `x_ref` (tf.image, max_val 1)."""
    psnr, ssim = [], []
    for s in range(0, len(x_in), batch_size):
        out = tf.clip_by_value(tf.cast(regen_fn(tf.constant(x_in[s:s + batch_size])), tf.float32), 0.0, 1.0)
        ref = tf.constant(x_ref[s:s + batch_size])
        psnr.append(tf.image.psnr(out, ref, max_val=1.0).numpy())
        ssim.append(tf.image.ssim(out, ref, max_val=1.0).numpy())
    p, q = np.concatenate(psnr), np.concatenate(ssim)
    return {"psnr_db": float(np.mean(p[np.isfinite(p)])) if np.isfinite(p).any() else float("inf"),
            "ssim": float(np.mean(q))}
