"""Before an export is published: the SavedModel, loaded in a fresh TensorFlow-only process, must agree
with the Keras models it came from (what TF Serving runs is what was trained and evaluated).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from mid_tf.export import warmup as warmup_lib
from mid_tf.export.errors import ExportError
from mid_tf.kernels import xla
from mid_tf.models import build_pipeline, build_regenerator


# Runs in a fresh interpreter that imports only TensorFlow and NumPy: what TF Serving (C++, no Keras,
# no mid_tf) sees. It fails if loading the SavedModel drags in keras or mid_tf.
FRESH_PROCESS_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
def foreign():  # `import tensorflow` itself loads a few keras.src modules; nothing beyond them may load
    return {m for m in sys.modules if m.split(".")[0] in ("keras", "mid_tf", "tf_keras")}
baseline = foreign()
export_dir, data_path, out_path = sys.argv[1:4]
data = np.load(data_path)
blob, offsets = data["png_blob"].tobytes(), data["png_offsets"]
pngs = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
sigs = tf.saved_model.load(export_dir).signatures
out = {}
for name, kwargs in [("classify", {"image": tf.constant(data["image"])}),
                     ("regenerate", {"image": tf.constant(data["image"])}),
                     ("classify_encoded", {"image_bytes": tf.constant(pngs)})]:
    fn = sigs["serving_default" if name == "classify" else name]
    for key, value in fn(**kwargs).items():
        v = value.numpy()
        out[name + "/" + key] = v.astype(str) if v.dtype == object else v  # class names: bytes -> str (no pickle)
leaked = sorted(foreign() - baseline)
if leaked:
    raise SystemExit("the SavedModel needed Python modules TF Serving does not have: " + ", ".join(leaked[:5]))
np.savez(out_path, **out)
"""


def verify_export(path: str, models, num_images: int = 8, seed: int = 0, timeout_s: float = 300.0) -> dict:
    """Loads the export in a fresh Python process (TensorFlow only) and compares it with the Keras models.

    Returns {"max_abs_diff": float, "<signature>": float, ..., "classes_match": bool}. Raises ExportError
    if the fresh process fails. Images are multiples of 1/255 so the PNG round trip is exact.
    """
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 256, size=(num_images, *models.input_shape)) / 255.0).astype(np.float32)
    pngs = [warmup_lib.png_bytes(img) for img in images]
    offsets = np.cumsum([0] + [len(p) for p in pngs])
    pipeline = build_pipeline(models.student_encoder, models.student_classifier)
    regenerator = build_regenerator(models.student_encoder, models.student_decoder)
    # The reference runs the ops the export traced (stock kernels, see `export`): this checks what
    # serialization kept. The compiled kernels agree with them to float32 round-off (tests/test_fast_ops.py),
    # but the decoder's max-unpooling switches are discontinuous: a ReLU output of ~1e-7 against an exact 0
    # in an otherwise zero window moves a regenerated pixel by up to ~0.008 (measured on a white-box run).
    with xla.stock_ops():
        logits = np.asarray(pipeline(images, training=False))
        regenerated = np.asarray(regenerator(images, training=False))
    expected = {
        "classify/logits": logits, "classify_encoded/logits": logits,
        "classify/probabilities": np.asarray(tf.nn.softmax(logits)),
        "classify_encoded/probabilities": np.asarray(tf.nn.softmax(logits)),
        "regenerate/image": np.clip(regenerated, 0.0, 1.0),
    }
    with tempfile.TemporaryDirectory(prefix="mid-verify-") as work:
        data_path, out_path = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(data_path, image=images, png_blob=np.frombuffer(b"".join(pngs), np.uint8), png_offsets=offsets)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, path, data_path, out_path], cwd=work,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportError(f"the export at {path} failed to load or run in a fresh TensorFlow-only process: "
                              + " | ".join(tail))
        got = dict(np.load(out_path))
    report = {}
    for key, want in expected.items():
        sig = key.split("/")[0]
        report[sig] = max(report.get(sig, 0.0), float(np.max(np.abs(got[key] - want))))
    report["max_abs_diff"] = max(report.values())
    report["classes_match"] = bool(all(np.array_equal(got[f"{s}/classes"], logits.argmax(-1))
                                       for s in ("classify", "classify_encoded")))
    return report
