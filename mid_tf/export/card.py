"""The model card every export carries: `<version>/assets.extra/model_card.json` and `model_card.md`.

A team adopting an export needs, next to the weights, what they were trained on and how, from which
code, what a request must look like, and how robust the model measured, against which attacks. The
card holds: the run's config (summary.json), the commit of the mid_tf source that exported it, the
dataset and its class names, the input contract with its limits (added by `export_model`), the threat
model (norm and eps of every evaluated attack, the training pool) and the eval report's headline rows
(clean, transfer and white-box accuracy per model). `mid-client --info` prints the markdown.

An export of a run whose eval stage did not run is refused unless asked for (`allow_unevaluated`);
its card then says "not evaluated" instead of numbers. TensorFlow-free: `mid-export` builds the card
(and refuses) before TensorFlow loads.
"""

from __future__ import annotations

import json
import os
import subprocess

from mid_tf import artifacts
from mid_tf.data import DATASET_SHAPES, class_names_for
from mid_tf.export.errors import ExportError

SCHEMA = "mid_tf.model_card/1"
CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
NOT_EVALUATED = "not evaluated"
DEPLOYED_MODEL = "mid"  # the report's name for C_s(E_s(x)), the network the export serves


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); {what}") from None


def read_identity(model_dir: str) -> dict:
    """run.json, checked (artifacts.read_run_identity), as an ExportError."""
    try:
        return artifacts.read_run_identity(model_dir)
    except artifacts.ArtifactError as e:
        raise ExportError(str(e)) from None


def source_commit() -> dict:
    """{"commit": the git commit of this mid_tf source, or "unknown"; "modified": uncommitted edits in it}.

    Asked only where the package's own files are tracked by git (a checkout), so an installed copy
    inside some other repository's tree does not report that repository's commit."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        proc = subprocess.run(["git", "-C", package, *args], capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else None

    try:
        if git("ls-files", "--error-unmatch", "__init__.py") is None:
            return {"commit": "unknown", "modified": None}
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "unknown", "modified": None}
    return {"commit": commit or "unknown", "modified": None if status is None else bool(status)}


def norm_name(norm) -> str:
    """The report's norm (2.0, "inf", None) as it is written in papers: L2, Linf, none."""
    if str(norm) == "inf":
        return "Linf"
    return f"L{norm:g}" if isinstance(norm, (int, float)) else str(norm or "none")


def eps_text(eps) -> str:
    """None: a minimum-norm or non-norm attack (C&W, DeepFool, JSMA, spatial), bounded by no eps."""
    return "no bound" if eps is None else f"{eps:g}" if isinstance(eps, (int, float)) else str(eps)


def _threat_model(attacks: dict, pool) -> dict:
    by_norm = {}
    for a in attacks.values():
        by_norm.setdefault(norm_name(a.get("norm")), set()).add(eps_text(a.get("eps")))
    return {"attacks": attacks, "eps_by_norm": {n: sorted(e) for n, e in sorted(by_norm.items())},
            "training_pool": list(pool or []),
            "groups": "known = the attack's family is in the training pool, unknown = it is not"}


def _from_report(report: dict, source: str) -> tuple[dict, dict]:
    keys = ("norm", "eps", "targeted", "group", "method", "examples")
    attacks = {name: {k: a.get(k) for k in keys} for name, a in sorted(report["attacks"].items())}
    evaluation = {"status": "evaluated", "source": source, "created": report.get("created"),
                  "examples": report.get("examples"), "models": list(report["models"]),
                  "clean": report["clean"], "transfer": report["transfer"], "whitebox": report["whitebox"],
                  "summary": report.get("summary", {}),
                  "sanity_flags": [{k: f.get(k) for k in ("flag", "model", "message")}
                                   for f in report.get("sanity", [])]}
    return evaluation, _threat_model(attacks, report.get("pool"))


def _from_summary(stage: dict, config: dict) -> tuple[dict, dict]:
    """summary.json's stages.eval: the same accuracies, but no attack details (they are in report.json)."""
    evaluation = {"status": "evaluated", "source": "summary.json stages.eval (eval/report.json is missing)",
                  "examples": stage.get("examples"), "models": str(stage.get("models", "")).split(","),
                  "clean": stage["clean"], "transfer": stage["transfer"], "whitebox": stage["whitebox"],
                  "summary": stage.get("summary", {}), "sanity_flags": stage.get("sanity_flags")}
    names = sorted(set(stage["transfer"]) | set(stage["whitebox"]))
    attacks = {n: {"norm": None, "eps": None, "note": "details are in eval/report.json"} for n in names}
    threat = _threat_model({}, (config.get("mid") or {}).get("pool"))
    return evaluation, dict(threat, attacks=attacks, eps_by_norm="unknown: eval/report.json is missing")


def find_evaluation(model_dir: str, summary: dict, dataset: str) -> tuple[dict, dict] | None:
    """(evaluation, threat model) from eval/report.json, else from summary.json; None if eval never ran."""
    path = os.path.join(model_dir, "eval", "report.json")
    if os.path.isfile(path):
        report = _read_json(path, "rerun the eval stage to rewrite it")
        shapes = {"attacks": dict, "models": list, "clean": dict, "transfer": dict, "whitebox": dict}
        bad = [k for k, t in shapes.items() if not isinstance(report, dict) or not isinstance(report.get(k), t)]
        if bad:
            raise ExportError(f"{path} lacks {bad} (or has them in another form): it is not an eval report of "
                              "mid_tf; rerun the eval stage")
        if report.get("dataset", dataset) != dataset:
            raise ExportError(f"{path} evaluates dataset '{report['dataset']}', but the run trained on "
                              f"'{dataset}': it belongs to another run; rerun the eval stage")
        if "mid" not in report["models"]:
            raise ExportError(f"{path} scores {report['models']} but not the MID pipeline (the eval stage ran "
                              "before stage mid was done): rerun the eval stage (--stages=eval)")
        return _from_report(report, "eval/report.json")
    stages, config = summary.get("stages"), summary.get("config")
    stage = stages.get("eval") if isinstance(stages, dict) else None
    if isinstance(stage, dict) and all(isinstance(stage.get(k), dict) for k in ("clean", "transfer", "whitebox")):
        return _from_summary(stage, config if isinstance(config, dict) else {})
    return None


def build_card(model_dir: str, *, allow_unevaluated: bool = False) -> dict:
    """The card of a trained model_dir (without "input": `export_model` adds it from the served graph).

    Raises ExportError naming the fix when the eval stage did not run and `allow_unevaluated` is False."""
    identity = read_identity(model_dir)
    summary_path = os.path.join(model_dir, "summary.json")
    summary = _read_json(summary_path, "rerun train.py to rewrite it") if os.path.isfile(summary_path) else {}
    if not isinstance(summary, dict):
        raise ExportError(f"{summary_path} is not a run summary (a JSON object); rerun train.py to rewrite it")
    found = find_evaluation(model_dir, summary, identity["dataset"])
    if found is None and not allow_unevaluated:
        raise ExportError(
            f"{model_dir} has not been evaluated (no eval/report.json, no 'eval' in summary.json): run the eval "
            f"stage first (`python train.py --model_dir={model_dir} --stages=eval` with the flags the run was "
            "trained with; trained stages are loaded, not retrained), or pass --allow_unevaluated to export it "
            f"with a model card that says \"{NOT_EVALUATED}\".")
    card = unevaluated_card(identity["dataset"])
    card["class_names"] = identity.get("class_names") or card["class_names"]  # an image folder's, from run.json
    card["source"].update(model_dir=os.path.abspath(model_dir), run=identity)
    card["config"] = summary.get("config") or "unknown: no summary.json in the model_dir"
    if found is not None:
        card["evaluation"], card["threat_model"] = found
    return card


def unevaluated_card(dataset: str | None) -> dict:
    """A card with no evaluation: for `allow_unevaluated` exports, and models exported without a model_dir."""
    return {"schema": SCHEMA, "model": "MID classifier C_s(E_s(x)): the meta-trained student encoder and its "
            "classifier head (regenerator D_s(E_s(x)) in the 'regenerate' signature: D_s = D_t unless stage regen "
            "fitted it)",
            "deployed_model": DEPLOYED_MODEL, "dataset": dataset,
            "class_names": _class_names(dataset), "source": {"model_dir": None, **source_commit()},
            "config": "unknown", "evaluation": {"status": NOT_EVALUATED}, "threat_model": {"status": NOT_EVALUATED}}


def _class_names(dataset: str | None) -> list | None:
    """A named dataset's class names in label order (an image folder's come from run.json)."""
    names = class_names_for(dataset) if dataset in DATASET_SHAPES else None
    return list(names) if names else None


def is_evaluated(card: dict) -> bool:
    return (card.get("evaluation") or {}).get("status") == "evaluated"


def _pct(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "-"


def _accuracy_table(card: dict) -> list[str]:
    ev, attacks = card["evaluation"], (card.get("threat_model") or {}).get("attacks") or {}
    models = [m for m in ev["models"] if m]
    lines = ["| accuracy (%) | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models),
             "| clean | " + " | ".join(_pct(ev["clean"].get(m)) for m in models) + " |"]
    for threat, label in (("transfer", "transfer"), ("whitebox", "white-box")):
        for name, row in sorted(ev[threat].items()):
            a = attacks.get(name) or {}
            eps = a.get("eps")
            bound = "" if a.get("norm") is None else norm_name(a["norm"]) + (
                ", no eps bound" if eps is None else f" eps={eps_text(eps)}")
            group = f", {a['group']}" if a.get("group") else ""
            lines.append(f"| {label} {name} ({bound}{group}) | " + " | ".join(_pct(row.get(m)) for m in models) + " |")
    return lines


def _input_lines(card: dict) -> list[str]:
    spec = card.get("input")
    if not spec:
        return []
    img, enc, lim = spec["image"], spec["image_bytes"], spec["limits"]
    return ["", "## Input", "",
            f"- `image` {img['dtype']} {img['shape']}, values in {img['value_range']} "
            f"({', '.join(img['signatures'])})",
            f"- `image_bytes` {'/'.join(enc['formats'])} files of exactly {enc['height']}x{enc['width']} pixels, "
            f"decoded to {enc['channels']} channel(s) ({', '.join(enc['signatures'])})",
            f"- limits per request: at most {lim['max_batch']} images, each encoded image at most "
            f"{lim['max_image_bytes']} bytes; larger requests get INVALID_ARGUMENT"]


def format_card(card: dict) -> str:
    """The card as markdown (model_card.md, and what `mid-client --info` prints)."""
    src = card["source"]
    modified = {True: " (with uncommitted changes)", False: "", None: ""}[src.get("modified")]
    dataset = card.get("dataset") or "unknown"
    config = card["config"] if isinstance(card.get("config"), str) else \
        "the run's full configuration is under \"config\" in model_card.json"
    lines = [f"# Model card: MID on {dataset}", "", card["model"], "",
             f"- dataset: {dataset}; classes: {', '.join(card.get('class_names') or ['unknown'])}",
             f"- trained in: {src.get('model_dir') or 'unknown'}; "
             f"exported from mid_tf commit {src['commit']}{modified}",
             f"- config: {config}"]
    lines += _input_lines(card)
    lines += ["", "## Evaluation", ""]
    if not is_evaluated(card):
        return "\n".join(lines + [f"**{NOT_EVALUATED}**: exported with --allow_unevaluated; no accuracy or "
                                  "robustness has been measured for this model.", ""])
    ev, threat = card["evaluation"], card["threat_model"]
    lines += [f"From {ev['source']}" + (f", created {ev['created']}" if ev.get("created") else "")
              + f", {ev.get('examples')} test images. The deployed model is `{card['deployed_model']}`; the "
              "others are references from the same run.", ""] + _accuracy_table(card)
    eps = threat["eps_by_norm"]
    lines += ["", "## Threat model", "",
              "- attack budgets: " + (eps if isinstance(eps, str) else
                                      "; ".join(f"{n} eps {', '.join(e)}" for n, e in eps.items())),
              f"- training pool (attacks seen in MID training): {', '.join(threat['training_pool']) or 'unknown'}",
              "- transfer attacks are crafted on the undefended target; white-box attacks on each model itself"]
    flags = ev.get("sanity_flags")
    if isinstance(flags, list) and flags:
        lines += ["", "## Sanity flags", ""] + [f"- {f['flag']} ({f['model']}): {f['message']}" for f in flags]
    return "\n".join(lines + [""])


def write_card(directory: str, card: dict) -> None:
    """model_card.json and model_card.md into `directory` (the version's assets.extra)."""
    with open(os.path.join(directory, CARD_JSON), "w") as f:
        json.dump(card, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    with open(os.path.join(directory, CARD_MD), "w") as f:
        f.write(format_card(card))
