"""FSDP: with mesh.fsdp=8 every large array of the state (params, frozen models, optimizer moments) is split 8
ways, small ones stay replicated, and the step computes what the replicated (pure data-parallel) step does."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdjax import mesh as mesh_lib
from tiny import PARAMS_ATOL, comparable_config, run_train_steps, tiny_config


def _run_two_steps(data: int, fsdp: int):
    config = comparable_config(tiny_config())
    config.mesh.data, config.mesh.fsdp = data, fsdp
    state, losses = run_train_steps(config)
    return config, state, losses


@pytest.fixture(scope="module")
def fsdp_run():
    return _run_two_steps(data=1, fsdp=8)


@pytest.mark.slow  # about 70 s on 2 CPU cores, with the fsdp_run fixture's compile
def test_fsdp8_splits_every_large_array_8_ways(fsdp_run):
    config, state, _ = fsdp_run
    min_size = config.mesh.fsdp_min_size
    arrays = {"params": state.params, "frozen": state.frozen, "opt_state": state.opt_state}
    num_split = 0
    for group, tree in arrays.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = f"{group}{jax.tree_util.keystr(path)} {leaf.shape}"
            if leaf.size >= min_size:
                assert list(leaf.sharding.spec).count("fsdp") == 1, f"{name} is not split along fsdp"
                shard = leaf.sharding.shard_shape(leaf.shape)
                assert np.prod(shard) * 8 == leaf.size, f"{name}: shard {shard} is not 1/8 of it"
                num_split += 1
            else:
                assert leaf.sharding.is_fully_replicated, f"small {name} should stay replicated"
    unet_and_text = len(jax.tree.leaves(state.params["unet"])) + len(jax.tree.leaves(state.frozen["text_encoder"]))
    assert num_split > unet_and_text // 2  # most arrays are large: the rule is not vacuous


@pytest.mark.parametrize("shape,expected", [
    ((3, 3, 320, 4), P(None, None, "fsdp", None)),  # the largest divisible dim
    ((77, 768), P(None, "fsdp")),  # 77 does not divide by 8
    ((999, 99), P()),  # large, but no dim divides by 8
    ((64,), P()),  # small: replicated
])
def test_fsdp_rule(shape, expected):
    assert mesh_lib.fsdp_spec(shape, fsdp_size=8, min_size=256) == expected


# Tolerance as in test_step: the same float32 sums in another order (1e-5 relative for loss and grad norm);
# params to tiny.PARAMS_ATOL, under tiny.comparable_config.
def test_fsdp_step_matches_replicated_step(fsdp_run):
    config, state, losses = fsdp_run
    _, ref_state, ref_losses = _run_two_steps(data=8, fsdp=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAMS_ATOL),
                 state.params, ref_state.params)
