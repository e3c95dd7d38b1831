"""`sdjax train`: the loop around the step. Reads top to bottom:
logging -> mesh -> models -> validate -> input pipeline -> state -> compile step -> loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import step as step_lib
from sdjax.metrics import MetricsWriter


@dataclasses.dataclass
class TrainResult:
    state: step_lib.TrainState
    last_metrics: dict
    interrupted: bool


def enable_compilation_cache(path: str) -> None:
    """XLA's persistent cache: a second start of the same config skips compilation."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def global_batch(local_batch: dict, sharding) -> dict:
    """This host's numpy slice -> one global jax.Array per field, split over the data-parallel devices."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    # --- logging -------------------------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(config.train.compilation_cache_dir)
    is_main = jax.process_index() == 0

    # --- models and validation (before anything compiles) --------------------------------------------
    config_lib.validate(config, jax.device_count(), jax.process_count())
    models = models_lib.build_models(config)
    config_lib.validate_against_models(config, models)
    save_config(config, workdir)

    # --- mesh -----------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # --- input pipeline -------------------------------------------------------------------------------
    dataset = data_lib.make_train_dataset(config, models.tokenizer, jax.process_index(), jax.process_count())

    # --- model, optimizer, sharded state --------------------------------------------------------------
    lr_schedule = optim.make_lr_schedule(config)
    tx = optim.make_optimizer(config)
    base_rng = jax.random.key(config.train.seed)
    init_rng, step_rng = jax.random.split(base_rng)
    state, shardings = step_lib.create_train_state(models, config, tx, mesh, init_rng)

    # --- update step ----------------------------------------------------------------------------------
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, lr_schedule), shardings, mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh)

    # --- loop -----------------------------------------------------------------------------------------
    start_step = int(state.step)
    total = config.train.steps
    writer = MetricsWriter(workdir)
    batches = data_lib.iterate_from(dataset, start_step, config.data.num_threads, config.data.prefetch)
    progress = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not is_main,
                    dynamic_ncols=True)
    last_metrics, interrupted = {}, False
    window_start, window_steps = None, 0
    try:
        for step in range(start_step + 1, total + 1):
            batch = global_batch(next(batches), batch_sharding)
            state, metrics = train_step(state, batch, step_rng)
            window_steps += 1
            if window_start is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1)
            if step % config.train.log_every == 0 or step == total:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                images_per_s = window_steps * config.train.batch_size / elapsed if window_steps else 0.0
                last_metrics = {**{k: float(v) for k, v in metrics.items()}, "images_per_s": images_per_s}
                writer.write(step, last_metrics)
                progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", img_s=f"{images_per_s:.1f}")
                window_start, window_steps = time.perf_counter(), 0
                if not np.isfinite(last_metrics["loss"]):
                    raise FloatingPointError(f"loss is {last_metrics['loss']} at step {step}; lower "
                                             "optimizer.learning_rate or use train.precision=fp32")
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            progress.write(f"Interrupted: stopped cleanly after step {int(state.step)}.")
    finally:
        progress.close()
        writer.close()
    return TrainResult(state=state, last_metrics=last_metrics, interrupted=interrupted)


def summarize(result: TrainResult) -> str:
    return json.dumps({"step": int(result.state.step), **result.last_metrics})
