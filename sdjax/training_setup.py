"""Everything a training run needs before its first step, built in one place (as MaxText's setup_train_loop):

    models -> mesh -> optimizer -> abstract state (shapes and shardings: nothing allocated)
           -> the stage's step, jitted over the mesh -> compiled from shapes -> state (created or restored)

`sdjax train`, `sdjax plan`, the benchmarks and the tests all build through `build`, so they compile the same
step. `train.stage` picks what the step trains and what the loop shows of it (STAGE_PARTS).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdjax import evaluation
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import sample as sample_lib
from sdjax import step as step_lib
from sdjax import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class StageParts:
    """What a stage brings to the loop: (models, config, tx, lr_schedule) -> train step; (models, config, mesh,
    workdir) -> grid maker for train.sample_every; (models, config, mesh) -> evaluator for train.eval_every."""
    make_train_step: Callable
    make_grids: Callable
    make_evaluator: Callable


STAGE_PARTS = {
    "unet": StageParts(step_lib.make_train_step, sample_lib.TrainingSamples, evaluation.Evaluator),
    "vae": StageParts(vae_lib.make_train_step, vae_lib.ReconstructionSamples, vae_lib.ReconstructionEvaluator),
}


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    config: ml_collections.ConfigDict
    models: models_lib.Models
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs with the state's shardings
    train_step: Callable  # jitted (state, global batch, rng) -> (state, metrics); donates the state

    @property
    def stage(self) -> StageParts:
        return STAGE_PARTS[self.config.train.stage]

    @property
    def shardings(self) -> step_lib.TrainState:
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return mesh_lib.batch_sharding(self.mesh)

    def create_state(self, rng: jax.Array) -> step_lib.TrainState:
        """A new sharded state (params initialised from `rng`, or loaded from `model.pretrained`)."""
        state, _ = step_lib.create_train_state(self.models, self.config, self.tx, self.mesh, rng)
        return state

    def global_batch(self, host_batch: dict) -> dict:
        """This process's batch from the input pipeline -> the step's global batch (its `skipped` count of bad
        records stays on the host)."""
        return mesh_lib.host_to_global({k: v for k, v in host_batch.items() if k != "skipped"},
                                       self.batch_sharding)

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs (with the batch sharding) of a global batch of images, as the input pipeline makes
        them: what `sdjax plan` compiles the step for without reading data."""
        b, r = self.config.train.batch_size, self.config.data.resolution
        ids_shape = models_lib.token_ids_shape(self.models, self.config.data.max_length)
        sharding = self.batch_sharding
        return {
            "pixel_values": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32, sharding=sharding),
            "input_ids": jax.ShapeDtypeStruct((b, *ids_shape), jnp.int32, sharding=sharding),
            "time_ids": jax.ShapeDtypeStruct((b, models_lib.SDXL_TIME_IDS), jnp.float32, sharding=sharding),
        }

    def compile(self, batch: dict, rng, state=None):
        """(lowered, compiled) of the step for `batch` (global arrays or ShapeDtypeStructs) and `state` (default:
        the abstract one: compiled before the state exists). The step's later calls with the same shapes and
        shardings run this executable (jit's cache); one that does not fit the devices fails here."""
        lowered = self.train_step.lower(self.abstract_state if state is None else state, batch, rng)
        return lowered, lowered.compile()


def build(config: ml_collections.ConfigDict, devices=None, models: models_lib.Models | None = None,
          tx: optax.GradientTransformation | None = None) -> TrainingSetup:
    """The setup of `config` (resolved and validated) over `devices` (default: all); `models` when they are
    built already, `tx` to train with another optimizer than `config.optimizer` (tests)."""
    models = models_lib.build_models(config) if models is None else models
    mesh = mesh_lib.make_mesh(config, devices)
    lr_schedule = optim.make_lr_schedule(config)
    tx = optim.make_optimizer(config) if tx is None else tx
    abstract_state = step_lib.abstract_train_state(models, config, tx, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    make_train_step = STAGE_PARTS[config.train.stage].make_train_step
    train_step = step_lib.jit_train_step(make_train_step(models, config, tx, lr_schedule), shardings, mesh,
                                         config.train.get("xla_optimization_level", ""))
    return TrainingSetup(config, models, mesh, tx, lr_schedule, abstract_state, train_step)
