#!/usr/bin/env bash
# One-shot GPU benchmark on a lent machine with no package index: installs the pinned pure-Python packages
# carried as wheels in .whl/ (diffusers 0.39 and transformers 4.57 still have Flax; the machine's own
# transformers does not), keeps the machine's jax/jaxlib/CUDA plugin and torch, then runs
# benchmarks/gpu_train_step.py, then (unless TRAINER_CHECK=0) the trainer itself on this GPU: `sdjax plan
# --topology local` and a short `sdjax train` of the demo's UNet stage, whose last line is the measured step
# time beside the roofline (speed.json). Results and logs go to $OUT (or ./gpu_out).
# The wheels (Python 3.12, the machine's), fetched here beforehand, with .whl/ ignored by git:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.39.0 transformers==4.57.6 huggingface_hub==0.36.2 \
#     tokenizers==0.22.2 ml_collections==1.1.0 importlib_metadata grain==0.2.15 array_record tensorboardX \
#     dm-tree more-itertools
#   pip download ... -d .whl/extra flax==0.12.8 optax==0.2.8   # only used if the machine's flax cannot load them
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if ! python3 -c "from diffusers import FlaxUNet2DConditionModel; import optax" 2>/tmp/flax_check.log; then
  tail -3 /tmp/flax_check.log; echo "the machine's flax/optax do not load diffusers' Flax models: using the carried ones"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/extra/*.whl
fi
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
