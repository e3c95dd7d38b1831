"""The sampling schedulers of sdjax/models/schedulers.py: their timesteps and whole denoising loops against
diffusers' PyTorch schedulers (configured from Stable Diffusion's scheduler_config.json). (Against the
diffusers-Flax-based schedulers sdjax sampled with before, when both existed: DDIM, PNDM, LMS, Euler and DDPM
within 7.3e-7 relative over 10-step loops; DPM-Solver++ the same but for its last step, which now ends at
sigma 0 as PyTorch's does.)"""

import ast

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.config import SCHEDULERS, base_config
from sdjax.models import noise as noise_lib
from sdjax.models import schedulers as schedulers_lib

# stable-diffusion-v1-5's scheduler/scheduler_config.json; a pipeline loads it into whichever scheduler it samples
# with (`DDIMScheduler.from_config(pipe.scheduler.config)`), each class taking the keys it knows.
SD_SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                       "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
TORCH_SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
                    "lms": diffusers.LMSDiscreteScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
                    "euler": diffusers.EulerDiscreteScheduler, "ddpm": diffusers.DDPMScheduler}
# sdjax's DDPM keeps the offset it always had (schedulers.STEPS_OFFSET).
TORCH_OVERRIDES = {"ddpm": {"steps_offset": 0}}
DETERMINISTIC = ("ddim", "pndm", "lms", "dpm", "euler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SHAPE = (2, 4, 8, 8)
# Of a whole loop's result, relative to its largest value; measured: at most 5.1e-7 (float32 on both sides).
RELATIVE_TOLERANCE = 1e-5


def diffusion_config(prediction_type: str = "epsilon"):
    config = base_config()  # Stable Diffusion's noise schedule
    config.diffusion.prediction_type = prediction_type
    return config


def torch_scheduler(name: str, prediction_type: str, num_steps: int):
    reference = TORCH_SCHEDULERS[name].from_config(
        {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type, **TORCH_OVERRIDES.get(name, {})})
    reference.set_timesteps(num_steps)
    return reference


def fake_model(x, t):
    """A deterministic stand-in for the UNet that depends on both the sample and the timestep."""
    return 0.3 * x + 0.001 * t


def initial_noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def run_loop(make_scheduler, name: str, config, num_steps: int, x_T: np.ndarray, image_keys=None,
             stop: int | None = None) -> np.ndarray:
    """sdjax/sample.py's loop with `fake_model` for the UNet, the scheduler built inside the compiled function as
    the sampler builds it; the first `stop` steps only when given."""

    @jax.jit
    def denoise(x_T, image_keys):
        schedule = make_scheduler(name, config, num_steps, x_T.shape)
        state = schedule.init_state()

        def body(i, carry):
            x, state = carry
            prediction = fake_model(schedule.scale_model_input(state, x, i), schedule.timestep(state, i))
            return schedule.step(state, prediction, i, x, image_keys)

        steps = schedule.num_loop_steps(state) if stop is None else stop
        return jax.lax.fori_loop(0, steps, body, (x_T * schedule.init_noise_sigma(state), state))[0]

    return np.asarray(denoise(jnp.asarray(x_T), image_keys))


def torch_loop(reference, x_T: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(x_T) * reference.init_noise_sigma
    for t in reference.timesteps:
        x = reference.step(fake_model(reference.scale_model_input(x, t), t.float()), t, x).prev_sample
    return x.numpy()


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def loop_timesteps(schedule) -> np.ndarray:
    state = schedule.init_state()
    return np.array([schedule.timestep(state, i) for i in range(schedule.num_loop_steps(state))])


# --- against PyTorch diffusers ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [2, 10, 25, 30, 50])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_are_pytorchs(name, num_steps):
    """30 steps do not divide 1000: the "leading" schedulers step by 33 from 958 (DDIM, PNDM) or 957 (DDPM)."""
    schedule = schedulers_lib.make_sampling_scheduler(name, diffusion_config(), num_steps, SHAPE)
    reference = torch_scheduler(name, "epsilon", num_steps)
    timesteps = loop_timesteps(schedule)
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
    # The UNet gets float timesteps from Euler and LMS, as in PyTorch, and integers from the others.
    assert timesteps.dtype == (np.float32 if name in ("euler", "lms") else np.int32)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_initial_noise_scale_and_loop_length_are_pytorchs(name):
    schedule = schedulers_lib.make_sampling_scheduler(name, diffusion_config(), 25, SHAPE)
    reference = torch_scheduler(name, "epsilon", 25)
    state = schedule.init_state()
    assert schedule.num_loop_steps(state) == len(reference.timesteps)  # 26 for PNDM
    np.testing.assert_allclose(schedule.init_noise_sigma(state), float(reference.init_noise_sigma), rtol=1e-7)


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_denoising_loop_matches_pytorch(name, prediction_type, num_steps):
    x_T = initial_noise()
    ours = run_loop(schedulers_lib.make_sampling_scheduler, name, diffusion_config(prediction_type), num_steps, x_T)
    expected = torch_loop(torch_scheduler(name, prediction_type, num_steps), x_T)
    assert relative_difference(ours, expected) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_loop_matches_pytorch_given_its_noise(prediction_type, num_steps):
    """Strided ancestral DDPM: our posterior mean and std, with the noise PyTorch draws at each step."""
    x_T = initial_noise()
    reference = torch_scheduler("ddpm", prediction_type, num_steps)
    x = torch.from_numpy(x_T)
    torch_noise = []
    for i, t in enumerate(reference.timesteps):
        x = reference.step(fake_model(x, t.float()), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch_noise.append(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy())
    schedule = schedulers_lib.make_sampling_scheduler("ddpm", diffusion_config(prediction_type), num_steps, SHAPE)

    @jax.jit
    def denoise(x_T, noise):
        def body(i, x):
            mean, std = schedule.posterior((), fake_model(x, schedule.timestep((), i)), i, x)
            return mean + std * noise[i]

        return jax.lax.fori_loop(0, num_steps, body, x_T)

    ours = np.asarray(denoise(jnp.asarray(x_T), jnp.asarray(np.stack(torch_noise))))
    assert relative_difference(ours, x.numpy()) <= RELATIVE_TOLERANCE


def test_lms_coefficients_are_pytorchs_integrals():
    schedule = schedulers_lib.make_sampling_scheduler("lms", diffusion_config(), 10, SHAPE)
    reference = torch_scheduler("lms", "epsilon", 10)
    # torch's float32 sqrt is not always correctly rounded: the sigmas are 1 float32 ulp apart at some steps.
    np.testing.assert_array_max_ulp(schedule.sigmas, reference.sigmas.numpy(), maxulp=1)
    expected = np.zeros((10, schedulers_lib.LMS_ORDER))
    for i in range(10):
        order = min(i + 1, schedulers_lib.LMS_ORDER)
        expected[i, :order] = [reference.get_lms_coefficient(order, i, k) for k in range(order)]
    # PyTorch evaluates the polynomial in float32 inside scipy's quad; ours is integrated exactly.
    np.testing.assert_allclose(schedule.coefficients, expected, rtol=1e-6, atol=1e-7)


# --- DDPM's noise -----------------------------------------------------------------------------------------


def test_ddpm_step_adds_std_times_noise_drawn_per_image_from_its_key():
    """Image j's noise at step i is normal(fold_in(image_keys[j], i)): it depends on no other image."""
    schedule = schedulers_lib.make_sampling_scheduler("ddpm", diffusion_config(), 10, SHAPE)
    x = jnp.asarray(initial_noise())
    prediction = fake_model(x, 901.0)
    image_keys = jax.random.split(jax.random.key(0), SHAPE[0])
    prev, _ = schedule.step((), prediction, 3, x, image_keys)
    mean, std = schedule.posterior((), prediction, 3, x)
    noise = jax.random.normal(jax.random.fold_in(image_keys[1], 3), SHAPE[1:])
    np.testing.assert_allclose(prev[1], mean[1] + std * noise, rtol=1e-6, atol=1e-6)
    alone, _ = schedule.step((), prediction[1:], 3, x[1:], image_keys[1:])
    np.testing.assert_array_equal(alone[0], prev[1])


def test_ddpm_adds_no_noise_into_timestep_0():
    schedule = schedulers_lib.make_sampling_scheduler("ddpm", diffusion_config(), 10, SHAPE)
    x = jnp.asarray(initial_noise())
    _, std = schedule.posterior((), fake_model(x, 0.0), 9, x)
    assert int(schedule.timestep((), 9)) == 0 and float(std) == 0.0


# --- against sdjax's diffusers-Flax-based schedulers ------------------------------------------------------


# --- arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, num_steps, message", [
    ("heun", 10, "unknown scheduler"),
    ("ddim", 0, "at least 1"),
    ("pndm", 1, "at least 2"),
    ("euler", 1001, "more than the 1000 training timesteps"),
])
def test_bad_arguments_are_refused(name, num_steps, message):
    with pytest.raises(ValueError, match=message):
        schedulers_lib.make_sampling_scheduler(name, diffusion_config(), num_steps, SHAPE)


# --- dependencies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [schedulers_lib, noise_lib])
def test_the_schedulers_import_nothing_from_diffusers_or_transformers(module):
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [name for name in imported if name.split(".")[0] in ("diffusers", "transformers")]
