"""Every flag of `train.py` reaches the config field its table names (a flag defined but never read is a silent
no-op: --augment once was)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
sys.argv = ["train.py"]
import train
from absl import flags
from mid_tf import config
from mid_tf.cli import train as app

def changed(field):
    default, kind = config.default(field), config.field_type(field)
    if field in app.LISTS:
        return {"mid.train_weights": ("1,2,3", (1.0, 2.0, 3.0)), "mid.test_weights": ("3,2,1", (3.0, 2.0, 1.0)),
                "eval_eps_sweep": ("0.5", (0.5,)), "stages": ("target,eval", ("target", "eval"))}[field]
    if isinstance(default, tuple):
        return "fgsm,mim40", ("fgsm", "mim40")
    if kind == "bool":
        return ("false" if default else "true"), (not default)
    if kind == "int":
        value = (default or 0) + 3
        return str(value), value
    if kind == "float":
        value = (default or 0) * 2 + 0.5
        return repr(value), value
    if field.endswith("precision"):
        return "mixed_bfloat16", "mixed_bfloat16"
    return "zz_value", "zz_value"

bad = []
fields = {**app.FIELDS, **{f: flag for f, flag in app.SHARED.items()}}
pairs = list(app.FIELDS.items()) + [(flag, field) for field, flag in app.SHARED.items()]
for flag, field in pairs:
    if flag == "eval_helper":
        continue
    text, want = changed(field)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train.py", f"--{flag}={text}"])
    cfg = app.build_config()
    got = cfg
    for part in field.split("."):
        got = getattr(got, part)
    if got != want:
        bad.append((flag, field, text, got))
print("CHECKED", len(pairs))
print("BAD", bad)
"""


def test_every_flag_sets_its_config_field():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAD []" in proc.stdout, proc.stdout[-3000:]
    checked = int(proc.stdout.split("CHECKED ")[1].split()[0])
    assert checked >= 60, proc.stdout
