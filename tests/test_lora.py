"""LoRA: the adapters' size, init (the base model's outputs), what training changes, and the exported
pytorch_lora_weights.safetensors loading into PyTorch diffusers with the same outputs as the Flax model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from sdjax import checkpoint as checkpoint_lib
from sdjax import cli
from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import lora as lora_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import step as step_lib
from sdjax import training_setup
from sdjax import validation
from sdjax.models import pytorch_export

RANK, ALPHA = 4, 8.0  # alpha != rank, so a wrong scale (diffusers assumes alpha = rank) would show
UNET_FLAX_NAMES = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_FLAX_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_config(frozen_precision="fp32"):
    from tiny import tiny_config
    config = tiny_config()
    config.lora.rank, config.lora.alpha = RANK, ALPHA
    config.lora.text_encoder_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")
    config.train.frozen_precision = frozen_precision
    config.optimizer.warmup_steps = 0  # so that the first step already moves the adapters
    return config


def _kernels(component_shapes, names):
    return {path: leaf.shape for path, leaf in flatten_dict(component_shapes).items()
            if path[-1] == "kernel" and path[-2] in names}


def test_rank_r_adds_exactly_r_times_in_plus_out_per_adapted_kernel_and_only_they_are_optimized():
    config = lora_config()
    models = models_lib.build_models(config)
    base = models_lib.param_shapes(models, config)
    unet_kernels, text_kernels = _kernels(base["unet"], UNET_FLAX_NAMES), _kernels(base["text_encoder"], TEXT_FLAX_NAMES)
    # The tiny UNet has 4 transformer blocks (down 0, mid, up 1 x 2) with 2 attentions of 4 projections each;
    # the tiny CLIP 2 layers of 4 projections.
    assert len(unet_kernels) == 32 and len(text_kernels) == 8
    expected = sum(RANK * (fan_in + fan_out) for fan_in, fan_out in [*unet_kernels.values(), *text_kernels.values()])
    tx = optim.make_optimizer(config)
    state = jax.eval_shape(lambda p, k: step_lib.initial_state(p, k, config, tx, ema=False), base, jax.random.key(0))
    assert list(state.params) == ["lora"]
    assert lora_lib.num_params(state.params) == expected == 15104
    # AdamW's two moments of the adapters (and its step counters), nothing for the frozen base.
    assert lora_lib.num_params(state.opt_state) == 2 * expected + 2
    assert lora_lib.num_params(state.frozen) == lora_lib.num_params(base)
    assert state.lora_scale == ALPHA / RANK


@pytest.fixture(scope="module")
def trained():
    """The tiny models with LoRA, after two train steps: (config, models, state before, state after)."""
    config = lora_config()
    setup = training_setup.build(config)
    state = setup.create_state(jax.random.key(0))
    before = jax.device_get(state)
    dataset = data_lib.make_train_dataset(config, setup.models.tokenizer)
    for i in range(2):
        state, _ = setup.train_step(state, setup.global_batch(dataset[i]), jax.random.key(1))
    return config, setup.models, before, jax.device_get(state)


def _unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 4, 4), dtype=np.float32), np.array([10, 700], np.int32),
            rng.standard_normal((2, 77, 64), dtype=np.float32))


def test_at_init_the_adapted_model_computes_exactly_the_base_model(trained):
    config, models, before, _ = trained
    for path, value in flatten_dict(before.params).items():
        assert (not np.any(value)) == (path[-1] == "lora_B"), path  # B = 0, A random
    merged = step_lib.inference_params(before)
    base = before.frozen
    unet_kernels = _kernels(base["unet"], UNET_FLAX_NAMES)
    assert unet_kernels and all(path in flatten_dict(merged["unet"]) for path in unet_kernels)
    latents, timesteps, context = _unet_inputs()
    np.testing.assert_array_equal(models_lib.predict_noise(models, merged["unet"], latents, timesteps, context),
                                  models_lib.predict_noise(models, base["unet"], latents, timesteps, context))
    ids = np.asarray(models.tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids, np.int32)
    np.testing.assert_array_equal(models_lib.encode_text(models, merged["text_encoder"], ids),
                                  models_lib.encode_text(models, base["text_encoder"], ids))


def test_training_changes_the_adapters_only(trained):
    _, _, before, after = trained
    jax.tree.map(np.testing.assert_array_equal, after.frozen, before.frozen)
    flat_before, flat_after = flatten_dict(before.params), flatten_dict(after.params)
    assert flat_before.keys() == flat_after.keys()
    for key in flat_before:  # every A and every B moved (B from zero)
        assert not np.array_equal(flat_before[key], flat_after[key]), key


def test_bf16_frozen_storage_keeps_adapters_and_optimizer_state_float32():
    config = lora_config("bf16")
    models = models_lib.build_models(config)
    tx = optim.make_optimizer(config)
    state = jax.eval_shape(lambda p, k: step_lib.initial_state(p, k, config, tx, ema=False),
                           models_lib.param_shapes(models, config), jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))} <= {
        jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


@pytest.mark.parametrize("key,value,match", [
    ("lora.rank", -1, "lora.rank"),
    ("lora.unet_target_modules", ("to_q", "proj_in"), "lora.unet_target_modules"),
    ("lora.text_encoder_target_modules", ("to_q",), "lora.text_encoder_target_modules"),
    ("train.train_text_encoder", True, "train.train_text_encoder"),
])
def test_bad_lora_settings_are_config_errors_naming_the_key(key, value, match):
    config = lora_config()
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        validation.validate(config, jax.device_count())


# --- export -> PyTorch diffusers load_lora_weights -------------------------------------------------------

# Tolerance: fp32 on CPU, outputs of order 1; XLA and PyTorch accumulate in other orders (differences of
# ~1e-4 in test_export.py), and PEFT adds the adapters' output to the layer's rather than merging them.
ATOL = 1e-3


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained run's checkpoint, exported with `sdjax export`. The adapters are set to random values
    (two steps leave B ~ lr, which a wrong scale or transpose would hide under the tolerance), and the base
    weights perturbed from their init (zero biases, unit norms), through which the random UNet's attention
    barely reaches its output."""
    config, models, _, state = trained
    rng = np.random.default_rng(0)
    state = state.replace(
        params=jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), state.params),
        frozen=jax.tree.map(lambda x: x + (0.02 * rng.standard_normal(x.shape)).astype(np.float32), state.frozen))
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    checkpoints.save(2, state, jax.random.key(0))
    checkpoints.close()
    out = str(tmp_path_factory.mktemp("lora_export") / "out")
    assert cli.main(["sdjax", "export", "--workdir", workdir, "--out", out]) == 0
    return out, workdir, models, state


def test_export_writes_the_lora_file_and_the_random_base_pipeline(exported):
    out = exported[0]
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(out, "model_index.json"))  # the base: the run had no model.pretrained
    from safetensors import safe_open
    with safe_open(os.path.join(out, "pytorch_lora_weights.safetensors"), "np") as f:
        keys = list(f.keys())
        shape = f.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight").shape
    assert len(keys) == 2 * (32 + 8) and shape == (RANK, 64)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys


def test_pytorch_pipeline_with_load_lora_weights_matches_flax_with_adapters(exported):
    import torch
    from diffusers import StableDiffusionPipeline
    from pytorch_folder import with_text_model_prefix
    out, _, models, state = exported
    pipe = StableDiffusionPipeline.from_pretrained(out)
    latents, timesteps, context = _unet_inputs(1)
    ids = np.asarray(models.tokenizer(["a red circle on a blue background"], padding="max_length",
                                      max_length=77).input_ids, np.int32)

    def pytorch_outputs():
        with torch.no_grad():
            unet = pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps),
                             torch.from_numpy(context)).sample.numpy()
            text = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        return unet, text

    base_unet, base_text = pytorch_outputs()
    pipe.load_lora_weights(out)
    lora_unet, lora_text = pytorch_outputs()
    merged = step_lib.inference_params(state)
    ours_unet = np.asarray(models_lib.predict_noise(models, merged["unet"], latents, timesteps, context))
    ours_text = np.asarray(models_lib.encode_text(models, merged["text_encoder"], ids))
    # The adapters matter far beyond the tolerance, so matching means the adapters, their scale and layout.
    np.testing.assert_allclose(lora_unet, ours_unet, atol=ATOL)
    np.testing.assert_allclose(lora_text, ours_text, atol=ATOL)
    # The adapters change the outputs beyond the tolerance. (Only a little for the UNet: with 4x4 latents
    # its attention is near-uniform, position-independent, and the GroupNorms after it remove most of that.)
    assert np.abs(lora_unet - base_unet).max() > 5 * ATOL and np.abs(lora_text - base_text).max() > 50 * ATOL
    # So, exactly: the weights diffusers fuses (W + alpha / r * B @ A) are our merged kernels.
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    for name, library in (("unet", "diffusers"), ("text_encoder", "transformers")):
        ours = pytorch_export.flax_to_pytorch_state(flatten_dict(merged[name]), library, name)
        theirs = getattr(pipe, name).state_dict()
        theirs = with_text_model_prefix(theirs) if library == "transformers" else theirs
        assert ours.keys() == {k for k in theirs if not k.endswith("position_ids")}
        for key, value in ours.items():
            np.testing.assert_allclose(theirs[key].numpy(), value, rtol=0, atol=1e-5, err_msg=key)


def test_merged_export_and_sampling_params_equal_the_merged_adapters(exported, tmp_path):
    out, workdir, _, state = exported
    merged_out = str(tmp_path / "merged")
    assert cli.main(["sdjax", "export", "--workdir", workdir, "--out", merged_out, "--merge-lora",
                     "--format=flax"]) == 0
    assert not os.path.exists(os.path.join(merged_out, "pytorch_lora_weights.safetensors"))
    config, params, _ = checkpoint_lib.load_params_for_inference(workdir)
    expected = step_lib.inference_params(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params, expected)
    config.model.pretrained = merged_out
    loaded = models_lib.load_pretrained_params(models_lib.build_models(config), config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), loaded, expected)


@pytest.mark.parametrize("name", ["demo_lora", "sd15_lora"])
def test_lora_configs_validate(name, tmp_path):
    from tiny import load_config_file
    config = load_config_file(name)
    if name == "sd15_lora":
        config.data.path = str(tmp_path)  # an image folder (data.source auto -> imagefolder)
    validation.validate(config, 8)
    assert lora_lib.enabled(config)
