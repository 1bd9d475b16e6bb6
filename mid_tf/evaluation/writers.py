"""The report's schema and its outputs: report.json, report.md, PNG figures, TensorBoard, console table.

    paths = write_report(report, out_dir, grids)   # report.json, report.md, PNG figures
    log_tensorboard(report, log_dir, grids)
    report = load_report(path)                     # read back, validated

report.json schema (`SCHEMA`, checked by `validate_report`):
  schema, created, dataset, examples, seed, versions{tensorflow,keras,cleverhans,art,python}, config,
  models[list], pool[list], attacks{name: {group, method, norm, eps, targeted, examples, spec}},
  clean{model: acc}, transfer{attack: {model: acc}}, whitebox{attack: {model: acc}},
  summary{threat: {model: {known_mean, unknown_mean, worst, worst_attack}}},
  regeneration{"clean"|attack: {psnr_db, ssim}}, eps_sweep{model: {eps: acc}},
  zero_gradient_fraction{model: frac}, sanity[list of {flag, model, message, numbers}]
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


def load_report(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    validate_report(report)
    return report


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_markdown(report: dict) -> str:
    models = report["models"]
    lines = [f"# Robustness report: {report['dataset']}, {report['examples']} test images",
             "", f"Created {report['created']}, seed {report['seed']}, versions "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
             f"Threat model {report.get('threat_model', 'mnist: L-inf eps 0.3, L2 eps 2 (recorded before threat models)')}"
             ". Known = the attack's family is in the MID training pool {report['pool']}; eager-only attacks "
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
