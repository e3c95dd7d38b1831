"""`sdjax train` and `sdjax train-vae`: the loop around the step. Reads top to bottom:
logging -> the run's config (what sdjax fills in: sdjax/run_config.py; then the checks: sdjax/validation.py)
-> (VAE stage first, with model.vae_config) -> models -> the training setup (mesh, optimizer, abstract state,
jitted step: sdjax/training_setup.py) -> input pipeline -> compile step (from the state's shapes, before the
state exists) -> state (resumed from the newest complete checkpoint, else created; DreamBooth with class images
missing: state, class images, then input pipeline and compile) -> loop (checkpoints every
train.checkpoint_every steps, at the end, and at the step boundary after SIGTERM / a preemption notice) ->
speed report (WORKDIR/speed.json: measured step time beside the roofline of the compiled step on this device,
sdjax/roofline.py) -> (VAE stage: the latent scaling factor).

Both stages run this one loop; `train.stage` picks the stage's step, grids and evaluation
(training_setup.STAGE_PARTS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import os
import time
from collections.abc import Collection

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from sdjax import checkpoint as checkpoint_lib
from sdjax import data as data_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import roofline
from sdjax import run_config
from sdjax import sample as sample_lib
from sdjax import step as step_lib
from sdjax import training_setup
from sdjax import vae as vae_lib
from sdjax import validation
from sdjax.data import dreambooth as dreambooth_data
from sdjax.data import files
from sdjax.images import save_png
from sdjax.metrics import MetricsWriter
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


def compile_step_ahead(setup: training_setup.TrainingSetup, host_batch: dict, rng,
                       state=None) -> tuple[float | None, float | None]:
    """Compiles the step for `state` (default: the abstract one, before the state is allocated) and the shapes
    of one of this host's batches; the loop's first call runs this executable instead of compiling. A step
    that cannot compile (e.g. does not fit the devices) fails here, before weights are loaded. Returns the
    compiled step's (FLOPs, bytes accessed) per device, or Nones."""
    lowered, compiled = setup.compile(setup.global_batch(host_batch), rng, state)
    try:
        return roofline.executable_cost(lowered, compiled, jax.devices())
    except Exception as e:  # noqa: BLE001 -- a report, never a reason to stop training
        logging.warning("no cost analysis of the train step (%s): the speed report has no FLOPs", e)
        return None, None


def total_over_processes(count: int) -> int:
    """`count` summed over all processes (a collective: every process calls it at the same steps)."""
    return _over_processes(count, np.sum)


def _over_processes(value: int, reduce) -> int:
    if jax.process_count() == 1:
        return value
    return int(reduce(multihost_utils.process_allgather(np.int64(value))))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json, written by every process: on a pod every host has its own disk and reads its own
    copy back (the checkpoint location, the VAE stage's run); a shared workdir gets the same file, renamed
    into place."""
    files.write_bytes(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2).encode())


SPEED_FILE = "speed.json"


def train_vae_stage(config: ml_collections.ConfigDict, workdir: str) -> TrainResult | None:
    """model.vae_config: the VAE stage into model.vae_from (default WORKDIR/vae), resumed there, or skipped
    when a finished VAE run is there; then model.vae_from names it. None when there is nothing to train."""
    if not config.model.vae_config:
        return None
    vae_workdir = config.model.vae_from or os.path.join(workdir, "vae")
    result = None
    # Agreed over the processes: a host whose disk was replaced (a recreated VM) lacks the finished stage's
    # files that the others keep; then every host runs the stage, which resumes from its last checkpoint in the
    # shared checkpoint_dir, trains no step and writes the files again.
    if not _over_processes(int(vae_lib.is_finished(vae_workdir)), np.min):
        if jax.process_index() == 0:
            tqdm.write(f"VAE stage ({config.model.vae_config}) in {vae_workdir}:")
        result = train(vae_lib.vae_stage_config(config), vae_workdir)
        if jax.process_index() == 0 and not result.interrupted:
            tqdm.write(f"VAE stage done: {summarize(result)}\nUNet stage in {workdir}:")
    config.model.vae_from = vae_workdir
    return result


def generate_class_images(setup: training_setup.TrainingSetup, state: step_lib.TrainState) -> None:
    """DreamBooth prior preservation: the missing class images, sampled from the state's (base) weights.

    Every process samples the same images (the sampler is one program over all devices), from the first one
    that some host lacks, and writes them into its own class folder: on a pod every host has its own disk and
    reads its own copy (a shared folder gets each file renamed into place)."""
    config, mesh = setup.config, setup.mesh
    present = _over_processes(len(dreambooth_data.image_files(config.dreambooth.class_data_dir)), np.min)
    sampler = sample_lib.Sampler(setup.models, config, mesh, config.sample.scheduler, config.sample.steps)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if jax.process_index() == 0:
        tqdm.write(f"Sampling {config.dreambooth.num_class_images - present} class images of "
                   f"{config.dreambooth.class_prompt!r} into {config.dreambooth.class_data_dir}.")
    paths = sample_lib.sample_class_images(
        sampler, step_lib.inference_params(state, use_ema=False), config, batch_size=8 * data_parallel, first=present)
    multihost_utils.sync_global_devices("dreambooth class images")
    logging.info("wrote %d class images", len(paths))


def train(config: ml_collections.ConfigDict, workdir: str, set_by_user: Collection[str] = ()) -> TrainResult:
    """Trains `config` into `workdir` (resuming what is there). `set_by_user`: the config keys given on the
    command line, which sdjax never fills in for the user (sdjax/run_config.py)."""
    # --- logging -------------------------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    enable_compilation_cache(config.train.compilation_cache_dir)
    is_main = jax.process_index() == 0

    # --- the run's config: what sdjax fills in, then the checks (before anything compiles) -------------
    for notice in run_config.resolve(config, set_by_user):
        logging.info("%s", notice)
        if is_main:
            tqdm.write(notice)
    validation.validate(config, jax.device_count(), jax.process_count(), mesh_lib.device_slices(jax.devices()))
    vae_result = train_vae_stage(config, workdir)
    if vae_result and vae_result.interrupted:
        return vae_result  # the same command resumes the VAE stage, then runs this one
    if config.model.vae_from:
        vae_lib.use_trained_vae(config)  # model.vae <- its architecture and scaling factor (saved with this run)
    models = models_lib.build_models(config)
    validation.validate_against_models(config, models)
    save_config(config, workdir)

    # --- mesh, optimizer, and the update step compiled from the state's shapes before the state exists --
    setup = training_setup.build(config, models=models)
    logging.info("mesh %s over %d devices (%d processes)", dict(setup.mesh.shape), setup.mesh.size,
                 jax.process_count())
    init_rng, step_rng = jax.random.split(jax.random.key(config.train.seed))
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    # DreamBooth samples missing class images from the base model: then the input pipeline waits for the state.
    class_images_missing = _over_processes(dreambooth_data.missing_class_images(config), np.max)  # same on all
    resume_step = checkpoints.check_newest(setup.abstract_state)  # a checkpoint that does not fit fails here
    if not class_images_missing:
        dataset = data_lib.make_train_dataset(config, models.tokenizer, jax.process_index(), jax.process_count())
        # A finished run trains no step, nothing to compile (e.g. the VAE stage run again for a replaced host).
        step_cost = compile_step_ahead(setup, dataset[resume_step], step_rng) if resume_step < config.train.steps \
            else None

    # --- sharded state: resumed from the newest complete checkpoint, else created -------------------
    restored = checkpoints.restore_latest(lambda: setup.abstract_state)
    if restored:
        state, step_rng = restored.state, restored.rng
        if is_main:
            tqdm.write(f"Resuming from the checkpoint at step {restored.step} in {checkpoints.directory}.")
    else:
        state = setup.create_state(init_rng)
        if config.model.vae_from:
            state = vae_lib.with_trained_vae(state, models, config)
    release_freed_host_memory()
    if class_images_missing:
        generate_class_images(setup, state)
        dataset = data_lib.make_train_dataset(config, models.tokenizer, jax.process_index(), jax.process_count())
        step_cost = compile_step_ahead(setup, dataset[int(state.step)], step_rng, state)
        release_freed_host_memory()

    # --- in-training grids (samples, or VAE reconstructions) and evaluation (compiled at first use) ----
    stage, mesh, train_step = setup.stage, setup.mesh, setup.train_step
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
            host_batch = next(batches)
            skipped += int(host_batch["skipped"].sum())
            state, metrics = train_step(state, setup.global_batch(host_batch), step_rng)
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
                    save_png(samples.path(step), grid)
                writer.write_image(step, samples.tag, grid)
                release_freed_host_memory()  # the first grid compiled the sampler
                window_start, window_steps = time.perf_counter(), 0  # images/s counts training only
            if evaluator and (step % config.train.eval_every == 0 or step == total):
                writer.write(step, evaluator.evaluate_state(state))
                release_freed_host_memory()  # the first evaluation compiled its step
                window_start, window_steps = time.perf_counter(), 0
            checkpoints.check_saves()  # a failed background save stops the run now, not at the next save
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
            speed = roofline.measured_against_roofline(trained_s / trained_steps, *step_cost, jax.devices()[0])
            last_metrics = {**last_metrics, **speed}
            if is_main:
                with open(os.path.join(workdir, SPEED_FILE), "w") as f:
                    json.dump({"step": int(state.step), **speed}, f)
                progress.write(roofline.describe_speed(speed))
    except KeyboardInterrupt:
        interrupted = True
        if is_main:
            progress.write(f"Interrupted: stopped cleanly after step {int(state.step)}.")
    finally:
        stop.uninstall()
        batches.close()  # stops grain's threads and worker processes
        progress.close()
        writer.close()
        checkpoints.close()  # waits until the last checkpoint is committed; raises if it failed

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
