"""The VAE stage (`sdjax train-vae`) and the two-stage demo: the reconstruction loss goes down, the latent
scaling factor is 1 / std of the latents, a VAE run exports to a PyTorch AutoencoderKL that reconstructs as the
Flax one does, and a short VAE-then-UNet run completes and `sdjax eval-demo` scores it. That run keeps its
checkpoints in a gs:// bucket (a GCS API server on 127.0.0.1, tests/gcs_server.py), as a pod run does: both
stages save there, and `eval-demo` and `export` read them from there."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from etils import epath
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gcs_server import GcsServer
from sdjax import checkpoint as checkpoint_lib
from sdjax import cli
from sdjax import data as data_lib
from sdjax import demo_eval
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import train as train_lib
from sdjax import training_setup
from sdjax import vae as vae_lib
from sdjax.data import shapes

TESTS = os.path.dirname(os.path.abspath(__file__))


def vae_config():
    from tiny import tiny_vae_config
    return tiny_vae_config()


# --- a short two-stage run --------------------------------------------------------------------------

VAE_CONFIG_FILE = f'''
import sys
sys.path.insert(0, {TESTS!r})
from tiny import tiny_vae_config as get_config  # noqa: F401
'''


@pytest.fixture(scope="module")
def bucket():
    server = GcsServer()
    yield server.make_bucket("sdjax-two-stage")
    server.stop()


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, bucket):
    """`sdjax train` of the tiny UNet with model.vae_config: the VAE stage into WORKDIR/vae, then the UNet;
    checkpoints in the bucket."""
    root = tmp_path_factory.mktemp("two_stage")
    config_file = root / "tiny_vae.py"
    config_file.write_text(VAE_CONFIG_FILE)
    from tiny import tiny_config, with_demo_unet_training
    config = with_demo_unet_training(tiny_config())  # the demo's v-prediction, Min-SNR, text encoder trained
    config.model.vae_config = str(config_file)
    config.train.steps = 2
    config.train.sample_every = config.train.eval_every = 0  # eval-demo samples from it below
    config.train.checkpoint_dir = f"{bucket}/two-stage"
    workdir = str(root / "run")
    result = train_lib.train(config, workdir)
    return config, workdir, result


@pytest.mark.slow  # the fixture compiles the VAE and UNet steps
def test_vae_stage_runs_first_and_the_unet_stage_takes_its_weights_and_scaling_factor(two_stage_run):
    config, workdir, result = two_stage_run
    vae_dir = os.path.join(workdir, "vae")
    assert not result.interrupted and int(result.state.step) == 2
    with open(os.path.join(vae_dir, vae_lib.SCALING_FILE)) as f:
        stats = json.load(f)
    assert stats["step"] == 30 and stats["scaling_factor"] > 0
    checkpoints = epath.Path(config.train.checkpoint_dir)
    assert (checkpoints / "2" / checkpoint_lib.COMMIT_MARKER).exists()  # the UNet stage's
    vae_checkpoints = epath.Path(config.train.checkpoint_dir + "-vae")
    assert (vae_checkpoints / "30" / checkpoint_lib.COMMIT_MARKER).exists()  # the VAE stage's, beside it
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(vae_dir, "checkpoints"))
    saved = checkpoint_lib.load_inference_checkpoint(workdir)
    assert saved.config.model.vae_from == vae_dir
    assert saved.config.diffusion.prediction_type == "v_prediction" and saved.config.train.train_text_encoder
    assert saved.config.model.vae.scaling_factor == stats["scaling_factor"]
    vae_run = checkpoint_lib.load_inference_checkpoint(vae_dir)
    jax.tree.map(np.testing.assert_array_equal, saved.params["vae"], vae_run.params["vae"])
    events = EventAccumulator(os.path.join(vae_dir, "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["reconstructions"]
    grid = events.Images("reconstructions")[-1]
    assert (grid.height, grid.width) == (2 * 16, 4 * 16)  # originals over reconstructions
    assert {"l1", "kl"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_eval_demo_prints_an_accuracy_in_0_1_per_attribute(two_stage_run, capsys):
    config, workdir, _ = two_stage_run
    assert cli.main(["sdjax", "eval-demo", f"--workdir={workdir}", "--num-images=1", "--steps=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompts"] == 6 and report["images"] == 6
    held_out, seen = demo_eval.held_out_prompts(config), report["seen"]["prompts"]
    assert len(seen) == 6 and not set(seen) & set(held_out)
    assert set(report["per_prompt"]) == set(held_out) | set(seen)
    for attribute in ("background", "foreground", "shape", "all", "shape_iou"):
        assert 0 <= report[attribute] <= 1 and 0 <= report["seen"][attribute] <= 1, attribute
    assert report["ema"] is (config.train.ema_decay > 0)  # EMA weights are scored when the run kept them
    assert cli.main(["sdjax", "eval-demo", f"--workdir={workdir}", "--num-images=1", "--steps=2", "--noema"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ema"] is False  # the raw UNet weights


@pytest.mark.slow
def test_eval_demo_of_the_vae_run_scores_its_reconstructions_per_shape(two_stage_run, capsys, tmp_path):
    _, workdir, _ = two_stage_run
    grid = tmp_path / "reconstructions.png"
    assert cli.main(["sdjax", "eval-demo", f"--workdir={os.path.join(workdir, 'vae')}", "--num-images=2",
                     f"--out={grid}"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["reconstructions"] is True and report["step"] == 30 and report["images"] == 6
    assert set(report["per_shape"]) == set(shapes.SHAPES)
    for scores in [report, *report["per_shape"].values()]:
        assert all(0 <= scores[k] <= 1 for k in ("background", "foreground", "shape", "all", "shape_iou")), scores
    assert grid.stat().st_size > 0


@pytest.mark.slow
def test_exported_vae_loads_in_pytorch_and_reconstructs_as_flax(two_stage_run, tmp_path):
    from diffusers import AutoencoderKL
    _, workdir, _ = two_stage_run
    vae_dir, out = os.path.join(workdir, "vae"), str(tmp_path / "vae")
    assert cli.main(["sdjax", "export", f"--workdir={vae_dir}", f"--out={out}"]) == 0
    vae, info = AutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with open(os.path.join(vae_dir, vae_lib.SCALING_FILE)) as f:
        assert vae.config.scaling_factor == pytest.approx(json.load(f)["scaling_factor"])

    loaded = checkpoint_lib.load_inference_checkpoint(vae_dir)
    models = models_lib.build_models(loaded.config)
    images = np.stack([shapes.render(shapes.scene_for(5, i), 16) for i in range(2)]).astype(np.float32) / 127.5 - 1
    ours = np.asarray(vae_lib.reconstruct(models, loaded.params, images))
    with torch.no_grad():
        theirs = vae.eval()(torch.from_numpy(images).permute(0, 3, 1, 2), sample_posterior=False).sample
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    # Tolerance as tests/test_export.py: fp32 on CPU, outputs of order 1, other accumulation orders.
    assert np.abs(theirs).mean() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-3)

    # The exported folder is a `model.vae_from` too: the same architecture and scaling factor.
    from tiny import tiny_config
    config = tiny_config()
    config.model.vae_from = out
    vae_lib.use_trained_vae(config)
    for key, value in loaded.config.model.vae.items():
        assert config.model.vae[key] == (vae.config.scaling_factor if key == "scaling_factor" else value), key


# --- the VAE stage's parts -----------------------------------------------------------------------


def test_vae_state_holds_only_the_trainable_vae():
    config = vae_config()
    state = training_setup.build(config).abstract_state  # shapes only
    assert set(state.params) == {"vae"} and state.frozen == {}


def test_reconstruction_loss_goes_down_on_a_fixed_batch():
    config = vae_config()  # 30 steps at a constant learning rate: the step the two-stage run compiled
    setup = training_setup.build(config)  # train.stage="vae": the VAE stage's step
    state = setup.create_state(jax.random.key(0))
    batch = setup.global_batch(data_lib.make_train_dataset(config, setup.models.tokenizer)[0])
    l1 = []
    for _ in range(config.train.steps):
        state, metrics = setup.train_step(state, batch, jax.random.key(1))
        l1.append(float(metrics["l1"]))
        assert float(metrics["loss"]) >= float(metrics["l1"])  # l1 + kl_weight * kl, kl >= 0
    first, last = np.mean(l1[:5]), np.mean(l1[-5:])
    assert last < 0.6 * first, f"reconstruction L1 did not go down: first 5 steps {first:.4f}, last 5 {last:.4f}"


def test_scaling_factor_is_one_over_the_std_of_sampled_latents():
    config = vae_config()  # 12 examples asked, batch 8: two whole global batches, 16 examples
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config)
    params = jax.device_get(models_lib.init_params(models, config, jax.random.key(0), components=("vae",)))
    noise = np.random.default_rng(0)  # off the init (zero biases), so latent means are far from 0
    params = jax.tree.map(lambda p: p + 0.05 * noise.standard_normal(p.shape).astype(np.float32), params)
    # Replicated as the train state's are: the two-stage run above compiled the same computation.
    stats = vae_lib.compute_scaling_factor(models, config, mesh, jax.device_put(params, mesh_lib.replicated(mesh)))
    assert stats["examples"] == 16

    # The same: the first 16 training images straight from the generator, the same latent noise keys.
    source = data_lib.make_source(config, "train")
    latents = []
    for index in range(2):
        pixels = np.stack([source[i]["image"] for i in range(8 * index, 8 * index + 8)]).astype(np.float32) / 127.5 - 1
        mean, std = models_lib.image_latent_moments(models, params["vae"], pixels)
        key = jax.random.fold_in(jax.random.key(vae_lib.SCALING_SEED), index)
        latents.append(np.asarray(mean + std * jax.random.normal(key, mean.shape)))
    latent_std = np.std(np.concatenate(latents))
    np.testing.assert_allclose(stats["latent_std"], latent_std, rtol=1e-4)
    np.testing.assert_allclose(stats["scaling_factor"], 1 / latent_std, rtol=1e-4)


def test_unfinished_vae_run_is_refused_naming_the_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    from tiny import tiny_config
    config = tiny_config()
    config.model.vae_from = str(tmp_path)
    from sdjax.config import ConfigError
    with pytest.raises(ConfigError, match="has not finished") as error:
        vae_lib.use_trained_vae(config)
    assert error.value.key == "model.vae_from"
