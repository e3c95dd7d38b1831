"""Loss options: Min-SNR-gamma weights, noise offset, input perturbation, the prediction type of a pretrained
folder and its override, and the text encoder's own learning rate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdjax import optim
from sdjax import step as step_lib
from sdjax.models import noise as noise_lib

TIMESTEPS = np.array([0, 10, 100, 300, 500, 999])


def _snr_from_betas(config) -> np.ndarray:
    """SD's scaled-linear schedule in float64, independently of diffusers."""
    d = config.diffusion
    betas = np.linspace(d.beta_start**0.5, d.beta_end**0.5, d.num_train_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return alphas_cumprod / (1.0 - alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula(tiny_config, prediction_type):
    gamma = 5.0
    tiny_config.diffusion.prediction_type = prediction_type
    state = noise_lib.make_noise_schedule(tiny_config)
    snr = _snr_from_betas(tiny_config)[TIMESTEPS]
    expected = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)
    weights = np.asarray(noise_lib.min_snr_weights(state, jnp.asarray(TIMESTEPS), gamma, prediction_type))
    np.testing.assert_allclose(weights, expected, rtol=1e-4)
    assert weights[0] < 0.01  # the nearly noise-free timesteps are weighted down ...
    if prediction_type == "epsilon":
        np.testing.assert_allclose(weights[-3:], 1.0)  # ... and where SNR < gamma epsilon keeps its weight


def test_the_step_weights_each_example_by_min_snr_at_its_timestep(tiny_config):
    """The per-example losses with snr_gamma are those without, times the weight at the drawn timestep."""
    from sdjax import data as data_lib
    from sdjax import models as models_lib
    models = models_lib.build_models(tiny_config)
    params = models_lib.init_params(models, tiny_config, jax.random.key(0))
    batch = data_lib.make_train_dataset(tiny_config, models.tokenizer)[0]
    rngs = jax.random.split(jax.random.key(3), tiny_config.train.batch_size)
    plain = jax.jit(step_lib.make_example_losses(models, tiny_config))(params, batch, rngs)
    tiny_config.loss.snr_gamma = 2.0
    weighted = jax.jit(step_lib.make_example_losses(models, tiny_config))(params, batch, rngs)
    # The step draws example i's timestep from the third of the three keys split from rngs[i].
    timesteps = jax.vmap(lambda k: jax.random.randint(jax.random.split(k, 3)[2], (), 0, 1000))(rngs)
    state = noise_lib.make_noise_schedule(tiny_config)
    expected = np.asarray(plain) * np.asarray(noise_lib.min_snr_weights(state, timesteps, 2.0, "epsilon"))
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)
    assert not np.allclose(weighted, plain)


def test_noise_offset_adds_offset_times_a_normal_to_each_channel_mean():
    shape, offset, count = (4, 8, 8), 0.1, 4096
    keys = jax.random.split(jax.random.key(0), count)
    plain = jax.vmap(lambda k: noise_lib.training_noise(k, shape, 0.0))(keys)
    offset_noise = jax.vmap(lambda k: noise_lib.training_noise(k, shape, offset))(keys)
    np.testing.assert_array_equal(plain, jax.vmap(lambda k: jax.random.normal(k, shape))(keys))
    shift = np.asarray(offset_noise - plain)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[..., :1, :1], shift.shape), atol=1e-6)  # per channel
    channel_shifts = shift[:, :, 0, 0].ravel()  # 16384 draws of offset * N(0, 1)
    assert abs(channel_shifts.mean()) < 4 * offset / len(channel_shifts) ** 0.5
    np.testing.assert_allclose(channel_shifts.std(), offset, rtol=0.03)
    # So each example's channel mean varies by offset^2 more than white noise's 1 / (H W).
    channel_means = np.asarray(offset_noise).mean(axis=(2, 3)).ravel()
    np.testing.assert_allclose(channel_means.var(), 1 / 64 + offset**2, rtol=0.05)


def test_input_perturbation_noises_the_input_more_but_not_the_target():
    keys = jax.random.split(jax.random.key(1), 1024)
    noise = jax.vmap(lambda k: noise_lib.training_noise(k, (4, 8, 8), 0.0))(keys)
    perturbed = jax.vmap(lambda k, n: noise_lib.perturbed_noise(k, n, 0.1))(keys, noise)
    np.testing.assert_allclose(np.std(np.asarray(perturbed - noise)), 0.1, rtol=0.03)
    np.testing.assert_array_equal(jax.vmap(lambda k, n: noise_lib.perturbed_noise(k, n, 0.0))(keys, noise), noise)


@pytest.mark.parametrize("override,expected", [("", "v_prediction"), ("epsilon", "epsilon")])
def test_prediction_type_comes_from_the_pretrained_scheduler_unless_overridden(tiny_config, tmp_path, override,
                                                                               expected):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}))
    tiny_config.model.pretrained = str(tmp_path)
    tiny_config.diffusion.prediction_type_override = override
    noise_lib.resolve_noise_schedule(tiny_config)
    assert tiny_config.diffusion.prediction_type == expected


def test_text_encoder_is_trained_with_its_own_learning_rate(tiny_config):
    from sdjax import models as models_lib
    tiny_config.train.train_text_encoder = True
    tiny_config.optimizer.update(learning_rate=1e-3, text_encoder_learning_rate=1e-5, warmup_steps=0,
                                 weight_decay=0.0, grad_clip_norm=0.0)
    tx = optim.make_optimizer(tiny_config)
    shapes = jax.eval_shape(lambda p, k: step_lib.initial_state(p, k, tiny_config, tx, ema=False),
                            models_lib.param_shapes(models_lib.build_models(tiny_config), tiny_config),
                            jax.random.key(0))
    assert sorted(shapes.params) == ["text_encoder", "unet"] and list(shapes.frozen) == ["vae"]
    params = {"unet": {"w": jnp.ones(3)}, "text_encoder": {"w": jnp.ones(3)}}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    # Adam's first step moves every parameter by its learning rate.
    np.testing.assert_allclose(updates["unet"]["w"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["text_encoder"]["w"], -1e-5, rtol=1e-4)
    assert isinstance(tx, optax.GradientTransformation)
