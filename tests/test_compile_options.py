"""train.xla_optimization_level reaches XLA's compile of the train step (sdjax/step.py jit_train_step).

Checked on a TPU compile (libtpu on this CPU host) of a small FSDP step: a scan over layers whose weights are
split over 4 v5e chips. At XLA's default effort the TPU compiler pipelines the loop's weight all-gathers (it
gathers the next layer's weights during this one's compute: more all-gathers in the program); at O1 it does
not, the trade the option makes for a faster compile (docs/planning.md)."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import mesh as mesh_lib
from sdjax import plan as plan_lib
from sdjax import step as step_lib
from sdjax import training_setup
from tiny import tiny_config

_ALL_GATHER = re.compile(r" all-gather(?:-start)?\(")


def _layers_step(state, batch, rng):
    def loss(weights):
        def layer(x, w):
            return jnp.tanh(x @ w), None
        x, _ = jax.lax.scan(layer, batch["x"], weights)
        return jnp.sum(x ** 2)
    value, grad = jax.value_and_grad(loss)(state["w"])
    return {"w": state["w"] - 0.1 * grad}, {"loss": value}


def _compiled_text(level: str) -> str:
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 1, 4
    mesh = mesh_lib.make_mesh(config, plan_lib.target_devices("v5e:2x2"))
    shardings = {"w": NamedSharding(mesh, P(None, "fsdp", None))}
    state = {"w": jax.ShapeDtypeStruct((6, 1024, 1024), jnp.float32, sharding=shardings["w"])}
    batch = {"x": jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=mesh_lib.batch_sharding(mesh))}
    step = step_lib.jit_train_step(_layers_step, shardings, mesh, level)
    return step.lower(state, batch, jax.eval_shape(lambda: jax.random.key(0))).compile().as_text()


def test_o1_compiles_the_fsdp_step_without_pipelined_all_gathers():
    default, o1 = _compiled_text(""), _compiled_text("O1")
    assert len(_ALL_GATHER.findall(o1)) < len(_ALL_GATHER.findall(default)), (
        "the TPU compile at O1 has as many weight all-gathers as at XLA's default: the level did not reach it")
    assert len(o1.splitlines()) < len(default.splitlines())
    assert _compiled_text("O2").count("\n") == default.count("\n")  # TPU's default level is O2


def test_training_setup_compiles_the_step_at_the_configured_level(monkeypatch):
    """`sdjax train` and `sdjax plan` build their step through training_setup: the config's level reaches the
    step's jit (recorded on the real jax.jit, nothing compiled)."""
    seen = []
    real_jit = jax.jit

    def recording_jit(fun, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fun, **kwargs)

    config = tiny_config()
    config.train.xla_optimization_level = "O1"
    monkeypatch.setattr(jax, "jit", recording_jit)
    training_setup.build(config, jax.devices()[:1])
    assert seen[-1] == {"optimization_level": 19}, seen  # XLA's EFFORT_O1
