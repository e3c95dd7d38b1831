"""Time from typing `sdjax train` to its first finished step, cold and with XLA's persistent cache warm.

`sdjax train` keeps XLA's compiled programs in `train.compilation_cache_dir` (default ~/.cache/sdjax/xla), so a
second start of the same config (a resume, a restart after preemption, a rerun) skips compilation. Each run
here gets a fresh workdir (no checkpoint to resume) and a cache folder of its own: the first run fills it
(cold), the next ones read it (warm). The first step is finished when `metrics.jsonl` gets its line for
step 1 (log_every=1); the clock starts before the process is spawned, so interpreter start, imports, the data
pipeline, parameter init and both compilations all count. The demo's VAE stage is skipped
(`model.vae_config=""`: the UNet stage on the config's own VAE), so what is timed is one trainer start.

    JAX_PLATFORMS=cpu python benchmarks/startup.py     # configs/demo.py, one cold and two warm starts
    python benchmarks/startup.py --warm-runs 1 --config configs/demo.py -- --config.train.batch_size=8

The environment is passed on: with libtpu installed (the test extra) and JAX_PLATFORMS unset, JAX first
probes for a TPU, which adds to every start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_to_first_step(config: str, workdir: str, cache_dir: str, extra: list[str], timeout: float) -> float:
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    command = [sys.executable, "-m", "sdjax.cli", "train", "--config", config, "--workdir", workdir,
               "--config.model.vae_config=", "--config.train.steps=2", "--config.optimizer.warmup_steps=0",
               "--config.train.log_every=1", "--config.train.sample_every=0", "--config.train.eval_every=0",
               f"--config.train.compilation_cache_dir={cache_dir}", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - start < timeout:
            if os.path.exists(metrics_file) and os.path.getsize(metrics_file):
                return time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"sdjax train exited ({proc.returncode}) before its first step:\n"
                                   f"{proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no first step within {timeout} s")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json-out")
    parser.add_argument("overrides", nargs="*", help="extra --config.KEY=VALUE flags for sdjax train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "xla_cache")
        runs = {}
        for i in range(1 + args.warm_runs):
            name = "cold" if i == 0 else f"warm{i}"
            runs[name] = time_to_first_step(args.config, os.path.join(tmp, f"run{i}"), cache, args.overrides,
                                            args.timeout)
            print(f"{name}: {runs[name]:.1f} s", file=sys.stderr, flush=True)
    warm = [v for k, v in runs.items() if k != "cold"]
    print("| start | command to first finished step, s |\n|---|---|")
    print(f"| cold (empty compilation cache) | {runs['cold']:.1f} |")
    if warm:
        print(f"| warm (cache filled by the cold start), best of {len(warm)} | {min(warm):.1f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
