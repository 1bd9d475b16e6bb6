"""Runs an exported SavedModel in a fresh interpreter that imports only TensorFlow and NumPy.

  python tests/fresh_process_check.py <version_dir> <inputs.npz> <outputs.npz>

This is what TF Serving has: the SavedModel, no mid_tf, no Keras. The inputs file holds `image`
(float32 [N, H, W, C]) and `png_0`, `png_1`, ... (uint8 bytes of encoded images); every output of
every signature is written to `<signature>/<output>` in the outputs file. Exits non-zero if loading
or running the model imported mid_tf, or any keras module beyond those `import tensorflow` loads.
Used by tests/test_export.py; independent of mid_tf.export's own verification on purpose.
"""

import sys

import numpy as np
import tensorflow as tf


def foreign_modules():
    return {m for m in sys.modules if m.split(".")[0] in ("mid_tf", "keras", "tf_keras")}


def main(export_dir, inputs_path, outputs_path):
    baseline = foreign_modules()
    data = np.load(inputs_path)
    images = tf.constant(data["image"])
    pngs = tf.constant([data[k].tobytes() for k in sorted(data.files) if k.startswith("png_")])
    signatures = tf.saved_model.load(export_dir).signatures
    results = {}
    for name, kwargs in [("serving_default", {"image": images}), ("regenerate", {"image": images}),
                         ("classify_encoded", {"image_bytes": pngs})]:
        for key, value in signatures[name](**kwargs).items():
            results[f"{name}/{key}"] = value.numpy()
    leaked = sorted(foreign_modules() - baseline)
    if leaked:
        sys.exit(f"running the SavedModel imported modules TF Serving lacks: {leaked[:5]}")
    np.savez(outputs_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:4])
