"""One recipe over several seeds: report.json files of runs that differ only in `--seed`, as mean ± std.

    reports = [load_report(p) for p in paths]        # evaluation/writers.py
    table = aggregate(reports)                       # ValueError if the runs are not one recipe
    print(format_markdown(table))

Rows: clean accuracy, then every attack of every threat model (transfer, transfer_unseen, whitebox) per
model, then the regeneration PSNR / SSIM. `std` is the sample standard deviation (n - 1), None for one seed.
Runs of one recipe must agree on every configuration key but those in `VARYING` (where a run was stored,
how it logged, how many processes shared its evaluation), on the dataset and on the number of test images:
a table that mixed recipes or image counts would not be a spread over seeds.
"""

from __future__ import annotations

import math

from mid_tf.config import flatten
from mid_tf.evaluation.writers import threats_of

# Configuration keys that may differ between the seeds of one recipe (dotted: nested keys). `stages` lists what
# one command ran (a model_dir continued by a later command, e.g. `--stages=regen,eval`, lists only those); every
# stage's own settings are still compared, and so are the models and rows of the reports.
VARYING = frozenset({"seed", "model_dir", "data.data_dir", "verbose", "eval_workers", "eval_helper",
                     "checkpoint_every", "stages"})
DEFAULT_REGENERATOR = "D_t(E_s(.))"  # what reports from before stage regen regenerated with


def check_same_recipe(reports: list[dict], names: list[str]) -> None:
    """Raises ValueError naming the first key on which a report differs from the first one."""
    if len(reports) < 1:
        raise ValueError("no report given")
    first = flatten(reports[0]["config"])
    seeds = [r["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the reports repeat a seed ({seeds}): each seed counts once")
    for report, name in zip(reports[1:], names[1:]):
        for key in ("dataset", "examples"):
            if report[key] != reports[0][key]:
                raise ValueError(f"{name}: {key} {report[key]!r} against {reports[0][key]!r} in {names[0]}")
        other = flatten(report["config"])
        for key in sorted(set(first) | set(other)):
            if key not in VARYING and first.get(key) != other.get(key):
                raise ValueError(f"{name}: config {key} = {other.get(key)!r} against {first.get(key)!r} in "
                                 f"{names[0]}: not the same recipe")


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"values": values, "mean": mean, "std": std}


def aggregate(reports: list[dict], names: list[str] | None = None) -> dict:
    """{seeds, dataset, examples, rows: [{threat, attack, model, values, mean, std}], regeneration: [...]}."""
    names = names or [f"report {i}" for i in range(len(reports))]
    check_same_recipe(reports, names)
    first = reports[0]
    rows = [{"threat": "clean", "attack": "-", "model": m, **_stats([r["clean"][m] for r in reports])}
            for m in first["models"]]
    for threat in threats_of(first):
        for attack, by_model in first[threat].items():
            for model in by_model:
                values = [r.get(threat, {}).get(attack, {}).get(model) for r in reports]
                if any(v is None for v in values):
                    raise ValueError(f"{names[values.index(None)]}: no {threat} {attack} row for {model}")
                rows.append({"threat": threat, "attack": attack, "model": model, **_stats(values)})
    regen = []
    regenerators = {r.get("regenerator", DEFAULT_REGENERATOR) for r in reports}
    for inputs in first["regeneration"] if len(regenerators) == 1 else ():  # D_t and D_s figures never mix
        for metric in ("psnr_db", "ssim"):
            values = [r["regeneration"].get(inputs, {}).get(metric) for r in reports]
            if all(v is not None for v in values):
                regen.append({"inputs": inputs, "metric": metric, **_stats(values)})
    return {"seeds": [r["seed"] for r in reports], "dataset": first["dataset"], "examples": first["examples"],
            "attacks": first["attacks"], "rows": rows, "regeneration": regen, "regenerators": sorted(regenerators)}


def _fmt(stats: dict, scale: float, digits: int) -> str:
    spread = "n/a" if stats["std"] is None else f"{stats['std'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {spread}"


def format_markdown(table: dict) -> str:
    """The table as Markdown: accuracies in %, mean ± std, then each seed's value."""
    seeds = table["seeds"]
    head = ("| threat model | attack | model | mean ± std (%) | " + " | ".join(f"seed {s}" for s in seeds) + " |\n"
            "|---|---|---|---:|" + "---:|" * len(seeds))
    lines = [f"{table['dataset']}, {table['examples']} test images, seeds {', '.join(map(str, seeds))} "
             f"(std: sample standard deviation over the seeds).", "", head]
    for row in table["rows"]:
        lines.append(f"| {row['threat']} | {row['attack']} | {row['model']} | {_fmt(row, 100, 2)} | "
                     + " | ".join(f"{v * 100:.2f}" for v in row["values"]) + " |")
    regenerators = table.get("regenerators", [DEFAULT_REGENERATOR])
    if len(regenerators) > 1:
        lines += ["", f"Regeneration: left out, the seeds regenerated with different decoders ({'; '.join(regenerators)})."]
    if table["regeneration"]:
        lines += ["", f"Regeneration {regenerators[0]} against x:", "",
                  "| inputs | metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|---:|" + "---:|" * len(seeds)]
        for row in table["regeneration"]:
            digits = 2 if row["metric"] == "psnr_db" else 4
            lines.append(f"| {row['inputs']} | {row['metric']} | {_fmt(row, 1, digits)} | "
                         + " | ".join(f"{v:.{digits}f}" for v in row["values"]) + " |")
    return "\n".join(lines) + "\n"
