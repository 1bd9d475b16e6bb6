"""One recipe over seeds (evaluation/seeds.py, cli/seed_table.py): mean ± std recomputed from the reports, and
reports of different recipes refused with the key that differs."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest

from mid_tf.cli import seed_table
from mid_tf.evaluation.seeds import aggregate, format_markdown
from mid_tf.evaluation.writers import load_report

# A real report of the project (a white-box MID run on 1,000 images), the template of every seed below.
TEMPLATE = "docs/results/mnist_whitebox/pixel10/report.json"


def _seed(report: dict, seed: int, shift: float) -> dict:
    """`report` as if run with --seed=seed: its own model_dir and every MID accuracy moved by `shift`."""
    out = copy.deepcopy(report)
    out["seed"] = out["config"]["seed"] = seed
    out["config"]["model_dir"] = f"runs/mnist_whitebox_s{seed}"
    out["clean"]["mid"] += shift
    for row in out["whitebox"].values():
        row["mid"] += shift
    out["regeneration"]["pgd40"]["psnr_db"] += 10 * shift
    return out


@pytest.fixture(scope="module")
def reports():
    base = load_report(TEMPLATE)
    return [_seed(base, 0, 0.0), _seed(base, 1, 0.01), _seed(base, 2, -0.004)]


def test_mean_and_sample_std_recompute_from_the_reports(reports):
    table = aggregate(reports)
    assert table["seeds"] == [0, 1, 2] and table["examples"] == reports[0]["examples"]
    rows = {(r["threat"], r["attack"], r["model"]): r for r in table["rows"]}
    for key, values in ((("clean", "-", "mid"), [r["clean"]["mid"] for r in reports]),
                        (("whitebox", "pgd100x5_margin", "mid"), [r["whitebox"]["pgd100x5_margin"]["mid"] for r in reports]),
                        (("transfer", "pgd40", "target"), [r["transfer"]["pgd40"]["target"] for r in reports])):
        mean = sum(values) / 3
        assert rows[key]["mean"] == pytest.approx(mean)
        assert rows[key]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    assert rows[("transfer", "pgd40", "target")]["std"] == pytest.approx(0.0)  # the transfer rows did not move
    psnr = {(r["inputs"], r["metric"]): r for r in table["regeneration"]}[("pgd40", "psnr_db")]
    assert psnr["values"] == [r["regeneration"]["pgd40"]["psnr_db"] for r in reports]
    text = format_markdown(table)
    aa = rows[("whitebox", "autoattack_fast", "mid")]
    assert f"| whitebox | autoattack_fast | mid | {aa['mean'] * 100:.2f} ± {aa['std'] * 100:.2f} |" in text


def test_one_seed_has_no_spread(reports):
    table = aggregate(reports[:1])
    assert all(r["std"] is None for r in table["rows"])
    assert "± n/a" in format_markdown(table)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["config"]["mid"].__setitem__("epochs", 7), "config mid.epochs = 7"),
    (lambda r: r.__setitem__("examples", 10000), "examples 10000"),
    (lambda r: r.__setitem__("seed", 0), "repeat a seed"),
])
def test_other_recipes_are_refused(reports, change, message):
    other = copy.deepcopy(reports[1])
    change(other)
    with pytest.raises(ValueError, match=message):
        aggregate([reports[0], other], ["a.json", "b.json"])


def test_app_writes_the_table_and_refuses_a_mixed_recipe(reports, tmp_path):
    paths = []
    for i, r in enumerate(reports):
        paths.append(str(tmp_path / f"s{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    out = tmp_path / "table"
    cmd = [sys.executable, "-m", "mid_tf.cli.seed_table", f"--out_dir={out}"]
    proc = subprocess.run(cmd + paths, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / f"{seed_table.OUTPUT}.md").read_text() == proc.stdout and "seed 2" in proc.stdout
    assert json.loads((out / f"{seed_table.OUTPUT}.json").read_text())["seeds"] == [0, 1, 2]
    bad = copy.deepcopy(reports[2])
    bad["config"]["mid"]["pool"] = ["pgd5"]
    with open(paths[2], "w") as f:
        json.dump(bad, f)
    out2 = tmp_path / "refused"
    proc = subprocess.run([sys.executable, "-m", "mid_tf.cli.seed_table", f"--out_dir={out2}"] + paths,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error: ")
    assert "config mid.pool = ['pgd5']" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(out2)
