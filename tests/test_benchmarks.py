"""The benchmark scripts still run (tiny settings; nothing here is timed or compared)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_runs_its_variants():
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--batch", "8", "--iters", "1",
                           "--variants", "graph,order1,cache,bf16"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MID_DATA_DIR": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "cpu:" in out and "float32 2048x2048 matmul" in out and "FLOPs per iteration" in out
    for variant in ("graph", "order1", "cache"):
        assert any(line.startswith(variant) for line in out.splitlines()), out
    assert any(line.startswith("bf16") for line in out.splitlines()), out  # a row or a 'skipped' line
