"""What the benchmark scripts share: absl flag handling (a bad flag or input ends a run with one line
`error: ...` and status 2), the compiled-kernel flag, and the official PyTorch loop's harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mid_tf.cli.common import fail, parse_flags  # noqa: E402,F401  (re-exported for the benchmarks)

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_DIR = os.path.join(REPO, "..", "shared", "tools", "official_mid_timing")
XLA_KERNEL_MODES = ("auto", "on", "off")  # mid_tf.kernels.xla.MODES, without importing TensorFlow here


def define_xla_kernels_flag() -> None:
    flags.DEFINE_enum("xla_kernels", "auto", XLA_KERNEL_MODES, "Compiled CPU kernels for LeNet's pooling, "
                      "unpooling and 1-channel convolutions: auto (by CPU, docs/performance.md) | on | off.")


def configure_xla_kernels() -> str:
    """Applies --xla_kernels (mid_tf.kernels.xla.configure) and returns the line describing the choice."""
    from mid_tf.kernels import xla
    xla.configure(FLAGS.xla_kernels)
    return xla.describe()


def run_official(batch: int) -> dict | None:
    """The official harness's JSON line, or None (with the reason printed) if it cannot run."""
    venv = os.environ.get("OFFICIAL_VENV", "/tmp/official_venv")
    py = os.path.join(venv, "bin", "python")
    here = os.path.abspath(OFFICIAL_DIR)
    if not os.path.exists(os.path.join(here, "train_timing.py")):
        print(f"official harness not found at {here}")
        return None
    if not os.path.exists(py):
        print(f"building the official harness venv at {venv} (set OFFICIAL_VENV to reuse one) ...", flush=True)
        r = subprocess.run(["bash", "setup.sh"], cwd=here, env={**os.environ, "VENV": venv})
        if r.returncode:
            print("official harness setup failed")
            return None
    r = subprocess.run([py, "train_timing.py", "--kl", "legacy", "--threads", "2", "--warmup", "1", "--iters", "4",
                        "--batch", str(batch)], cwd=here, capture_output=True, text=True)
    if r.returncode:
        print("official harness failed:\n" + r.stderr[-2000:])
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])
