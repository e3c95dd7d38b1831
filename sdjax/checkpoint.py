"""Checkpoints of a run: orbax's CheckpointManager over WORKDIR/checkpoints (or `train.checkpoint_dir`).

A checkpoint is a step directory with two orbax items:
  state  the whole TrainState pytree, saved generically (a field added to TrainState is saved with no change
         here); every process writes its own shards, and restoring reshards onto the target mesh;
  meta   JSON: step, data position (global batches consumed: the dataset is indexed by step), the step RNG
         key, the seed and the config the run used.
Saves are asynchronous: `save` returns once the arrays are copied off the devices, the write goes on in a
background thread. Orbax writes a step into a temporary directory and commits it last (a rename on local
disks; `commit_success.txt` on GCS, and in both cases that file is written last), so a directory without that
marker was cut off mid-write: it is skipped with a warning, never restored.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
from typing import Any, Callable

import fsspec
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from sdjax import lora as lora_lib

# gcsfs (etils.epath's and orbax's GCS client) caches directory listings for the life of the process and learns
# of no write it did not make itself (tensorstore's array writes, other processes' shards, another run): a
# cached listing would hide steps from resume and keep-N. Listings are a few requests per save: not cached.
fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, on every filesystem
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a step directory orbax was still writing
_PROBE = ".sdjax-write-check-"  # a file each process writes at start, to see the directory is writable


class _DropReadOnlyNotice(std_logging.Filter):
    """Orbax warns "Given directory is read only=DIR" whenever a manager is opened read-only, which sdjax does
    on purpose to read a run (sample, export, eval-demo, the UNet stage reading its VAE stage): not a problem
    for the user to see on every command."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only=")


std_logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for other model (or optimizer) shapes than the current config builds."""


class NoCheckpointError(FileNotFoundError):
    """No complete checkpoint where one is needed."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (storage gone, no permission, a bucket that does not exist): the run
    stops at once; the newest complete checkpoint is kept, and the same command resumes from it."""


@dataclasses.dataclass
class Restored:
    state: Any  # the TrainState (sdjax/step.py), restored onto the target's shardings
    rng: jax.Array  # the step RNG key the run folds the step into
    step: int
    data_position: int  # global batches consumed; the dataset item to read next


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    return epath.Path(config.train.checkpoint_dir or epath.Path(workdir) / "checkpoints")


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """The inverse of `config_to_dict`: JSON has no tuples, and every sequence in our configs is one."""
    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value
    return ml_collections.ConfigDict(tuples(values))


def _flat_shapes(tree) -> dict[str, tuple]:
    """'params.unet.conv_in.kernel' -> (shape, dtype) for every array of a state or of its checkpoint metadata."""
    flat = ocp.tree.to_flat_dict(tree)
    return {".".join(map(str, k)): (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()
            if hasattr(v, "shape")}


def _flat_config(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every config value that differs (keys on one side only included)."""
    old, new = _flat_config(saved), _flat_config(current)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, "(absent)") != new.get(k, "(absent)")]


def _scan_layers_changed(saved_config: dict, config, where: str) -> str:
    """The first line of the mismatch error when `model.scan_layers` differs: it changes the arrays' names
    (scanned stacks are stored stacked, sdjax/models/layer_stacks.py), so that is the value to set back."""
    saved = bool(saved_config.get("model", {}).get("scan_layers", False))
    if saved == bool(config.model.get("scan_layers", False)):
        return ""
    return (f"{where} was saved with model.scan_layers={saved}: its layer stacks are stored "
            f"{'stacked' if saved else 'unrolled'}; resume it with --config.model.scan_layers={saved}. ")


def check_compatible(saved_state_metadata, abstract_state, saved_config: dict, config, where: str) -> None:
    """Raises CheckpointMismatchError, naming arrays and config keys, if the saved arrays don't fit the state."""
    saved = _flat_shapes(saved_state_metadata)
    wanted = _flat_shapes(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    order = lambda k: (k.startswith("opt_state"), k)  # noqa: E731  optimizer moments only repeat the params
    problems = [f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, config {wanted[k][0]} {wanted[k][1]}"
                for k in sorted(saved.keys() & wanted.keys(), key=order) if saved[k] != wanted[k]]
    problems += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys(), key=order)]
    problems += [f"{k}: not in the checkpoint" for k in sorted(wanted.keys() - saved.keys(), key=order)]
    if not problems:
        return
    shown = "\n  ".join(problems[:8]) + (f"\n  ... ({len(problems)} in all)" if len(problems) > 8 else "")
    changes = "\n  ".join(config_changes(saved_config, config_to_dict(config))) or "(none)"
    raise CheckpointMismatchError(
        _scan_layers_changed(saved_config, config, where) +
        f"{where} cannot be resumed with this config: its arrays have other shapes than the model and "
        f"optimizer state the config builds.\n  {shown}\nConfig values changed since that checkpoint:\n  {changes}\n"
        "Only values that keep every shape (train.steps, optimizer.learning_rate, ...) may change on resume: "
        "undo the others, or use a new --workdir.")


def _manager_options(keep_last: int = 1, keep_every: int = 0, read_only: bool = False):
    keep = [checkpoint_managers.LatestN(keep_last)]
    if keep_every:
        keep.append(checkpoint_managers.EveryNSteps(keep_every))
    return ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep),
        enable_async_checkpointing=True,
        # Orbax's own leftovers of a cut-off save on a local disk (a temporary directory, never committed).
        cleanup_tmp_directories=not read_only,
        read_only=read_only, create=not read_only, save_interval_steps=0 if read_only else 1)


def _open_manager(directory: epath.Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    # Handlers named up front: a fresh manager can then read a checkpoint's metadata before any restore.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    # Orbax's array writer refuses a relative path ("Checkpoint path should be absolute"), and only in its
    # background thread, at the first save: `--workdir workdirs/demo` (the README's) is relative to the
    # current directory. gs:// paths are absolute already.
    if not directory.is_absolute():
        directory = directory.absolute()
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _split_by_commit(manager: ocp.CheckpointManager, directory: epath.Path) -> tuple[list[int], list[int]]:
    """(complete, incomplete) steps, ascending. Our step directories are named by the step (orbax's default)."""
    complete, incomplete = [], []
    for step in sorted(manager.all_steps()):
        (complete if (directory / str(step) / COMMIT_MARKER).exists() else incomplete).append(step)
    return complete, incomplete


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_writable(directory: epath.Path) -> None:
    """Writes one small file in `directory` (created if missing) per process, and with several processes checks
    that each one sees all of them, so that storage a run cannot use stops it before anything compiles, not at
    its first save: a bucket that does not exist, no permission, or a folder on one host's own disk where the
    hosts of a pod need one they all share (orbax's multi-host commit would wait forever)."""
    probe = directory / f"{_PROBE}{jax.process_index()}"
    try:
        if str(directory).startswith("gs://"):
            # gcsfs would create a missing bucket on mkdir: a typo in the name must fail, not make a bucket.
            bucket = epath.Path("gs://" + str(directory)[len("gs://"):].split("/")[0])
            if not bucket.exists():
                raise FileNotFoundError(f"the bucket {bucket} does not exist (or this account cannot see it)")
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("sdjax checks that checkpoints can be written here\n")
    except Exception as e:  # noqa: BLE001 -- OSError, gcsfs' HttpError, ...: all mean "cannot write here"
        raise CheckpointSaveError(
            f"Checkpoints cannot be written to {directory}: {_reason(e)}\nSet train.checkpoint_dir to storage "
            "this machine can write (on a pod: a gs:// bucket every host can write), or fix its permissions."
        ) from e
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sdjax: checkpoint directory probes written")
        seen = [(directory / f"{_PROBE}{i}").exists() for i in range(jax.process_count())]
        seen_by = np.asarray(multihost_utils.process_allgather(np.asarray(seen)))  # [reader, writer]: on all
        if not seen_by.all():
            reader, writer = (int(i) for i in np.argwhere(~seen_by)[0])
            raise CheckpointSaveError(
                f"train.checkpoint_dir={str(directory)!r} is not shared by the processes of this run: process "
                f"{reader} does not see the file process {writer} wrote there ({int((~seen_by).sum())} such pairs). "
                "Every process writes its shards of each checkpoint into one directory: on a pod, a gs:// "
                "bucket (the workdir may stay on each host's own disk).")
    probe.unlink()
    if jax.process_count() > 1:
        # Otherwise a process still listing the directory (Checkpoints.__init__) sees another's probe in it,
        # and then, the probe gone, a GCS "folder" with no object in it: FileNotFoundError.
        multihost_utils.sync_global_devices("sdjax: checkpoint directory probes removed")


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())[:600]


def _cut_off_saves(directory: epath.Path) -> list[str]:
    """The saves in `directory` cut off mid-write: a temporary directory (local disks), a step without its
    commit marker (GCS)."""
    try:
        return sorted(p.name for p in directory.iterdir()
                      if _TMP_SUFFIX in p.name or (p.name.isdigit() and not (p / COMMIT_MARKER).exists()))
    except FileNotFoundError:  # on GCS a folder exists only while an object is in it: none yet, nothing cut off
        return []


class Checkpoints:
    """The checkpoints of one training run: restore the newest complete one, save (async), preemption."""

    def __init__(self, directory: epath.PathLike, config: ml_collections.ConfigDict):
        self.directory = epath.Path(directory)
        self._config = config
        if not self.directory.is_absolute():
            self.directory = self.directory.absolute()
        _check_writable(self.directory)
        # Saves cut off mid-write: a temporary directory (local disks), a step without its marker (GCS). Orbax
        # deletes both silently when it opens the directory: say so, the run resumes from an older step.
        cut_off = _cut_off_saves(self.directory)
        if cut_off:
            logging.warning("Checkpoints %s in %s were cut off mid-write (never committed): deleting them; the run "
                            "resumes from the newest complete checkpoint before them.", cut_off, self.directory)
        train = config.train
        self._manager = _open_manager(
            self.directory, _manager_options(train.keep_checkpoints, train.keep_checkpoint_every))
        self._complete_steps, incomplete = _split_by_commit(self._manager, self.directory)
        for step in incomplete:  # announced above; a local disk's orbax takes a step directory as committed
            self._manager.delete(step)  # deleted, not kept: this run writes the same step again
        # What a failed save reports: the step being written, and the newest one known to be complete.
        self._writing: int | None = None
        self._newest_complete: int | None = self._complete_steps[-1] if self._complete_steps else None

    def _metadata(self, step: int) -> tuple[dict, Any]:
        """(sdjax's metadata, the saved state's tree metadata) of checkpoint `step`; raises if unreadable."""
        return _restore_meta(self._manager, step), self._manager.item_metadata(step)["state"].tree

    def check_newest(self, abstract_state) -> int:
        """The step of the newest checkpoint whose metadata reads (0 if none), checked against the config and
        `abstract_state` (CheckpointMismatchError): the trainer asks before it compiles, restores after."""
        for step in reversed(self._complete_steps):
            try:
                meta, saved_tree = self._metadata(step)
            except (OSError, ValueError, KeyError):
                continue  # restore_latest skips it, with a warning
            check_compatible(saved_tree, abstract_state, meta["config"], self._config, str(self.directory / str(step)))
            return step
        return 0

    def restore_latest(self, abstract_state: Callable[[], Any]) -> Restored | None:
        """The newest readable checkpoint, restored onto `abstract_state()`'s shardings; None if there is none.

        A checkpoint that cannot be read (files missing or damaged) is skipped with a warning; one that reads
        but does not fit the config raises CheckpointMismatchError, since an older one would not fit either."""
        target, failures = None, []
        for step in reversed(self._complete_steps):
            where = str(self.directory / str(step))
            try:
                meta, saved_tree = self._metadata(step)
            except (OSError, ValueError, KeyError) as e:
                failures.append(self._skip(where, e))
                continue
            if target is None:
                target = abstract_state()
            check_compatible(saved_tree, target, meta["config"], self._config, where)
            try:
                state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
            except (OSError, ValueError) as e:
                failures.append(self._skip(where, e))
                continue
            # Process 0 wrote the saved config: the others' paths with a `{process_id}` in them (per-host
            # folders) would differ from it on every resume.
            changes = config_changes(meta["config"], config_to_dict(self._config)) if jax.process_index() == 0 else []
            if changes:
                logging.warning("Resuming %s with a changed config:\n  %s", where, "\n  ".join(changes))
            rng = jax.random.wrap_key_data(np.asarray(meta["rng_key_data"], np.uint32), impl=meta["rng_impl"])
            return Restored(state=state, rng=rng, step=step, data_position=int(meta["data_position"]))
        if failures:
            # Starting over would silently overwrite these steps: the user must decide.
            raise NoCheckpointError(f"No checkpoint in {self.directory} could be read:\n  " + "\n  ".join(failures)
                                    + "\nMove the directory away to start this run from scratch.")
        return None

    @staticmethod
    def _skip(where: str, error: Exception) -> str:
        reason = " ".join(str(error).split())[:300]
        logging.warning("Checkpoint %s is incomplete or damaged, using the one before it: %s", where, reason)
        return f"{where}: {reason}"

    def save(self, step: int, state, rng: jax.Array) -> None:
        """Starts an asynchronous save of `state` at `step` (a no-op if that step is saved already)."""
        if step in self._manager.all_steps():
            return
        meta = {
            "step": step,
            "data_position": step,
            "seed": self._config.train.seed,
            "rng_impl": str(jax.random.key_impl(rng)),
            "rng_key_data": np.asarray(jax.random.key_data(rng)).tolist(),
            "process_count": jax.process_count(),
            "config": config_to_dict(self._config),
        }
        try:  # orbax first waits for the previous save, and raises its failure here
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e, step if self._writing is None else self._writing) from e
        if self._writing is not None:
            self._newest_complete = self._writing  # orbax started this save: the previous one was committed
        self._writing = step

    def check_saves(self) -> None:
        """Raises CheckpointSaveError if the background save has failed. Cheap (no I/O): the loop calls it
        after every step, so that a failure stops the run when it happens; orbax alone reports it only at
        the next save, `train.checkpoint_every` steps (maybe hours) of training later, which are then lost."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e, self._writing) from e

    def _save_failed(self, error: Exception, step: int | None) -> CheckpointSaveError:
        kept = (f"The newest complete checkpoint, {self.directory / str(self._newest_complete)}, is kept: the "
                "same command resumes from it" if self._newest_complete is not None else
                "There is no complete checkpoint yet: the same command starts over")
        return CheckpointSaveError(
            f"Saving the checkpoint of step {step} to {self.directory / str(step)} failed: {_reason(error)}\n"
            f"The run stops here. {kept} once {self.directory} can be written again.")

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any was told it will be preempted (JAX's sync point)."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the last save to be committed; CheckpointSaveError if it failed."""
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e, self._writing) from e


def _run_checkpoint_dir(workdir: str) -> epath.Path:
    """Where a run's checkpoints are: its config.json names a `train.checkpoint_dir`, else WORKDIR/checkpoints."""
    config_file = epath.Path(workdir) / "config.json"
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        if saved.get("train", {}).get("checkpoint_dir"):
            return epath.Path(saved["train"]["checkpoint_dir"])
    return epath.Path(workdir) / "checkpoints"


@dataclasses.dataclass
class InferenceCheckpoint:
    config: ml_collections.ConfigDict  # the config the run used
    params: dict  # host numpy params {"unet", "vae", "text_encoder"} (+ "lora": the adapters of a LoRA run)
    step: int
    ema: bool  # whether params["unet"] is the run's EMA of the UNet


def load_inference_checkpoint(workdir: str, step: int | None = None, use_ema: bool = True) -> InferenceCheckpoint:
    """The params of a run's checkpoint (the newest complete step unless `step` is given) for sampling or export.

    The UNet is the EMA one when the run kept EMA weights and `use_ema`. Only params are read (no optimizer
    state), as numpy arrays on the host."""
    directory = _run_checkpoint_dir(workdir)
    if not directory.exists():
        raise NoCheckpointError(f"{directory} does not exist: is {workdir} the --workdir of a `sdjax train` run?")
    manager = _open_manager(directory, _manager_options(read_only=True))
    try:
        complete, _ = _split_by_commit(manager, directory)
        if not complete:
            raise NoCheckpointError(f"{directory} holds no complete checkpoint.")
        if step is None:
            step = complete[-1]
        elif step not in complete:
            raise NoCheckpointError(f"{directory} has no complete checkpoint at step {step}; it has {complete}.")
        meta = _restore_meta(manager, step)
        saved = manager.item_metadata(step)["state"].tree
        wanted = {"params": saved["params"], "frozen": saved["frozen"]}
        if use_ema and saved.get("ema_params"):
            wanted["ema_params"] = saved["ema_params"]
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
    finally:
        manager.close()
    params = {**restored["frozen"], **restored["params"], **restored.get("ema_params", {})}
    return InferenceCheckpoint(config_from_dict(meta["config"]), params, step, ema="ema_params" in restored)


def load_params_for_inference(workdir: str, step: int | None = None,
                              use_ema: bool = True) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, params, step) of `load_inference_checkpoint`, LoRA adapters merged into their kernels."""
    loaded = load_inference_checkpoint(workdir, step, use_ema)
    params = loaded.params
    if lora_lib.COMPONENT in params:
        params = jax.device_get(lora_lib.merge(params, lora_lib.scale(loaded.config.lora)))
    return loaded.config, params, loaded.step
