"""The sharded train step: equal to a single-device step, bf16 over fp32 masters, and it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import data as data_lib
from sdjax import training_setup
from tiny import PARAMS_ATOL, comparable_config, run_train_steps


@pytest.fixture(scope="module")
def single_device_run():
    from tiny import tiny_config
    config = comparable_config(tiny_config())
    config.mesh.data, config.mesh.fsdp = 1, 1
    return run_train_steps(config, jax.devices()[:1])


# Tolerance: the sharded step sums gradients in another order (per-device partial sums, then an
# all-reduce), so float32 losses and gradient norms agree to 1e-5 relative, not bitwise; params to
# tiny.PARAMS_ATOL, under tiny.comparable_config.
@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_sharded_step_matches_single_device(single_device_run, tiny_config, data, fsdp):
    tiny_config.mesh.data, tiny_config.mesh.fsdp = data, fsdp
    state, losses = run_train_steps(comparable_config(tiny_config))
    ref_state, ref_losses = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAMS_ATOL),
                 state.params, ref_state.params)
    if fsdp > 1:
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
        assert any("fsdp" in spec for spec in specs), "no param is split along the fsdp axis"


def test_bf16_keeps_fp32_params_and_computes_in_bf16(tiny_config):
    tiny_config.train.precision = "bf16"
    setup = training_setup.build(tiny_config)
    models = setup.models
    assert models.unet.dtype == jnp.bfloat16 and models.vae.dtype == jnp.bfloat16
    state = setup.create_state(jax.random.key(0))
    for leaf in jax.tree.leaves((state.params, state.frozen, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    batch = setup.global_batch(data_lib.make_train_dataset(tiny_config, models.tokenizer)[0])
    jaxpr = jax.make_jaxpr(setup.train_step)(state, batch, jax.random.key(1))
    conv_dtypes = {eqn.invars[0].aval.dtype for eqn in _all_eqns(jaxpr.jaxpr)
                   if eqn.primitive.name == "conv_general_dilated"}
    dot_dtypes = {eqn.invars[0].aval.dtype for eqn in _all_eqns(jaxpr.jaxpr)
                  if eqn.primitive.name == "dot_general"}
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
    assert jnp.dtype(jnp.bfloat16) in dot_dtypes
    # The step's output types, traced, not run: a bf16 step compiles in about a minute on XLA:CPU, and the
    # demo's runs (bf16, tests/test_pod_runs.py) execute one.
    new_state, metrics = jax.eval_shape(setup.train_step, state, batch, jax.random.key(1))
    assert metrics["loss"].dtype == jnp.float32
    for leaf in jax.tree.leaves(new_state.params):
        assert leaf.dtype == jnp.float32


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _jaxprs_in(eqn.params.values()):
            yield from _all_eqns(sub)


def _jaxprs_in(values):
    """The jaxprs among an equation's params (scan, remat, pjit, cond branches...). jax.core.jaxprs_in_params
    did this until jax 0.12 made it private."""
    for value in values:
        if hasattr(value, "eqns"):  # a Jaxpr
            yield value
        elif hasattr(getattr(value, "jaxpr", None), "eqns"):  # a ClosedJaxpr
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            yield from _jaxprs_in(value)


def test_loss_decreases_when_overfitting_one_batch(tiny_config):
    tiny_config.optimizer.learning_rate = 2e-3
    tiny_config.optimizer.warmup_steps = 0
    tiny_config.train.steps = 30
    setup = training_setup.build(tiny_config)
    state = setup.create_state(jax.random.key(0))
    batch = setup.global_batch(data_lib.make_train_dataset(tiny_config, setup.models.tokenizer)[0])
    losses = []
    for _ in range(30):
        state, metrics = setup.train_step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, f"loss did not go down: first 5 steps {first:.4f}, last 5 {last:.4f}"
