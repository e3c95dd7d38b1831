"""`sdjax train` and `sdjax train-vae`: the loop around the step. Reads top to bottom:
logging -> (VAE stage first, with model.vae_config) -> mesh -> models -> validate -> input pipeline -> compile
step (from the state's shapes, before the state exists) -> state (resumed from the newest complete checkpoint,
else created; DreamBooth with class images missing: state, class images, then input pipeline and compile) ->
loop (checkpoints every train.checkpoint_every steps, at the end, and at the step boundary after SIGTERM / a
preemption notice) -> speed report (WORKDIR/speed.json: measured step time beside the
roofline of the compiled step on this device, as `sdjax plan` estimates it) -> (VAE stage: the latent scaling
factor).

Both stages run this one loop; `train.stage` picks the stage's step, grids and evaluation (`STAGE_PARTS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from sdjax import checkpoint as checkpoint_lib
from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import evaluation
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import plan as plan_lib
from sdjax import sample as sample_lib
from sdjax import step as step_lib
from sdjax import vae as vae_lib
from sdjax.data import dreambooth as dreambooth_data
from sdjax.metrics import MetricsWriter
from sdjax.models import noise as noise_lib
from sdjax.preemption import StopRequest


@dataclasses.dataclass
class TrainResult:
    state: step_lib.TrainState
    last_metrics: dict
    interrupted: bool


def enable_compilation_cache(path: str) -> None:
    """XLA's persistent cache: a second start of the same config skips compilation."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def release_freed_host_memory() -> None:
    """Hands the heap memory that compilation freed back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    XLA's compiler frees its working memory when it is done, but glibc keeps the pages, and XLA:CPU's step
    buffers did not reuse them (measured): on CPU the peak was the compiler's leftovers plus the step's
    buffers. Compiling before the state exists and trimming after it is created took the CPU benchmark's peak
    RSS from 2.2 to 1.5 GiB (docs/benchmarks.md). On an accelerator it only shrinks the host process."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc():
    libc_name = ctypes.util.find_library("c")
    return ctypes.CDLL(libc_name) if libc_name else None


def compile_step_ahead(train_step, state, local_batch: dict, batch_sharding, rng) -> tuple[float | None, float | None]:
    """Compiles `train_step` for `state` (arrays, or ShapeDtypeStructs with shardings: then before the state
    is allocated) and the shapes of one of this host's batches; the loop's first call runs this executable
    (jit's cache) instead of compiling. A step that cannot compile (e.g. does not fit the devices) fails here,
    before weights are loaded. Returns the compiled step's (FLOPs, bytes accessed) per device, or Nones."""
    batch = global_batch({k: v for k, v in local_batch.items() if k != "skipped"}, batch_sharding)
    lowered = train_step.lower(state, batch, rng)
    compiled = lowered.compile()
    try:
        return plan_lib.executable_cost(lowered, compiled, jax.devices())
    except Exception as e:  # noqa: BLE001 -- a report, never a reason to stop training
        logging.warning("no cost analysis of the train step (%s): the speed report has no FLOPs", e)
        return None, None


def global_batch(local_batch: dict, sharding) -> dict:
    """This host's numpy slice -> one global jax.Array per field, split over the data-parallel devices."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def total_over_processes(count: int) -> int:
    """`count` summed over all processes (a collective: every process calls it at the same steps)."""
    if jax.process_count() == 1:
        return count
    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


@dataclasses.dataclass(frozen=True)
class StageParts:
    """What a stage brings to the loop: (models, config, tx, lr_schedule) -> train step; (models, config, mesh,
    workdir) -> grid maker for train.sample_every; (models, config, mesh) -> evaluator for train.eval_every."""
    make_train_step: Callable
    make_grids: Callable
    make_evaluator: Callable


SPEED_FILE = "speed.json"

STAGE_PARTS = {
    "unet": StageParts(step_lib.make_train_step, sample_lib.TrainingSamples, evaluation.Evaluator),
    "vae": StageParts(vae_lib.make_train_step, vae_lib.ReconstructionSamples, vae_lib.ReconstructionEvaluator),
}


def train_vae_stage(config: ml_collections.ConfigDict, workdir: str) -> TrainResult | None:
    """model.vae_config: the VAE stage into model.vae_from (default WORKDIR/vae), resumed there, or skipped
    when a finished VAE run is there; then model.vae_from names it. None when there is nothing to train."""
    if not config.model.vae_config:
        return None
    vae_workdir = config.model.vae_from or os.path.join(workdir, "vae")
    result = None
    if not vae_lib.is_finished(vae_workdir):
        if jax.process_index() == 0:
            tqdm.write(f"VAE stage ({config.model.vae_config}) in {vae_workdir}:")
        result = train(vae_lib.vae_stage_config(config), vae_workdir)
        if jax.process_index() == 0 and not result.interrupted:
            tqdm.write(f"VAE stage done: {summarize(result)}\nUNet stage in {workdir}:")
    config.model.vae_from = vae_workdir
    return result


def generate_class_images(models, config: ml_collections.ConfigDict, mesh, state: step_lib.TrainState) -> None:
    """DreamBooth prior preservation: the missing class images, sampled from the state's (base) weights."""
    missing = dreambooth_data.missing_class_images(config)
    sampler = sample_lib.Sampler(models, config, mesh, config.sample.scheduler, config.sample.steps)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if jax.process_index() == 0:
        tqdm.write(f"Sampling {missing} class images of {config.dreambooth.class_prompt!r} into "
                   f"{config.dreambooth.class_data_dir}.")
    # Every process samples (the sampler is one program over all devices); the first one writes the files.
    paths = dreambooth_data.generate_class_images(
        sampler, step_lib.inference_params(state, use_ema=False), config, batch_size=8 * data_parallel,
        write=jax.process_index() == 0)
    multihost_utils.sync_global_devices("dreambooth class images")
    logging.info("wrote %d class images", len(paths))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    # --- logging -------------------------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(config.train.compilation_cache_dir)
    is_main = jax.process_index() == 0

    # --- models and validation (before anything compiles) --------------------------------------------
    noise_lib.resolve_noise_schedule(config)  # a pretrained folder's own noise schedule
    config_lib.validate(config, jax.device_count(), jax.process_count())
    vae_result = train_vae_stage(config, workdir)
    if vae_result and vae_result.interrupted:
        return vae_result  # the same command resumes the VAE stage, then runs this one
    if config.model.vae_from:
        vae_lib.use_trained_vae(config)  # model.vae <- its architecture and scaling factor (saved with this run)
    stage = STAGE_PARTS[config.train.stage]
    models = models_lib.build_models(config)
    config_lib.validate_against_models(config, models)
    save_config(config, workdir)

    # --- mesh -----------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # --- optimizer, and the update step compiled from the state's shapes before the state exists ------
    lr_schedule = optim.make_lr_schedule(config)
    tx = optim.make_optimizer(config)
    base_rng = jax.random.key(config.train.seed)
    init_rng, step_rng = jax.random.split(base_rng)
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    abstract_state = checkpoint_lib.abstract_train_state(models, config, tx, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    train_step = step_lib.jit_train_step(stage.make_train_step(models, config, tx, lr_schedule), shardings, mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    # DreamBooth samples missing class images from the base model: then the input pipeline waits for the state.
    class_images_missing = dreambooth_data.missing_class_images(config)
    resume_step = checkpoints.check_newest(abstract_state)  # a checkpoint that does not fit fails here
    if not class_images_missing:
        dataset = data_lib.make_train_dataset(config, models.tokenizer, jax.process_index(), jax.process_count())
        step_cost = compile_step_ahead(train_step, abstract_state, dataset[resume_step], batch_sharding, step_rng)

    # --- sharded state: resumed from the newest complete checkpoint, else created -------------------
    restored = checkpoints.restore_latest(lambda: abstract_state)
    if restored:
        state, step_rng = restored.state, restored.rng
        if is_main:
            tqdm.write(f"Resuming from the checkpoint at step {restored.step} in {checkpoints.directory}.")
    else:
        state, _ = step_lib.create_train_state(models, config, tx, mesh, init_rng)
        if config.model.vae_from:
            state = vae_lib.with_trained_vae(state, models, config)
    release_freed_host_memory()
    if class_images_missing:
        generate_class_images(models, config, mesh, state)
        dataset = data_lib.make_train_dataset(config, models.tokenizer, jax.process_index(), jax.process_count())
        step_cost = compile_step_ahead(train_step, state, dataset[int(state.step)], batch_sharding, step_rng)
        release_freed_host_memory()

    # --- in-training grids (samples, or VAE reconstructions) and evaluation (compiled at first use) ----
    samples = stage.make_grids(models, config, mesh, workdir) if config.train.sample_every else None
    evaluator = stage.make_evaluator(models, config, mesh) if config.train.eval_every else None

    # --- loop -----------------------------------------------------------------------------------------
    start_step = int(state.step)
    total = config.train.steps
    writer = MetricsWriter(workdir, resume_step=start_step)
    if is_main:
        tqdm.write(f"TensorBoard: tensorboard --logdir {writer.tb_dir}")
    batches = data_lib.iterate_from(dataset, start_step, config.data.num_threads, config.data.prefetch,
                                    config.data.num_workers)
    skipped = 0  # bad records this process's batches passed over (replaced by good ones), since start_step
    progress = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=not is_main,
                    dynamic_ncols=True)
    last_metrics, interrupted = {}, False
    window_start, window_steps = None, 0
    trained_s, trained_steps = 0.0, 0  # steady-state training time (logged windows), for the speed report
    stop = StopRequest(enabled=jax.process_count() == 1).install()  # multi-process: JAX's preemption sync point
    try:
        for step in range(start_step + 1, total + 1):
            local_batch = next(batches)
            skipped += int(local_batch.pop("skipped").sum())
            batch = global_batch(local_batch, batch_sharding)
            state, metrics = train_step(state, batch, step_rng)
            window_steps += 1
            if window_start is None:  # the first step's dispatch and buffer allocation: time from its end
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1)
            if step % config.train.log_every == 0 or step == total:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                images_per_s = window_steps * config.train.batch_size / elapsed if window_steps else 0.0
                skipped_total = total_over_processes(skipped)
                records_read = (step - start_step) * config.train.batch_size + skipped_total
                data_lib.check_bad_fraction(skipped_total, records_read, config.data.max_bad_fraction,
                                            data_lib.source_name(config))
                last_metrics = {**{k: float(v) for k, v in metrics.items()}, "images_per_s": images_per_s,
                                "skipped": skipped_total}
                writer.write(step, last_metrics)
                progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", img_s=f"{images_per_s:.1f}",
                                     skipped=skipped_total)
                trained_s, trained_steps = trained_s + elapsed, trained_steps + window_steps
                window_start, window_steps = time.perf_counter(), 0
                if not np.isfinite(last_metrics["loss"]):
                    raise FloatingPointError(f"loss is {last_metrics['loss']} at step {step}; lower "
                                             "optimizer.learning_rate or use train.precision=fp32")
            if samples and (step % config.train.sample_every == 0 or step == total):
                grid = samples(step_lib.inference_params(state))  # EMA weights when kept
                if is_main:
                    sample_lib.save_png(samples.path(step), grid)
                writer.write_image(step, samples.tag, grid)
                release_freed_host_memory()  # the first grid compiled the sampler
                window_start, window_steps = time.perf_counter(), 0  # images/s counts training only
            if evaluator and (step % config.train.eval_every == 0 or step == total):
                writer.write(step, evaluator.evaluate_state(state))
                release_freed_host_memory()  # the first evaluation compiled its step
                window_start, window_steps = time.perf_counter(), 0
            stop_now = stop.requested or checkpoints.reached_preemption(step)
            if step % config.train.checkpoint_every == 0 or step == total or stop_now:
                checkpoints.save(step, state, step_rng)  # asynchronous: the next steps run while it writes
            if stop_now:
                interrupted = True
                if is_main:
                    progress.write(f"{stop.signal_name or 'Preemption notice'}: saved a checkpoint at step {step}; "
                                   "the same command resumes from it.")
                break
        if trained_steps:
            speed = plan_lib.measured_against_roofline(trained_s / trained_steps, *step_cost, jax.devices()[0])
            last_metrics = {**last_metrics, **speed}
            if is_main:
                with open(os.path.join(workdir, SPEED_FILE), "w") as f:
                    json.dump({"step": int(state.step), **speed}, f)
                progress.write(plan_lib.describe_speed(speed))
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            progress.write(f"Interrupted: stopped cleanly after step {int(state.step)}.")
    finally:
        stop.uninstall()
        checkpoints.close()  # waits until the last checkpoint is committed
        batches.close()  # stops grain's threads and worker processes
        progress.close()
        writer.close()

    # --- VAE stage: the latent scaling factor (its file marks the run finished) -----------------------
    if config.train.stage == "vae" and not interrupted:
        stats = vae_lib.compute_scaling_factor(models, config, mesh, step_lib.inference_params(state))
        path = vae_lib.save_scaling_factor(workdir, stats, int(state.step))
        last_metrics = {**last_metrics, **stats}
        if is_main:
            tqdm.write(f"Latent scaling factor {stats['scaling_factor']:.4f} (1 / std of the latents of "
                       f"{stats['examples']} training images) in {path}.")
    return TrainResult(state=state, last_metrics=last_metrics, interrupted=interrupted)


def summarize(result: TrainResult) -> str:
    return json.dumps({"step": int(result.state.step), **result.last_metrics})
