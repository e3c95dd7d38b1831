#!/usr/bin/env bash
# The README demo end to end on a lent GPU machine with no package index: `sdjax train --config
# configs/demo.py` (VAE stage, then UNet stage) and `sdjax eval-demo`, under the machine's own jax, flax,
# optax, orbax and transformers (5.x there: sdjax's own models need no Flax class from transformers or
# diffusers). The packages the machine lacks are carried as wheels in .wheels/ (ignored by git), fetched here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .wheels ml_collections grain array_record tensorboardX portpicker
# Results go to $OUT (or ./gpu_out): the versions, the two stages' last log lines, the metrics, eval-demo's
# scores and grid.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint as ocp, transformers; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', ocp.__version__, 'transformers', transformers.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"
start=$(date +%s)
python3 -m sdjax.cli train --config configs/demo.py --workdir /tmp/demo 2>&1 | tr '\r' '\n' | grep -v "step/s" \
  > /tmp/train.log; echo "train exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee "$OUT/train_tail.txt"
tail -25 /tmp/train.log >> "$OUT/train_tail.txt"
python3 -m sdjax.cli eval-demo --workdir /tmp/demo --num-images=16 --out "$OUT/eval_grid.png" 2>&1 | tail -15 \
  | tee "$OUT/eval_demo.txt"
python3 -m sdjax.cli eval-demo --workdir /tmp/demo/vae 2>&1 | tail -6 | tee "$OUT/eval_vae.txt"
cp /tmp/demo/metrics.jsonl "$OUT/metrics.jsonl"; cp /tmp/demo/speed.json "$OUT/" 2>/dev/null
echo "all done after $(( $(date +%s) - start )) s" | tee -a "$OUT/train_tail.txt"
