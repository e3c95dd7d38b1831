"""A short training run with sampling, evaluation and EMA: what it writes under the workdir (metrics.jsonl,
TensorBoard events, sample grids), the validation loss, and `sdjax sample --workdir` on the result, whose checkpoints are in a gs:// bucket."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gcs_server import GcsServer
from sdjax import cli
from sdjax import evaluation
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax import train as train_lib
from sdjax.metrics import MetricsWriter, read_metrics

PROMPTS = ("a red circle on a blue background", "a green square on a white background")
IMAGES_PER_PROMPT = 2


def run_config():
    from tiny import tiny_config
    c = tiny_config()
    c.train.steps = 4
    c.train.sample_every = 2
    c.train.eval_every = 2
    c.train.ema_decay = 0.99
    c.sample.prompts = PROMPTS
    c.sample.images_per_prompt = IMAGES_PER_PROMPT
    c.sample.steps = 3
    c.sample.guidance = 4.0
    c.data.demo_num_eval_examples = 16  # two global batches of 8
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run: the train step, the sampler and the evaluator compiled (the slow tests below share it). Its
    checkpoints are in a gs:// bucket (a GCS API server on 127.0.0.1), where `sdjax sample` reads them."""
    server = GcsServer()
    workdir = str(tmp_path_factory.mktemp("run"))
    config = run_config()
    config.train.checkpoint_dir = server.make_bucket("sdjax-samples") + "/run"
    result = train_lib.train(config, workdir)
    yield config, workdir, result
    server.stop()


@pytest.mark.slow
def test_tensorboard_events_hold_the_training_scalars_and_sample_grids(trained):
    _, workdir, _ = trained
    events = EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "images_per_s", "eval_loss", "eval_loss_ema"} <= scalars
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
    assert events.Tags()["images"] == ["samples"]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[-1].height, grids[-1].width) == (len(PROMPTS) * 16, IMAGES_PER_PROMPT * 16)


@pytest.mark.slow
def test_sample_grids_are_written_under_the_workdir(trained):
    _, workdir, _ = trained
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000002.png", "step_000004.png"]
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000004.png")))
    assert grid.shape == (len(PROMPTS) * 16, IMAGES_PER_PROMPT * 16, 3) and grid.std() > 0


@pytest.mark.slow
def test_metrics_jsonl_keeps_one_record_per_logged_step_and_adds_evaluations(trained):
    _, workdir, _ = trained
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["eval_loss"]) and np.isfinite(r["eval_loss_ema"]) for r in evals)


def test_speed_report_gives_the_steady_step_time_and_the_compiled_steps_flops(trained):
    _, workdir, result = trained
    with open(os.path.join(workdir, "speed.json")) as f:
        speed = json.load(f)
    assert speed["step"] == 4 and speed["device_kind"] == jax.devices()[0].device_kind
    # steps 2-4 (the first compiles); the evaluations and sample grids in between are not counted
    assert 0 < speed["step_time_s"] < 60
    assert speed["flops_per_device"] > 1e6 and speed["achieved_tflops_per_device"] > 0
    assert "roofline_fraction" not in speed  # CPUs have no published peak: no roofline
    assert result.last_metrics["step_time_s"] == speed["step_time_s"]


@pytest.mark.slow
def test_eval_loss_is_fixed_for_fixed_params_and_moves_with_training(trained):
    config, workdir, result = trained
    models = models_lib.build_models(config)
    evaluator = evaluation.Evaluator(models, config, mesh_lib.make_mesh(config))
    assert evaluator.num_batches == 2
    params = step_lib.inference_params(result.state, use_ema=False)
    first, second = evaluator(params), evaluator(params)
    assert first == second
    logged = [r for r in read_metrics(workdir) if "eval_loss" in r]
    assert first == pytest.approx(logged[-1]["eval_loss"], rel=1e-6)  # what the run logged at its last step
    assert logged[0]["eval_loss"] != logged[-1]["eval_loss"]


def test_fixed_timesteps_cover_the_training_range_evenly():
    timesteps = np.concatenate([evaluation.fixed_timesteps(b * 8, 8, 32, 1000) for b in range(4)])
    np.testing.assert_array_equal(timesteps, np.floor((np.arange(32) + 0.5) * 1000 / 32).astype(int))


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 1.0})
    writer.write_image(1, "samples", np.zeros((4, 4, 3), np.uint8))
    writer.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sample_command_on_the_run_reproduces_its_last_grid(trained, tmp_path):
    """`sdjax sample --workdir` loads the newest checkpoint's EMA UNet: same prompts, seed, scheduler and
    steps as the in-training grid give the same image."""
    config, workdir, _ = trained
    out = tmp_path / "grid.png"
    s = config.sample
    args = ["sdjax", "sample", f"--workdir={workdir}", f"--num-images={IMAGES_PER_PROMPT}",
            f"--scheduler={s.scheduler}", f"--steps={s.steps}", f"--guidance={s.guidance}", f"--seed={s.seed}",
            f"--out={out}"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert cli.main(args) == 0
    reproduced = np.asarray(Image.open(out)).astype(int)
    in_training = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000004.png"))).astype(int)
    assert np.abs(reproduced - in_training).max() <= 1  # the same computation; one uint8 level of slack


def test_eval_every_needs_a_source_with_a_held_out_split(tiny_config):
    from sdjax.config import ConfigError
    from sdjax.validation import validate
    tiny_config.train.eval_every = 10
    tiny_config.data.demo_num_eval_examples = 4  # fewer than one global batch of 8
    with pytest.raises(ConfigError, match="at least one global batch"):
        validate(tiny_config, 8)
    tiny_config.data.source, tiny_config.data.path = "imagefolder", "/data/pets"
    with pytest.raises(ConfigError, match="data.eval_path"):
        validate(tiny_config, 8)
