"""The report's schema and its outputs: report.json, report.md, PNG figures, TensorBoard, console table.

    paths = write_report(report, out_dir, grids)   # report.json, report.md, PNG figures
    log_tensorboard(report, log_dir, grids)
    report = load_report(path)                     # read back, validated

report.json schema (`SCHEMA`, checked by `validate_report`):
  schema, created, dataset, examples, seed, versions{tensorflow,keras,cleverhans,art,python}, config,
  models[list], pool[list], attacks{name: {group, method, norm, eps, targeted, examples, spec[, components]}}
  (components: an AutoAttack's chain, art_suite.components),
  clean{model: acc}, transfer{attack: {model: acc}}, whitebox{attack: {model: acc}},
  summary{threat: {model: {known_mean, unknown_mean, worst, worst_attack}}},
  regeneration{"clean"|attack: {psnr_db, ssim}} with regenerator (str, what regenerated: D_t(E_s(x)), or D_s
  (E_s(x)) after stage regen; reports written before it existed mean D_t(E_s(x))), eps_sweep{model: {eps: acc}},
  zero_gradient_fraction{model: frac}, sanity[list of {flag, model, message, numbers}]
Only when the transfer attacks were also crafted on a source MID never saw (stage surrogate):
  transfer_unseen{attack: {model: acc}}, unseen_source{name, label, clean, accuracy{attack: acc}} (the
  source's own accuracy, clean and on its adversarials), and summary.transfer_unseen.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

SCHEMA = "mid_tf.eval_report/1"
REQUIRED_KEYS = {"schema": str, "created": str, "dataset": str, "examples": int, "seed": int, "versions": dict,
                 "config": dict, "models": list, "pool": list, "attacks": dict, "clean": dict, "transfer": dict,
                 "whitebox": dict, "summary": dict, "regeneration": dict, "eps_sweep": dict,
                 "zero_gradient_fraction": dict, "sanity": list}
# The threat models' tables, in the order the outputs show them; transfer_unseen only where it was evaluated.
THREATS = ("transfer", "transfer_unseen", "whitebox")
UNSEEN_KEYS = {"name": str, "label": str, "clean": float, "accuracy": dict}


def threats_of(report: dict) -> list[str]:
    """The threat-model tables `report` has, in THREATS order."""
    return [t for t in THREATS if t in report]


def validate_report(report: dict) -> None:
    """Raises ValueError naming the first key that breaks the documented schema."""
    for key, typ in REQUIRED_KEYS.items():
        if key not in report:
            raise ValueError(f"report.json: missing key '{key}'")
        if not isinstance(report[key], typ):
            raise ValueError(f"report.json: '{key}' must be {typ.__name__}, got {type(report[key]).__name__}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report.json: schema {report['schema']!r}, expected {SCHEMA!r}")
    if "transfer_unseen" in report:
        _validate_unseen(report)
    for threat in threats_of(report):
        if not isinstance(report[threat], dict):
            raise ValueError(f"report.json: '{threat}' must be dict, got {type(report[threat]).__name__}")
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


def _validate_unseen(report: dict) -> None:
    source = report.get("unseen_source")
    if not isinstance(source, dict):
        raise ValueError("report.json: 'transfer_unseen' needs 'unseen_source' (the source it was crafted on)")
    for key, typ in UNSEEN_KEYS.items():
        if not isinstance(source.get(key), typ):
            raise ValueError(f"report.json: unseen_source.{key} must be {typ.__name__}, got {source.get(key)!r}")
    if set(source["accuracy"]) != set(report["transfer_unseen"]):
        raise ValueError("report.json: unseen_source.accuracy must have one entry per transfer_unseen attack")


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    validate_report(report)
    return report


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _title(report: dict, threat: str) -> str:
    if threat == "transfer_unseen":
        return f"Transfer (unseen source: {report['unseen_source']['label']})"
    return {"transfer": "Transfer (crafted on the target, the paper's protocol)",
            "whitebox": "White-box (crafted on each model itself)"}[threat]


def _threat_lines(report: dict, threat: str) -> list[str]:
    """One threat model's section of report.md: a row per attack (known first), the summary rows. The unseen
    source's table has a last column with the source's own accuracy on its adversarials."""
    table, models = report[threat], report["models"]
    if not table:
        return []
    source = report["unseen_source"] if threat == "transfer_unseen" else None
    head = models + ([f"{source['name']} (source)"] if source else [])
    lines = ["", f"## {_title(report, threat)}", ""]
    if source:
        lines += [f"Crafted once on {source['name']}, a network that took no part in MID's training (another "
                  f"architecture, another seed); its own accuracy: {_pct(source['clean'])} clean, on each attack in "
                  "the last column.", ""]
    lines += ["| attack | group | images | " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(head)]
    for group in ("known", "unknown"):
        for a in (a for a in table if report["attacks"][a]["group"] == group):
            extra = [_pct(source["accuracy"].get(a))] if source else []
            lines.append(f"| {a} | {group} | {report['attacks'][a]['examples']} | "
                         + " | ".join([_pct(table[a].get(m)) for m in models] + extra) + " |")
    s, pad = report["summary"][threat], " |" if source else ""
    lines.append("| **mean known** | | | " + " | ".join(_pct(s[m]["known_mean"]) for m in models) + " |" + pad)
    lines.append("| **mean unknown** | | | " + " | ".join(_pct(s[m]["unknown_mean"]) for m in models) + " |" + pad)
    lines.append("| **worst case** | | | " + " | ".join(f"{_pct(s[m]['worst'])} ({s[m]['worst_attack']})"
                                                       for m in models) + " |" + pad)
    return lines


def format_markdown(report: dict) -> str:
    models = report["models"]
    lines = [f"# Robustness report: {report['dataset']}, {report['examples']} test images",
             "", f"Created {report['created']}, seed {report['seed']}, versions "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
             f"Threat model {report.get('threat_model', 'mnist: L-inf eps 0.3, L2 eps 2 (recorded before threat models)')}"
             f". Known = the attack's family is in the MID training pool {report['pool']}; eager-only attacks "
             "use the example count in their row. Accuracies in %.", "",
             "| | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models),
             "| clean | " + " | ".join(_pct(report["clean"][m]) for m in models) + " |"]
    for threat in threats_of(report):
        lines += _threat_lines(report, threat)
    chains = {a: d["components"] for a, d in report["attacks"].items() if d.get("components")}
    if chains:
        lines += [""] + [f"`{a}` = {c}." for a, c in chains.items()]
    if report["regeneration"]:
        lines += ["", f"## Robust regeneration {report.get('regenerator', 'D_t(E_s(.))')} against x", "",
                  "| input | PSNR dB | SSIM |", "|---|---:|---:|"]
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
    ax.set_title(f"{_title(report, threat)}: robust accuracy per attack ({report['examples']} images)", fontsize=9)
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
    for threat in threats_of(report):
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
        for threat in threats_of(report):
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
    labels = {"transfer": "transfer", "transfer_unseen": "unseen", "whitebox": "white-box"}
    for threat in threats_of(report):
        label = labels[threat]
        for a, row in report[threat].items():
            lines.append(f"  {label + ' ' + a:<24}" + "".join(
                f"{100 * row[m]:>9.2f}%" if m in row else f"{'-':>10}" for m in models))
    if report.get("transfer_unseen"):
        lines.append(f"  unseen: crafted on {report['unseen_source']['label']}, a source MID never saw")
    if "clean" in report["regeneration"]:
        lines.append(f"  regeneration PSNR {report.get('regenerator', 'D_t(E_s(.))')}: {report['regeneration']['clean']['psnr_db']:.2f} dB")
    for f in report["sanity"]:
        lines.append(f"  WARNING {f['flag']} ({f['model']}): {f['message']}")
    return "\n".join(lines)
