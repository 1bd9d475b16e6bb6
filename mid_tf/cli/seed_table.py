"""`mid-seed-table` / `python -m mid_tf.cli.seed_table`: one recipe's runs over several seeds as mean ± std.

  python -m mid_tf.cli.seed_table runs/mnist_whitebox_s0/eval/report.json runs/mnist_whitebox_s1/eval/report.json \
      runs/mnist_whitebox_s2/eval/report.json --out_dir=<out_dir>

Prints the Markdown table (evaluation/seeds.py) and, with --out_dir, writes it to <out_dir>/seeds.md and its numbers
to <out_dir>/seeds.json.
Reports of different recipes (any configuration key but the seed, the paths, the logging and the number of
eval processes), datasets or image counts are refused: exit status 2 and the key that differs.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from mid_tf.cli.common import fail, parse_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Where to write <out_dir>/seeds.md and <out_dir>/seeds.json (default: print only).")
OUTPUT = "seeds"  # <out_dir>/seeds.md, <out_dir>/seeds.json


def _write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv) -> int:
    paths = argv[1:]
    if not paths:
        return fail("give the report.json of every seed, e.g. runs/mnist_whitebox_s0/eval/report.json")
    from mid_tf.artifacts import write_json_atomic
    from mid_tf.evaluation.seeds import aggregate, format_markdown
    from mid_tf.evaluation.writers import load_report

    reports = []
    for path in paths:
        try:
            reports.append(load_report(path))
        except (OSError, ValueError) as e:
            return fail(f"cannot read {path}: {e}")
    try:
        table = aggregate(reports, paths)
    except ValueError as e:
        return fail(e)
    text = format_markdown(table)
    print(text, end="")
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        write_json_atomic(os.path.join(FLAGS.out_dir, f"{OUTPUT}.json"), {"reports": paths, **table})
        _write_text_atomic(os.path.join(FLAGS.out_dir, f"{OUTPUT}.md"), text)
    return 0


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
