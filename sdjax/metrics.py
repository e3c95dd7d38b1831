"""Where training metrics go, on process 0 only:
  WORKDIR/metrics.jsonl  one JSON object per logged step (and per evaluation);
  WORKDIR/tb             TensorBoard event files (tensorboardX): every scalar under its metrics.jsonl name,
                         sample grids as images (`tensorboard --logdir WORKDIR/tb`).
"""

from __future__ import annotations

import json
import numbers
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._file = open(self.path, "a") if self.enabled else None
        # purge_step: after a resume, TensorBoard hides what the interrupted run logged past its checkpoint.
        self._tb = SummaryWriter(self.tb_dir, purge_step=resume_step or None) if self.enabled else None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, numbers.Real):
                self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 [H, W, 3] image (e.g. a sample grid) under `tag` in TensorBoard."""
        if not self.enabled:
            return
        self._tb.add_image(tag, image, int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_python(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
