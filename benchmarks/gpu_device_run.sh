#!/usr/bin/env bash
# One-shot GPU benchmark on a lent machine with no package index: installs the pure-Python packages the machine
# lacks, carried as wheels in .whl/ (diffusers, for the PyTorch baselines: sdjax's own models need no diffusers),
# keeps the machine's jax/jaxlib/CUDA plugin, flax, optax, transformers and torch, then runs
# benchmarks/gpu_train_step.py, then (unless TRAINER_CHECK=0) the trainer itself on this GPU: `sdjax plan
# --topology local` and a short `sdjax train` of the demo's UNet stage, whose last line is the measured step
# time beside the roofline (speed.json). Results and logs go to $OUT (or ./gpu_out).
# The wheels (Python 3.12, the machine's), fetched here beforehand, with .whl/ ignored by git:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl diffusers ml_collections \
#     grain array_record tensorboardX portpicker
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import jax, jaxlib, flax, optax, torch, diffusers, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"
python3 benchmarks/gpu_train_step.py --json-out "$OUT/gpu_results.json" --log-dir "$OUT" "$@" | tee "$OUT/gpu_table.md"
[ "${TRAINER_CHECK:-1}" = 0 ] && exit 0
timeout 60 python3 -m sdjax.cli plan --config configs/demo.py --topology local 2>&1 | tail -20 | tee "$OUT/plan_local.txt"
timeout 120 python3 -m sdjax.cli train --config configs/demo.py --workdir /tmp/demo_unet --config.model.vae_config= \
  --config.train.steps=600 --config.train.sample_every=0 --config.train.eval_every=0 --config.train.checkpoint_every=1000 \
  --config.train.compilation_cache_dir= 2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -20 | tee "$OUT/train_demo.txt"
cp /tmp/demo_unet/speed.json "$OUT/" 2>/dev/null
