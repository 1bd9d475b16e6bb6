"""`mid-export` / `python export.py`: exports a trained MID model for TF Serving.

  python export.py --model_dir=runs/mnist --export_base=exports/mid_mnist [--version=N] [--overwrite]

Writes `<export_base>/<version>/` (a SavedModel with the signatures serving_default, regenerate and
classify_encoded, plus warmup requests, export.json and the model card in assets.extra) atomically, and
`<export_base>/models.config`. A run whose eval stage did not run is refused unless --allow_unevaluated.
By default the export is first checked in a fresh TensorFlow-only process against the Keras models;
only a matching export is published. See docs/serving.md.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from mid_tf.export import ExportError, ServingLimits, build_card, clean_stale  # noqa: E402  (TensorFlow-free)

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

flags.DEFINE_bool("allow_unevaluated", False, "Export a run whose eval stage did not run; its model card then says "
                  "\"not evaluated\" instead of accuracies.")
flags.DEFINE_integer("max_batch", ServingLimits.max_batch, "Most images one request may hold (every signature); "
                     "larger requests get INVALID_ARGUMENT. Keep it >= max_batch_size in "
                     "deploy/batching_parameters.txt when the server batches.", lower_bound=1)
flags.DEFINE_integer("max_image_bytes", ServingLimits.max_image_bytes, "Largest encoded image (bytes) "
                     "classify_encoded accepts; larger files get INVALID_ARGUMENT.", lower_bound=1)

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
    """Checks that need no TensorFlow, so a wrong flag or model_dir fails in a second rather than after TF loads.

    Returns (model card, export base, limits); mid_tf.artifacts / mid_tf.export check everything again.
    """
    card = build_card(FLAGS.model_dir, allow_unevaluated=FLAGS.allow_unevaluated)  # reads run.json, eval
    export_base = FLAGS.export_base or os.path.join("exports", f"mid_{card['dataset']}")
    target = os.path.join(export_base, str(FLAGS.version)) if FLAGS.version else None
    if target and os.path.exists(target) and not FLAGS.overwrite:
        raise ValueError(f"{os.path.abspath(target)} already exists; TF Serving may be serving it. Omit --version "
                         "to export the next free version, or pass --overwrite.")
    for line in clean_stale(export_base):
        print(line)
    return card, export_base, ServingLimits(FLAGS.max_batch, FLAGS.max_image_bytes)


def _print_result(info: dict, path: str) -> None:
    print(f"exported {info['model_name']} version {info['version']} to {path}")
    for name, sig in sorted(info["signatures"].items()):
        ins = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["inputs"].items())
        outs = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in sig["outputs"].items())
        print(f"  {name}: {ins} -> {outs}")
    limits = info["limits"]
    print(f"limits per request: {limits['max_batch']} images, {limits['max_image_bytes']} bytes per encoded image")
    if "verification" in info:
        v = info["verification"]
        print(f"verified in a fresh TensorFlow-only process: max |SavedModel - Keras| = {v['max_abs_diff']:.3g} "
              f"(classify {v['classify']:.3g}, regenerate {v['regenerate']:.3g}, "
              f"classify_encoded {v['classify_encoded']:.3g}; classes match: {v['classes_match']})")
    evaluated = "" if info["model_card"]["evaluated"] else " (not evaluated)"
    print(f"model card{evaluated}: {os.path.join(path, 'assets.extra', 'model_card.md')}  "
          f"(mid-client --info --export_dir={os.path.dirname(path)})")
    print(f"models.config: {os.path.join(os.path.dirname(path), 'models.config')}  (serve it: docs/serving.md)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # tf.saved_model.save logs every function it renames at INFO
    try:
        labels = _labels(FLAGS.version_labels)
        card, export_base, limits = _preflight()
    except (ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mid_tf import artifacts
    from mid_tf.export import export_model, read_export_json

    run = card["source"]["run"]
    try:
        models = artifacts.load_models(FLAGS.model_dir, stages=("target", "teacher", "mid"))
        path = export_model(
            models, export_base, FLAGS.version, overwrite=FLAGS.overwrite, model_name=FLAGS.model_name,
            metadata={"source_model_dir": os.path.abspath(FLAGS.model_dir), "dataset": run["dataset"],
                      "width": run.get("width"), "seed": run.get("seed")},
            version_policy=FLAGS.version_policy, serving_base_path=FLAGS.serving_base_path,
            version_labels=labels, verify=FLAGS.verify, tolerance=FLAGS.tolerance, model_card=card,
            allow_unevaluated=FLAGS.allow_unevaluated, limits=limits)
    except (artifacts.ArtifactError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(read_export_json(path), path)
    return 0


def run() -> None:
    """Console-script entry point. absl's --help lists the key flags of the program it was started as
    (export.py, the mid-export script), not of this module: they are declared theirs too."""
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


if __name__ == "__main__":
    run()
