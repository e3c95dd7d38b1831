"""The config of a run as sdjax fills it in, once, before checking and building it.

A config may leave four things to sdjax; `resolve` decides them in place, returns one line per decision for
the run to print, and the run's config.json then records what was decided:
  * `data.source="auto"` (the demo config's): the concrete source `data.path` points at;
  * `train.eval_every` with no held-out data (an image folder or shards without `data.eval_path`, a TFDS
    dataset without `data.eval_split`, DreamBooth): evaluation off, whatever the source's kind; set on the
    command line, it stays and validation names the key to set instead;
  * `optimizer.warmup_steps` longer than `train.steps` (a short try of a shipped config): the warmup is
    shortened to the run, so the learning rate reaches its peak at the last step; set on the command line,
    it stays and validation refuses it.
  * `data.random_flip` / `data.random_crop` of a config file (configs/sd15.py flips) in a run from a latent
    cache, or one writing it: the cache holds each image's centre crop, encoded once, so they are off; set
    on the command line, they stay and validation refuses them.
The noise schedule of a `model.pretrained` folder is read here too (sdjax/models/noise.py). `validate`
(sdjax/validation.py) then only checks.
"""

from __future__ import annotations

from collections.abc import Collection

import ml_collections

from sdjax import data as data_lib
from sdjax.models import noise as noise_lib


def command_line_keys(argv: list[str]) -> frozenset[str]:
    """The config keys set on a command line: `--config.train.steps=20` -> "train.steps"."""
    prefix = "--config."
    return frozenset(arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix))


def resolve(config: ml_collections.ConfigDict, set_by_user: Collection[str] = ()) -> list[str]:
    """Fills in what `config` leaves to sdjax (see the module doc), in place; `set_by_user` are the keys the
    user gave on the command line, which are kept as given. Returns a notice per decision."""
    notices = []
    noise_lib.resolve_noise_schedule(config)
    data, train = config.data, config.train
    source = data_lib.resolved_source(config)
    if data.source != source:
        data.source = source
        if data.path:
            notices.append(f"data.source='auto': data.path={data.path!r} is read as data.source={source!r}.")
    if train.eval_every and not data_lib.has_eval_split(config) and "train.eval_every" not in set_by_user:
        dreambooth = bool(config.dreambooth.instance_data_dir)
        what = "DreamBooth" if dreambooth else data_lib.source_name(config)
        hint = "" if dreambooth else f"; set {data_lib.held_out_key(config)} to evaluate"
        notices.append(f"{what} has no held-out data: in-training evaluation is off "
                       f"(train.eval_every={train.eval_every} -> 0){hint}.")
        train.eval_every = 0
    warmup = config.optimizer.warmup_steps
    if warmup > train.steps and "optimizer.warmup_steps" not in set_by_user:
        notices.append(f"optimizer.warmup_steps={warmup} is longer than the run (train.steps={train.steps}): "
                       f"shortened to {train.steps}.")
        config.optimizer.warmup_steps = train.steps
    if data.latent_cache:
        for key in ("random_flip", "random_crop"):
            if data[key] and f"data.{key}" not in set_by_user:
                notices.append(f"data.{key}=True does not apply to a latent cache (it holds each image's centre "
                               "crop, encoded once): off.")
                data[key] = False
    return notices
