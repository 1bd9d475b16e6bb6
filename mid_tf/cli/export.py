"""`mid-export` / `python export.py`: exports a trained MID model for TF Serving.

  python export.py --model_dir=runs/mnist --export_base=exports/mid_mnist [--version=N] [--overwrite]

Writes `<export_base>/<version>/` (a SavedModel with the signatures serving_default, regenerate and
classify_encoded, plus warmup requests and export.json in assets.extra) atomically, and
`<export_base>/models.config`. By default the export is first checked in a fresh TensorFlow-only
process against the Keras models; only a matching export is published. See docs/serving.md.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "A trained model_dir (stages target, teacher and mid completed by train.py).")
flags.DEFINE_string("export_base", None, "Model base path TF Serving watches; versions go to <export_base>/<N>/. "
                    "Default: exports/mid_<dataset>.")
flags.DEFINE_integer("version", None, "Version number to write (default: the next free one, 1 for a new base).",
                     lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace an existing --version (TF Serving may briefly unload it).")
flags.DEFINE_bool("verify", True, "Before publishing, load the export in a fresh TensorFlow-only process and "
                  "compare every signature with the Keras models (max abs diff <= --tolerance).")
flags.DEFINE_float("tolerance", 1e-5, "Largest allowed |SavedModel - Keras| difference for --verify.",
                   lower_bound=0.0)
flags.DEFINE_string("model_name", None, "Model name clients use (default: the basename of --export_base).")
flags.DEFINE_enum("version_policy", "latest", ["latest", "all"],
                  "models.config version policy: serve only the newest version, or every version on disk.")
flags.DEFINE_string("serving_base_path", None, "base_path written to models.config: where --export_base is "
                    "mounted in the server (default: /models/<model_name>, as in docs/serving.md).")
flags.DEFINE_list("version_labels", [], "models.config version labels, e.g. stable=1,canary=2 (for clients' "
                  "--version_label).")

flags.mark_flag_as_required("model_dir")


def _labels(items):
    labels = {}
    for item in items:
        name, sep, version = item.partition("=")
        if not sep or not name or not version.strip().isdigit():
            raise ValueError(f"--version_labels takes label=version pairs like stable=1, got '{item}'")
        labels[name.strip()] = int(version)
    return labels


def _preflight():
    """Checks that need no TensorFlow, so a wrong flag fails in a second rather than after TF loads.

    Returns (run identity, export base); mid_tf.artifacts / mid_tf.export check everything again.
    """
    run_json = os.path.join(FLAGS.model_dir, "run.json")
    if not os.path.isfile(run_json):
        raise ValueError(f"{FLAGS.model_dir} is not a mid_tf model_dir (no run.json). Train first with "
                         f"`python train.py --model_dir={FLAGS.model_dir}` or pass the right --model_dir.")
    with open(run_json) as f:
        identity = json.load(f)
    export_base = FLAGS.export_base or os.path.join("exports", f"mid_{identity['dataset']}")
    target = os.path.join(export_base, str(FLAGS.version)) if FLAGS.version else None
    if target and os.path.exists(target) and not FLAGS.overwrite:
        raise ValueError(f"{os.path.abspath(target)} already exists; TF Serving may be serving it. Omit --version "
                         "to export the next free version, or pass --overwrite.")
    return identity, export_base


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # tf.saved_model.save logs every function it renames at INFO
    try:
        labels = _labels(FLAGS.version_labels)
        identity, export_base = _preflight()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mid_tf import artifacts
    from mid_tf.export import ExportError, export_model, read_export_json

    try:
        models = artifacts.load_models(FLAGS.model_dir, stages=("target", "teacher", "mid"))
        path = export_model(
            models, export_base, FLAGS.version, overwrite=FLAGS.overwrite, model_name=FLAGS.model_name,
            metadata={"source_model_dir": os.path.abspath(FLAGS.model_dir), "dataset": identity["dataset"],
                      "width": identity.get("width"), "seed": identity.get("seed")},
            version_policy=FLAGS.version_policy, serving_base_path=FLAGS.serving_base_path,
            version_labels=labels, verify=FLAGS.verify, tolerance=FLAGS.tolerance)
    except (artifacts.ArtifactError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = read_export_json(path)
    print(f"exported {info['model_name']} version {info['version']} to {path}")
    for name, sig in sorted(info["signatures"].items()):
        ins = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["inputs"].items())
        outs = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["outputs"].items())
        print(f"  {name}: {ins} -> {outs}")
    if "verification" in info:
        v = info["verification"]
        print(f"verified in a fresh TensorFlow-only process: max |SavedModel - Keras| = {v['max_abs_diff']:.3g} "
              f"(classify {v['classify']:.3g}, regenerate {v['regenerate']:.3g}, "
              f"classify_encoded {v['classify_encoded']:.3g}; classes match: {v['classes_match']})")
    print(f"models.config: {os.path.join(os.path.dirname(path), 'models.config')}  (serve it: docs/serving.md)")
    return 0


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
