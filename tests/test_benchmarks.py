"""The benchmark scripts still run (tiny settings; nothing here is timed or compared)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_runs_its_variants():
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--batch", "8", "--iters", "1",
                           "--attack_steps", "2", "--variants", "graph,order1,cache,bf16,stock,compiled"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "MID_DATA_DIR": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "cpu:" in out and "float32 2048x2048 matmul" in out and "FLOPs per iteration" in out
    assert " x 2 x 4)" in out  # the attack FLOPs follow --attack_steps
    assert "default kernels (graph row): compiled CPU kernels" in out
    for variant in ("graph", "order1", "cache", "stock", "compiled"):
        assert any(line.startswith(variant) for line in out.splitlines()), out
    assert any(line.startswith("bf16") for line in out.splitlines()), out  # a row or a 'skipped' line


def test_train_step_benchmark_times_the_cifar10_step():
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--dataset=cifar10", "--width=0.125",
                           "--batch", "4", "--iters", "1", "--attack_steps", "2", "--variants", "order1,cache,bf16_order1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "MID_DATA_DIR": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "dataset cifar10 (width 0.125)" in out and "threat model rgb: L-inf eps 0.03137 (8/255)" in out
    assert "FLOPs per iteration" in out and "of matmul peak" in out
    for variant in ("graph", "order1", "cache"):
        assert any(line.startswith(variant) for line in out.splitlines()), out


def test_time_to_accuracy_reads_the_validation_epochs(tmp_path, mnist_data_dir):
    """A tiny end-to-end run (1 epoch a stage, 1,024 images, width 1/4): the script launches train.py,
    reads validation.jsonl and reports the first epoch meeting the (here trivial) targets."""
    model_dir = tmp_path / "run"
    flags = ["--dataset=mnist", "--stages=target,teacher,mid", "--width=0.25", "--train_examples=1024",
             "--eval_examples=256", "--target_epochs=1", "--teacher_epochs=1", "--mid_epochs=2",
             "--attack_pool=clean,fgsm,pgd3", "--batch_size=128", "--meta_order=1"]
    cmd = [sys.executable, "benchmarks/time_to_accuracy.py", "--model_dir", str(model_dir), "--val_examples", "64",
           "--clean", "0", "--fgsm", "0", "--pgd40", "0", "--", *flags]
    env = {**os.environ, "MID_DATA_DIR": mnist_data_dir}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "all targets: epoch 1," in proc.stdout, proc.stdout[-2000:]
    lines = (model_dir / "logs" / "mid" / "validation.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"examples": 64' in lines[0]
    # A model_dir that exists is refused (its completed stages would be skipped, the time meaningless).
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 2 and "exists" in again.stderr


def test_eval_fn_benchmark_compares_eager_and_compiled():
    proc = subprocess.run([sys.executable, "benchmarks/eval_fn.py", "--examples", "4",
                           "--attacks", "apgd_ce:max_iter=2,cw_l2:max_iterations=2,binary_search_steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "threat model rgb: L-inf eps 0.03137 (8/255)" in out
    assert out.count("forward batch") == 2 and out.count("x  accuracy left") == 2 and out.count("ms  ratio") == 2
    assert "apgd_ce:max_iter=2" in out and "accuracy left" in out
    bad = subprocess.run([sys.executable, "benchmarks/eval_fn.py", "--attacks", "pgd40"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "error: --attacks: only eager-only attacks" in bad.stderr + bad.stdout


def test_row_cache_benchmark_compares_cache_off_and_on():
    proc = subprocess.run([sys.executable, "benchmarks/row_cache.py", "--examples", "4",
                           "--attacks", "square:max_iter=5,apgd_ce:max_iter=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "cache off" in line]
    assert len(rows) == 2 and rows[0].startswith("square:max_iter=5") and all("x  accuracy left" in r for r in rows)
    bad = subprocess.run([sys.executable, "benchmarks/row_cache.py", "--attacks", "fgsm"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "error: --attacks: only ART's attacks" in bad.stderr + bad.stdout


def test_time_match_prints_the_baseline_epochs_that_take_mids_time(mnist_data_dir):
    """Both stages' own training code runs (tiny batches); the epochs it prints follow from the step times it
    prints; too many steps for the split is a one-line error with status 2."""
    import re

    args = [sys.executable, "benchmarks/time_match.py", "--flagfile=configs/mnist_whitebox.flags",
            "--flagfile=configs/mnist_whitebox_trades.flags", f"--data_dir={mnist_data_dir}", "--mid_batch_size=8",
            "--batch_size=8", "--width=0.25", "--train_examples=512", "--timed_steps=2", "--untimed_steps=1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^cpu: .*family \S+ model \S+, AVX512_BF16 (yes|no)", out, re.M), out
    mid = re.search(r"^mid +([\d.]+) ms/step +batch 8, 64 steps/epoch .*pool pgd5,pgd10,pgd20,pgd_l2_5$", out, re.M)
    trades = re.search(r"^trades +([\d.]+) ms/step +batch 8, 64 steps/epoch .*attack pgd20$", out, re.M)
    assert mid and trades, out
    epochs = 18 * float(mid.group(1)) / float(trades.group(1))  # the same steps per epoch here
    printed = re.search(r"--baseline_epochs=(\d+) \(([\d.]+) epochs of trades; the flags give 30\)", out)
    assert printed and abs(float(printed.group(2)) - epochs) < 0.02 * epochs + 0.01, out
    assert int(printed.group(1)) == max(1, round(float(printed.group(2))))
    too_many = subprocess.run(args + ["--timed_steps=100"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert too_many.returncode == 2 and "error: the training split has 512 images" in too_many.stderr
    assert "Traceback" not in too_many.stderr
