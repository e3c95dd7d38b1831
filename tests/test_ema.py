"""EMA of the UNet params: the warmup formula, the update in the train step, sharding, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import checkpoint as checkpoint_lib
from sdjax import data as data_lib
from sdjax import ema as ema_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import step as step_lib
from sdjax import training_setup

MAX_DECAY = 0.99


def test_decay_warms_up_as_diffusers_ema_model_then_caps():
    steps = np.arange(0, 2000)
    expected = np.minimum(MAX_DECAY, (1 + steps) / (10 + steps))
    np.testing.assert_allclose(jax.vmap(lambda s: ema_lib.decay_at(s, MAX_DECAY))(steps), expected, rtol=1e-6)
    assert float(ema_lib.decay_at(0, MAX_DECAY)) == pytest.approx(0.1)


def test_ema_of_constant_params_approaches_them_as_the_formula_says():
    """ema_n - p = prod_t decay_t * (ema_0 - p) for constant params p."""
    p = {"w": jnp.full((3, 2), 3.0), "b": jnp.array([-1.0, 2.0])}
    ema = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    distance_factor = 1.0
    for n in range(300):
        decay = ema_lib.decay_at(n, MAX_DECAY)
        ema = ema_lib.update(ema, p, decay)
        distance_factor *= float(decay)
        if n in (0, 9, 299):
            for key in p:
                np.testing.assert_allclose(ema[key] - p[key], distance_factor * (0 - p[key]), rtol=1e-4, atol=1e-6)
    assert distance_factor < 1e-3  # and so it has nearly reached p
    np.testing.assert_allclose(ema["w"], p["w"], atol=1e-2)


def test_no_ema_params_when_ema_decay_is_zero(tiny_config):
    models = models_lib.build_models(tiny_config)
    shapes = jax.eval_shape(lambda p: step_lib.state_from_params(p, optim.make_optimizer(tiny_config)),
                            models_lib.param_shapes(models, tiny_config))
    assert shapes.ema_params is None


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """One train step with EMA on a data x fsdp = 4 x 2 mesh: (setup, state before, after)."""
    from tiny import tiny_config
    config = tiny_config()
    config.train.ema_decay = MAX_DECAY
    config.optimizer.warmup_steps = 0  # so that step 0 already moves the params
    config.mesh.data, config.mesh.fsdp = 4, 2
    setup = training_setup.build(config)
    state = setup.create_state(jax.random.key(0))
    before = jax.device_get((state.params, state.ema_params))
    batch = setup.global_batch(data_lib.make_train_dataset(config, setup.models.tokenizer)[0])
    state, _ = setup.train_step(state, batch, jax.random.key(1))
    return setup, before, state


def test_ema_starts_as_a_copy_of_the_params(ema_run):
    _, (params, ema_params), _ = ema_run
    jax.tree.map(np.testing.assert_array_equal, ema_params, params)


def test_train_step_updates_ema_with_the_step_0_decay(ema_run):
    """After step 0 (decay 0.1): ema = 0.1 * params_before + 0.9 * params_after."""
    _, (params_before, _), state = ema_run
    expected = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, params_before, jax.device_get(state.params))
    jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-6), jax.device_get(state.ema_params),
                 expected)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params_before,
                                           jax.device_get(state.ema_params)))
    assert any(changed)


def test_ema_is_sharded_like_the_params(ema_run):
    *_, state = ema_run
    param_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
    ema_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.ema_params)]
    assert ema_specs == param_specs
    assert any("fsdp" in spec for spec in ema_specs), "no EMA param is split along the fsdp axis"


def test_ema_survives_a_checkpoint_round_trip(ema_run, tmp_path):
    setup, _, state = ema_run
    config = setup.config
    workdir = str(tmp_path)
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    checkpoints.save(1, state, jax.random.key(1))
    checkpoints.close()

    restored = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config).restore_latest(
        lambda: setup.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state.ema_params),
                 jax.device_get(state.ema_params))
    assert [leaf.sharding for leaf in jax.tree.leaves(restored.state.ema_params)] == \
        [leaf.sharding for leaf in jax.tree.leaves(state.ema_params)]

    _, with_ema, _ = checkpoint_lib.load_params_for_inference(workdir, use_ema=True)
    _, without_ema, _ = checkpoint_lib.load_params_for_inference(workdir, use_ema=False)
    jax.tree.map(np.testing.assert_array_equal, with_ema["unet"], jax.device_get(state.ema_params["unet"]))
    jax.tree.map(np.testing.assert_array_equal, without_ema["unet"], jax.device_get(state.params["unet"]))
