"""The sampling schedulers (DDIM, PNDM, LMS, DPM-Solver++, Euler, DDPM), driven by a step index inside one traced
denoising loop.

`make_sampling_scheduler(name, config, num_inference_steps, latent_shape)` returns an object whose methods take
the loop index `i` (0 = noisiest) and are pure and traceable, so the whole loop is one `fori_loop`:

    state = s.init_state()                              # traceable: built inside the compiled sampler
    latents = noise * s.init_noise_sigma(state)
    for i in range(s.num_loop_steps(state)):
        t = s.timestep(state, i)                        # what the UNet is conditioned on
        eps = unet(s.scale_model_input(state, latents, i), t)
        latents, state = s.step(state, eps, i, latents, image_keys)

Each is diffusers' PyTorch scheduler (the reference the tests compare with) configured as Stable Diffusion's
scheduler_config.json configures it: "leading" timesteps (every (1000 // steps)-th, offset 1; DDPM's offset 0, see
STEPS_OFFSET) for DDIM, PNDM and DDPM, "linspace" ones for Euler, LMS and DPM-Solver++. What a PyTorch scheduler works out step by step from its timesteps (which
alphas, which sigmas, which multistep coefficients) depends on the step index alone, so it is computed here once,
on the host, into per-step tables; the traced step reads row `i` of them and does the array arithmetic as PyTorch
writes it. The state carries only what depends on the samples: the multistep schedulers' history.

Where this differs from diffusers' Flax schedulers (which sdjax used before):
- ddpm: steps from each inference timestep to the next one (Flax assumed t - 1), with the "fixed_small" variance
  and its noise drawn per image from `fold_in(image_key, i)`.
- lms: the coefficients are integrated exactly (they are polynomials), not with scipy on traced values.
- euler, lms: the UNet gets the float timesteps, as in PyTorch.
- dpm: ends at sigma 0 (PyTorch's default `final_sigmas_type="zero"`, what diffusers' SD pipelines sample with),
  with a first-order last step; the Flax scheduler ended at the noise level of timestep 0 ("sigma_min").
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax.config import PREDICTION_TYPES, SCHEDULERS
import sdjax.models.noise as noise_lib

LMS_ORDER = 4  # diffusers' default order for LMS
PLMS_ORDER = 4  # PNDM's linear multistep keeps the last 4 noise predictions
# The "leading" timesteps' offset: Stable Diffusion's scheduler config sets steps_offset=1 (DDIM, PNDM); DDPM
# keeps 0, as sdjax's DDPM always had it (diffusers' Flax DDPM had no offset, PyTorch's defaults to 0).
STEPS_OFFSET = {"ddim": 1, "pndm": 1, "ddpm": 0}
# Adams-Bashforth weights of the last 1..4 noise predictions, newest first (PyTorch PNDMScheduler.step_plms).
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


# --- timesteps and sigmas, as PyTorch's set_timesteps computes them ---------------------------------------


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> np.ndarray:
    """Every (num_train_timesteps // num_inference_steps)-th timestep from 0, plus the offset, noisiest first."""
    step_ratio = num_train_timesteps // num_inference_steps
    return (np.arange(num_inference_steps) * step_ratio)[::-1] + steps_offset


def sigmas_of(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at `timesteps` (float ones interpolated linearly), then 0 for
    the end of the loop: the noise level of the samples x / sqrt(alpha_bar) that Euler, LMS and DPM-Solver step."""
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    at_timesteps = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
    return np.concatenate([at_timesteps, [0.0]]).astype(np.float32)


def _row(table: np.ndarray, i) -> jax.Array:
    """Row `i` (traced) of a host table."""
    return jnp.asarray(table)[i]


def _predicted_x0_and_noise(prediction_type: str, model_output, sample, alpha_bar):
    """(x_0, epsilon) from the model's output at a timestep of signal alpha_bar, with x_t = `sample`."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar**0.5, model_output
    return (alpha_bar**0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output,
            alpha_bar**0.5 * model_output + (1 - alpha_bar) ** 0.5 * sample)


def _predicted_x0_at_sigma(prediction_type: str, model_output, sample, sigma):
    """x_0 from the model's output, for a sample x_t / sqrt(alpha_bar) at noise level `sigma` (Euler, LMS)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


# --- the schedulers ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: its numpy tables are not compared, it hashes by identity
class SamplingScheduler:
    """A sampler's per-step tables (host numpy) and its traced step; see the module docstring."""

    prediction_type: str
    latent_shape: tuple[int, ...]
    timesteps: np.ndarray  # [num_loop_steps]: what the UNet is conditioned on at each step

    def init_state(self):
        return ()

    def num_loop_steps(self, state) -> int:
        """Static: PNDM (PLMS) takes one step more than asked for, its second timestep repeated."""
        return len(self.timesteps)

    def init_noise_sigma(self, state) -> jax.Array:
        return jnp.float32(1.0)

    def timestep(self, state, i) -> jax.Array:
        return _row(self.timesteps, i)

    def scale_model_input(self, state, sample, i) -> jax.Array:
        return sample

    def step(self, state, model_output, i, sample, image_keys):
        """(previous sample, new state); `image_keys` [B] are only drawn from by stochastic schedulers."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class DDIM(SamplingScheduler):
    """Deterministic DDIM (eta 0): PyTorch DDIMScheduler.step with clip_sample=False, set_alpha_to_one=False."""

    alpha_bar: np.ndarray  # [steps] at each timestep
    alpha_bar_prev: np.ndarray  # [steps] at the next (less noisy) timestep; past the last, timestep 0's

    def step(self, state, model_output, i, sample, image_keys):
        alpha_bar_prev = _row(self.alpha_bar_prev, i)
        x0, noise = _predicted_x0_and_noise(self.prediction_type, model_output, sample, _row(self.alpha_bar, i))
        return alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * noise, state


@dataclasses.dataclass(frozen=True, eq=False)
class DDPM(SamplingScheduler):
    """Ancestral DDPM over the inference timesteps: PyTorch DDPMScheduler.step ("fixed_small" variance)."""

    alpha_bar: np.ndarray  # [steps] at each timestep
    alpha_bar_prev: np.ndarray  # [steps] at the next inference timestep; 1 past the last

    def posterior(self, state, model_output, i, sample) -> tuple[jax.Array, jax.Array]:
        """Mean and standard deviation of x_prev given x_t = `sample` and the model's prediction."""
        alpha_bar, alpha_bar_prev = _row(self.alpha_bar, i), _row(self.alpha_bar_prev, i)
        current_alpha = alpha_bar / alpha_bar_prev
        current_beta = 1 - current_alpha
        x0, _ = _predicted_x0_and_noise(self.prediction_type, model_output, sample, alpha_bar)
        mean = ((alpha_bar_prev**0.5 * current_beta) / (1 - alpha_bar) * x0
                + current_alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar) * sample)
        variance = jnp.maximum((1 - alpha_bar_prev) / (1 - alpha_bar) * current_beta, 1e-20)
        return mean, jnp.where(self.timestep(state, i) > 0, variance**0.5, 0.0)  # no noise into timestep 0

    def step(self, state, model_output, i, sample, image_keys):
        mean, std = self.posterior(state, model_output, i, sample)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, i)
        # Per-image noise: an image does not depend on the others in the batch, nor on how it is sharded.
        noise = jax.vmap(lambda key: jax.random.normal(key, sample.shape[1:], sample.dtype))(step_keys)
        return mean + std * noise, state


class PLMSState(NamedTuple):
    noise_history: jax.Array  # [PLMS_ORDER, *latent_shape]: the last noise predictions, newest first
    first_sample: jax.Array  # the sample of step 0, which step 1 steps from again


@dataclasses.dataclass(frozen=True, eq=False)
class PNDM(SamplingScheduler):
    """PNDM without its Runge-Kutta warmup (skip_prk_steps=True): PyTorch PNDMScheduler.step_plms.

    Step 0 goes from t_0 to t_1 with the noise predicted at t_0; step 1 predicts at t_1 and goes from t_0 to t_1
    again with the mean of both predictions (so t_1 is the UNet's timestep twice); then each step combines the
    last 2, 3, 4 predictions with Adams-Bashforth weights."""

    alpha_bar: np.ndarray  # [steps + 1] at the timestep stepped from (t_0 again at step 1)
    alpha_bar_prev: np.ndarray  # [steps + 1] at the timestep stepped to; past the last, timestep 0's
    weights: np.ndarray  # [steps + 1, PLMS_ORDER]: of the noise history, newest first (unused at step 1)

    def init_state(self):
        zeros = jnp.zeros(self.latent_shape, jnp.float32)
        return PLMSState(jnp.zeros((PLMS_ORDER,) + tuple(self.latent_shape), jnp.float32), zeros)

    def step(self, state, model_output, i, sample, image_keys):
        pushed = jnp.concatenate([model_output[None], state.noise_history[:-1]])
        history = jnp.where(i == 1, state.noise_history, pushed)  # step 1 replaces step 0's prediction
        noise = jnp.where(i == 1, (model_output + state.noise_history[0]) / 2,
                          jnp.tensordot(_row(self.weights, i), history, axes=1))
        first_sample = jnp.where(i == 0, sample, state.first_sample)
        sample = jnp.where(i == 1, state.first_sample, sample)
        alpha_bar, alpha_bar_prev = _row(self.alpha_bar, i), _row(self.alpha_bar_prev, i)
        if self.prediction_type == "v_prediction":
            _, noise = _predicted_x0_and_noise(self.prediction_type, noise, sample, alpha_bar)
        # PNDM's transfer from x_t to x_prev given the noise (Liu et al. 2022, eq. 11), as PyTorch writes it.
        denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
        prev_sample = (alpha_bar_prev / alpha_bar) ** 0.5 * sample - (alpha_bar_prev - alpha_bar) * noise / denominator
        return prev_sample, PLMSState(history, first_sample)


@dataclasses.dataclass(frozen=True, eq=False)
class Euler(SamplingScheduler):
    """Euler's method on the probability-flow ODE in sigma: PyTorch EulerDiscreteScheduler.step (s_churn 0)."""

    sigmas: np.ndarray  # [steps + 1], the last 0

    def init_noise_sigma(self, state):
        return jnp.float32(self.sigmas.max())

    def scale_model_input(self, state, sample, i):
        return sample / (_row(self.sigmas, i) ** 2 + 1) ** 0.5

    def derivative(self, model_output, i, sample) -> jax.Array:
        """d sample / d sigma at step i."""
        sigma = _row(self.sigmas, i)
        return (sample - _predicted_x0_at_sigma(self.prediction_type, model_output, sample, sigma)) / sigma

    def step(self, state, model_output, i, sample, image_keys):
        dt = _row(self.sigmas, i + 1) - _row(self.sigmas, i)
        return sample + self.derivative(model_output, i, sample) * dt, state


@dataclasses.dataclass(frozen=True, eq=False)
class LMS(Euler):
    """Linear multistep in sigma over the last LMS_ORDER derivatives: PyTorch LMSDiscreteScheduler.step."""

    coefficients: np.ndarray  # [steps, LMS_ORDER]: weight of the derivative k steps back

    def init_state(self):
        return jnp.zeros((LMS_ORDER,) + tuple(self.latent_shape), jnp.float32)

    def step(self, state, model_output, i, sample, image_keys):
        history = jnp.concatenate([self.derivative(model_output, i, sample)[None], state[:-1]])  # newest first
        return sample + jnp.tensordot(_row(self.coefficients, i), history, axes=1), history


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolver(SamplingScheduler):
    """DPM-Solver++(2M): PyTorch DPMSolverMultistepScheduler.step (solver_order 2, "midpoint", lower_order_final).

    With lambda = -log sigma, from x_s (VP, at alpha_s, sigma_s) to x_t, the data predictions D_0 (this step)
    and D_1 (the last): x_t = sigma_t / sigma_s x_s + alpha_t (1 - e^-h) (D_0 + (D_0 - D_1) / (2 r)), with
    h = lambda_t - lambda_s and r = h_last / h; first order (no D_1 term) at the first and last step."""

    alpha: np.ndarray  # [steps]: alpha_s, sigma_s of the sample stepped from
    sigma: np.ndarray
    sample_weight: np.ndarray  # [steps]: sigma_t / sigma_s
    prediction_weight: np.ndarray  # [steps]: alpha_t (1 - e^-h)
    difference_weight: np.ndarray  # [steps]: alpha_t (1 - e^-h) / (2 r), 0 at first-order steps

    def init_state(self):
        return jnp.zeros(self.latent_shape, jnp.float32)  # the last step's data prediction

    def step(self, state, model_output, i, sample, image_keys):
        alpha, sigma = _row(self.alpha, i), _row(self.sigma, i)
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        else:
            x0 = alpha * sample - sigma * model_output
        prev_sample = (_row(self.sample_weight, i) * sample + _row(self.prediction_weight, i) * x0
                       + _row(self.difference_weight, i) * (x0 - state))
        return prev_sample, x0


# --- building them ----------------------------------------------------------------------------------------


def _ddim(alphas_cumprod, num_steps, prediction_type, latent_shape) -> DDIM:
    timesteps = leading_timesteps(len(alphas_cumprod), num_steps, STEPS_OFFSET["ddim"])
    prev = timesteps - len(alphas_cumprod) // num_steps
    alpha_bar_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], alphas_cumprod[0])
    return DDIM(prediction_type, latent_shape, timesteps.astype(np.int32), alphas_cumprod[timesteps], alpha_bar_prev)


def _ddpm(alphas_cumprod, num_steps, prediction_type, latent_shape) -> DDPM:
    timesteps = leading_timesteps(len(alphas_cumprod), num_steps, STEPS_OFFSET["ddpm"])
    alpha_bar_prev = np.append(alphas_cumprod[timesteps[1:]], np.float32(1.0))
    return DDPM(prediction_type, latent_shape, timesteps.astype(np.int32), alphas_cumprod[timesteps], alpha_bar_prev)


def _pndm(alphas_cumprod, num_steps, prediction_type, latent_shape) -> PNDM:
    step_ratio = len(alphas_cumprod) // num_steps
    t = leading_timesteps(len(alphas_cumprod), num_steps, STEPS_OFFSET["pndm"])
    timesteps = np.concatenate([t[:1], t[1:2], t[1:]])  # PyTorch's plms_timesteps: the second one twice
    stepped_from = np.where(np.arange(len(timesteps)) == 1, timesteps + step_ratio, timesteps)
    stepped_to = stepped_from - step_ratio
    alpha_bar_prev = np.where(stepped_to >= 0, alphas_cumprod[np.maximum(stepped_to, 0)], alphas_cumprod[0])
    weights = np.zeros((len(timesteps), PLMS_ORDER), np.float32)
    for i in range(len(timesteps)):
        known = ADAMS_BASHFORTH[min(max(i, 1), PLMS_ORDER) - 1]  # step 1 adds no prediction to the history
        weights[i, :len(known)] = known
    return PNDM(prediction_type, latent_shape, timesteps.astype(np.int32), alphas_cumprod[stepped_from],
                alpha_bar_prev, weights)


def _linspace_float_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """Euler's and LMS's timesteps: num_steps evenly spaced floats from the last training timestep to 0."""
    return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()


def _euler(alphas_cumprod, num_steps, prediction_type, latent_shape) -> Euler:
    timesteps = _linspace_float_timesteps(len(alphas_cumprod), num_steps)
    return Euler(prediction_type, latent_shape, timesteps, sigmas_of(alphas_cumprod, timesteps))


def lms_coefficients(sigmas: np.ndarray, num_steps: int) -> np.ndarray:
    """[num_steps, LMS_ORDER]: coefficient k of step i integrates, from sigmas[i] to sigmas[i + 1], the Lagrange
    polynomial through the last min(i + 1, LMS_ORDER) sigmas that is 1 at sigmas[i - k] and 0 at the others.
    PyTorch integrates it with scipy's quad; being a polynomial, it is integrated exactly here."""
    sigmas = sigmas.astype(np.float64)
    table = np.zeros((num_steps, LMS_ORDER))
    for i in range(num_steps):
        order = min(i + 1, LMS_ORDER)
        for k in range(order):
            basis = np.polynomial.Polynomial([1.0])
            for j in range(order):
                if j != k:
                    basis *= np.polynomial.Polynomial([-sigmas[i - j], 1.0]) / (sigmas[i - k] - sigmas[i - j])
            integral = basis.integ()
            table[i, k] = integral(sigmas[i + 1]) - integral(sigmas[i])
    return table.astype(np.float32)


def _lms(alphas_cumprod, num_steps, prediction_type, latent_shape) -> LMS:
    timesteps = _linspace_float_timesteps(len(alphas_cumprod), num_steps)
    sigmas = sigmas_of(alphas_cumprod, timesteps)
    return LMS(prediction_type, latent_shape, timesteps, sigmas, lms_coefficients(sigmas, num_steps))


def _dpm(alphas_cumprod, num_steps, prediction_type, latent_shape) -> DPMSolver:
    num_train_timesteps = len(alphas_cumprod)
    timesteps = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    sigmas = sigmas_of(alphas_cumprod, timesteps).astype(np.float64)
    alphas = 1 / (sigmas**2 + 1) ** 0.5  # VP: x_t = alpha x_0 + sigma_vp noise, sigma_vp = sigma * alpha
    sigmas_vp = sigmas * alphas
    step, last = np.arange(num_steps), num_steps - 1
    prediction_weight = alphas[1:] * (1 - sigmas[1:] / sigmas[:-1])  # alpha_t (1 - e^-h), e^-h = sigma_t / sigma_s
    second_order = (step >= 1) & (step < last)  # lower_order_final: always, as the last sigma is 0
    with np.errstate(divide="ignore"):  # log(0) at the end, where the step is first order anyway
        lambdas = -np.log(sigmas)
    h = lambdas[1:] - lambdas[:-1]
    h_last = np.append(np.nan, h[:-1])
    r = np.divide(h_last, h, out=np.ones(num_steps), where=second_order)
    difference_weight = np.where(second_order, prediction_weight / (2 * r), 0.0)
    tables = (alphas[:-1], sigmas_vp[:-1], sigmas_vp[1:] / sigmas_vp[:-1], prediction_weight, difference_weight)
    return DPMSolver(prediction_type, latent_shape, timesteps.astype(np.int32),
                     *(table.astype(np.float32) for table in tables))


_BUILDERS = {"ddim": _ddim, "pndm": _pndm, "lms": _lms, "dpm": _dpm, "euler": _euler, "ddpm": _ddpm}


def make_sampling_scheduler(name: str, config: ml_collections.ConfigDict, num_inference_steps: int,
                            latent_shape: tuple[int, ...]) -> SamplingScheduler:
    """`name` in SCHEDULERS, for the noise schedule of `config.diffusion` and latents of `latent_shape`."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {list(SCHEDULERS)}")
    d = config.diffusion
    if d.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusion.prediction_type={d.prediction_type!r}: expected one of {list(PREDICTION_TYPES)}")
    if num_inference_steps < 1 or (name == "pndm" and num_inference_steps < 2):
        raise ValueError(f"{name} needs at least {2 if name == 'pndm' else 1} inference steps, "
                         f"got {num_inference_steps}")
    if num_inference_steps > d.num_train_timesteps:
        raise ValueError(f"{num_inference_steps} inference steps is more than the "
                         f"{d.num_train_timesteps} training timesteps")
    return _BUILDERS[name](noise_lib.alphas_cumprod(d), num_inference_steps, d.prediction_type,
                           tuple(latent_shape))
