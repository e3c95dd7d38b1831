"""Each benchmark script runs end to end for one short iteration, so the scripts keep working. Their figures
are measured on purpose-built runs (docs/benchmarks.md), never asserted here: only that each prints its table
with a number in every row. The four that train or compile a step (8-10 minutes of the suite's 2-core budget)
are marked `smoke` and left out of the default run: `python -m pytest -m smoke` runs them."""

import os
import re
import subprocess
import sys

import pytest
from tiny import FAST_COMPILE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS)  # each script sets its own device count
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def assert_measured(rows: list[list[str]], names: list[str], column: int = 1) -> None:
    assert [row[0] for row in rows] == names
    for row in rows:
        assert re.fullmatch(r"[0-9.]+", row[column]), row  # a number, not "failed: ..."


@pytest.mark.smoke
def test_train_step_benchmark_compares_the_three_trainers(tmp_path):
    variants = ["sdjax-fp32-1dev", "flax-example-fp32", "torch-fp32", "sdjax-noattn-fp32-1dev"]
    output = run_benchmark("train_step.py", "--variants", ",".join(variants), "--repeats", "1",
                           "--batch", "2", "--image-size", "16", "--unet-channels", "32,32",
                           "--compilation-cache", str(tmp_path / "xla"))
    assert_measured(table_rows(output), variants)
    assert os.listdir(tmp_path / "xla")  # the sdjax variants compiled into the persistent cache


@pytest.mark.smoke
def test_gpu_train_step_benchmark_runs_on_cpu_with_a_small_config():
    variants = ["sdjax-auto"]  # its torch variants share step_runners.torch_runner with train_step.py's
    output = run_benchmark("gpu_train_step.py", "--config", os.path.join(ROOT, "configs", "demo.py"),
                           "--variants", ",".join(variants), "--batch", "2", "--repeats", "1")
    assert_measured(table_rows(output), variants)


@pytest.mark.smoke
def test_startup_benchmark_times_a_cold_and_a_warm_start():
    output = run_benchmark("startup.py", "--warm-runs", "1", "--", "--config.data.resolution=16",
                           "--config.data.demo_num_examples=16", "--config.train.batch_size=8",
                           # a smaller step to compile: measured alone, 73 -> 59 s
                           "--config.model.unet.block_out_channels=(32,32)", "--config.train.train_text_encoder=False",
                           "--config.train.ema_decay=0")
    rows = table_rows(output)
    assert [row[0].split(" ")[0] for row in rows] == ["cold", "warm"]
    assert all(float(row[1]) > 0 for row in rows)


@pytest.mark.smoke
def test_memory_settings_benchmark_compiles_the_baseline():
    output = run_benchmark("memory_settings.py", "--config", "configs/demo.py", "--topology", "cpu:8",
                           "--only", "baseline", "--resolution", "16")
    assert_measured(table_rows(output), ["baseline"])


def test_data_throughput_benchmark_reads_an_image_folder():
    output = run_benchmark("data_throughput.py", "--images", "4", "--skip-step")
    rows = table_rows(output)
    assert rows and all(re.fullmatch(r"[0-9.]+", row[2]) for row in rows)


def test_attention_kernels_benchmark_times_every_kernel():
    output = run_benchmark("attention_kernels.py", "--batch", "1", "--tokens", "64", "--heads", "2",
                           "--head-dim", "8", "--repeats", "1")
    rows = table_rows(output)
    assert len(rows) == 4 and all(re.fullmatch(r"[0-9.]+", cell) for row in rows for cell in row[1:])
