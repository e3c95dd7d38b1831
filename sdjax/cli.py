"""The `sdjax` command: `sdjax <subcommand> [flags]`. Each subcommand parses its own absl flags;
`--config` takes an ml_collections config file whose every field can be overridden (`--config.train.steps=5`).
"""

from __future__ import annotations

import ast
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from sdjax import libtpu_host
from sdjax._torchless import import_without_torch

USAGE = """usage: sdjax <command> [flags]

commands:
  train    train (fine-tune or from scratch; with model.vae_config the VAE first):
           --config FILE --workdir DIR [--config.KEY=VALUE ...]
  train-vae
           train the VAE alone (then train with --config.model.vae_from=DIR): --config FILE --workdir DIR
  cache-latents
           encode the dataset once with the VAE (then train with --config.data.latent_cache=DIR), and with
           --config.data.cache_text_states=True the text encoder(s) too: --config FILE --out DIR|gs://BUCKET/DIR
  plan     memory and speed of a config's train step on a TPU topology, compiled on this host:
           --config FILE --topology v5e:2x2 [--max-batch]
  sample   text -> images with classifier-free guidance, from a run or a local diffusers folder:
           (--workdir DIR [--step N] | --pretrained PATH) --prompt "..." [--prompt ...] [--negative-prompt "..."]
           [--num-images K] [--scheduler ddim|pndm|lms|dpm|euler|ddpm] [--steps 50] [--guidance 7.5] [--seed S]
           [--out grid.png] [--out-dir DIR]
  export   a run's checkpoint -> a diffusers folder (safetensors) for PyTorch's StableDiffusionPipeline
           (a VAE run's -> an AutoencoderKL folder): --workdir DIR --out OUT [--step N] [--format pytorch|flax]
           [--ema|--noema] (a LoRA run: OUT/pytorch_lora_weights.safetensors for load_lora_weights, or
           [--merge-lora])
  eval-demo
           does a demo run draw what its held-out prompts say? accuracy per attribute: --workdir DIR
           (a VAE run's workdir: are the shapes kept in its reconstructions?)
           [--num-images 8] [--scheduler ddim] [--steps N] [--guidance G] [--seed S] [--out grid.png] [--noema]

`sdjax <command> --help` lists a command's flags."""


def _parse(flag_values: flags.FlagValues, argv: list[str]) -> None:
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(f"usage: {argv[0]} [flags]\n\n{flag_values.main_module_help() or flag_values}")
        sys.exit(0)
    try:
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags reports an unknown --config.KEY as AttributeError/KeyError with a "did you mean".
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        if detail[:1] in "'\"" and detail[-1:] == detail[:1]:  # config_flags wraps a KeyError's repr
            detail = ast.literal_eval(detail)
        detail = " ".join(detail.split())
        sys.exit(f"{argv[0]}: bad flag: {detail}")
    logging.set_verbosity(logging.WARNING)


def _define_config_flag(fv: flags.FlagValues, argv: list[str]) -> None:
    # sys_argv: config_flags finds the --config.KEY overrides in this argv, not in sys.argv.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", flag_values=fv,
                                    lock_config=True, sys_argv=argv)


def _train_vae(argv: list[str]) -> int:
    return _train(argv, stage="vae")


def _train(argv: list[str], stage: str | None = None) -> int:
    fv = flags.FlagValues()
    _define_config_flag(fv, argv)
    flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and samples go.", flag_values=fv)
    # Multi-process runs outside Cloud TPU / GKE (where these are detected): the same three on every process.
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "How many processes the run has.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    _parse(fv, argv)

    from sdjax import distributed
    try:  # before anything touches a device
        distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    except distributed.DistributedFlagsError as e:
        sys.exit(f"{argv[0]}: {e}")

    import jax

    from sdjax import train as train_lib
    from sdjax.checkpoint import CheckpointSaveError
    from sdjax.config import ConfigError
    from sdjax.data import DataError
    from sdjax.run_config import command_line_keys

    if stage:
        fv.config.train.stage = stage
    try:
        result = train_lib.train(fv.config, fv.workdir, command_line_keys(argv))
    except (ConfigError, DataError) as e:
        sys.exit(f"{argv[0]}: {e}")
    except CheckpointSaveError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Orbax leaves the threads of a failed save waiting for signals that never come, and Python would wait
        # for them (5 minutes) before exiting: nothing is left to write, so the process ends now.
        os._exit(1)
    if jax.process_index() == 0:
        print(train_lib.summarize(result))
    return 0


def _plan(argv: list[str]) -> int:
    fv = flags.FlagValues()
    _define_config_flag(fv, argv)
    flags.DEFINE_string("topology", "v5e:2x2", "A TPU topology ('v5e:2x2', 'v5p:2x2x1', 'v4:2x2x1', 'v6e:2x2'), "
                        "'cpu:N' or 'local'.", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over the data-center network "
                         "(multislice): mesh.data spans them, mesh.fsdp stays inside one.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_boolean("max_batch", False, "Search the largest per-device batch that fits.", flag_values=fv)
    flags.DEFINE_float("hbm_gib", None, "Plan against this many GiB per device instead of the chip's HBM (e.g. "
                       "to keep headroom).", flag_values=fv)
    flags.DEFINE_string("cache_dir", "~/.cache/sdjax/plan", "Where compile results are cached ('' disables).",
                        flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)
    _parse(fv, [a.replace("--max-batch", "--max_batch").replace("--num-slices", "--num_slices") for a in argv])

    from sdjax import plan as plan_lib
    from sdjax.config import ConfigError

    cache_dir = fv.cache_dir and os.path.expanduser(fv.cache_dir)
    capacity = fv.hbm_gib * plan_lib.GiB if fv.hbm_gib else None
    try:
        if fv.max_batch:
            best, plans = plan_lib.max_batch_per_device(
                fv.config, fv.topology, cache_dir, capacity_bytes=capacity, num_slices=fv.num_slices,
                progress=lambda message: print(f"sdjax plan: {message}", file=sys.stderr, flush=True))
            plans = sorted(plans, key=lambda p: p.batch_per_device)
            print(plan_lib.format_table(plans))
            print(f"\nlargest batch that fits: {best} per device "
                  f"({best * plans[0].num_devices} global) on "
                  f"{fv.topology if fv.num_slices == 1 else f'{fv.num_slices}x {fv.topology}'}")
        else:
            plan = plan_lib.plan_step(fv.config, fv.topology, cache_dir, fv.num_slices)
            print(plan_lib.format_table([plan_lib.with_capacity(plan, capacity)]))
    except (ConfigError, ValueError) as e:
        sys.exit(f"sdjax plan: {e}")
    return 0


def _cache_latents(argv: list[str]) -> int:
    fv = flags.FlagValues()
    _define_config_flag(fv, argv)
    flags.DEFINE_string("out", None, "Folder or gs:// prefix for the cache (then train with "
                        "--config.data.latent_cache=OUT).",
                        flag_values=fv)
    flags.mark_flags_as_required(["config", "out"], flag_values=fv)
    _parse(fv, argv)

    import json

    from sdjax import distributed
    distributed.initialize()  # on a TPU pod every host encodes its share of the records into its own shard

    from sdjax.cache_latents import cache_latents
    from sdjax.config import ConfigError
    from sdjax.data import DataError
    from sdjax.run_config import command_line_keys

    try:
        summary = cache_latents(fv.config, fv.out, command_line_keys(argv))
    except (ConfigError, DataError) as e:
        sys.exit(f"sdjax cache-latents: {e}")
    print(json.dumps(summary))
    return 0


def _dashes_to_underscores(argv: list[str]) -> list[str]:
    """`--num-images=4` -> `--num_images=4`: absl flag names have underscores; the docs spell them with dashes."""
    def fix(arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        name, sep, value = arg[2:].partition("=")
        return "--" + name.replace("-", "_") + sep + value
    return [argv[0]] + [fix(arg) for arg in argv[1:]]


def _sample(argv: list[str]) -> int:
    from sdjax.config import SCHEDULERS

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A `sdjax train` workdir: samples from its newest checkpoint.", flag_values=fv)
    flags.DEFINE_integer("step", None, "With --workdir: that checkpoint step instead of the newest.", flag_values=fv)
    flags.DEFINE_string("pretrained", None, "A local diffusers-format folder (instead of --workdir).", flag_values=fv)
    flags.DEFINE_boolean("ema", True, "Use the run's EMA UNet weights when it kept them.", flag_values=fv)
    flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for more: one grid row each).", flag_values=fv)
    flags.DEFINE_string("negative_prompt", "", "What guidance steers away from ('' = unconditional).",
                        flag_values=fv)
    flags.DEFINE_integer("num_images", 4, "Images per prompt (grid columns; image j uses seed offset j).",
                         flag_values=fv)
    flags.DEFINE_enum("scheduler", "ddim", SCHEDULERS, "Sampling scheduler.", flag_values=fv)
    flags.DEFINE_integer("steps", 50, "Denoising steps.", flag_values=fv)
    flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: conditional only).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Same seed, same images.", flag_values=fv)
    flags.DEFINE_string("out", "grid.png", "The grid PNG ('' writes none).", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Also one PNG per image in this folder.", flag_values=fv)
    flags.DEFINE_enum("precision", None, ["bf16", "fp32"], "Compute dtype (default: the run's; bf16 for "
                      "--pretrained).", flag_values=fv)
    flags.mark_flags_as_required(["prompt"], flag_values=fv)
    _parse(fv, _dashes_to_underscores(argv))

    import json

    from sdjax import sample as sample_lib
    from sdjax.checkpoint import NoCheckpointError
    from sdjax.models import PretrainedFolderError
    from sdjax.train import enable_compilation_cache

    try:
        config, params, step = sample_lib.load_for_sampling(fv.workdir, fv.step, fv.pretrained, fv.ema)
        if fv.precision:
            config.train.precision = fv.precision
        enable_compilation_cache(config.train.compilation_cache_dir)
        summary = sample_lib.sample_to_files(
            config, params, fv.prompt, fv.num_images, fv.out, fv.out_dir, fv.negative_prompt, fv.scheduler,
            fv.steps, fv.guidance, fv.seed)
    except (sample_lib.SampleSourceError, NoCheckpointError, PretrainedFolderError, ValueError) as e:
        sys.exit(f"sdjax sample: {e}")
    print(json.dumps({"step": step, **summary}))
    return 0


def _export(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A `sdjax train` workdir.", flag_values=fv)
    flags.DEFINE_integer("step", None, "That checkpoint step instead of the newest complete one.", flag_values=fv)
    flags.DEFINE_string("out", None, "The folder to write (must not exist yet).", flag_values=fv)
    flags.DEFINE_enum("format", "pytorch", ["pytorch", "flax"], "pytorch: safetensors for StableDiffusionPipeline; "
                      "flax: msgpack for FlaxStableDiffusionPipeline.", flag_values=fv)
    flags.DEFINE_boolean("ema", True, "Export the run's EMA UNet weights when it kept them (--noema: the raw ones).",
                         flag_values=fv)
    flags.DEFINE_boolean("merge_lora", False, "A LoRA run: write a full pipeline folder with the adapters merged "
                         "into the weights, instead of pytorch_lora_weights.safetensors.", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)
    _parse(fv, _dashes_to_underscores(argv))

    import dataclasses
    import json

    from sdjax import export as export_lib
    from sdjax.checkpoint import NoCheckpointError
    from sdjax.models import PretrainedFolderError

    try:
        result = export_lib.export(fv.workdir, fv.out, fv.step, fv.format, fv.ema, fv.merge_lora)
    except (export_lib.ExportError, NoCheckpointError, PretrainedFolderError) as e:
        sys.exit(f"sdjax export: {e}")
    print(json.dumps(dataclasses.asdict(result)))
    return 0


def _eval_demo(argv: list[str]) -> int:
    from sdjax.config import SCHEDULERS

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A `sdjax train` workdir of the demo (data.source=demo); a `sdjax "
                        "train-vae` one: its reconstructions are scored.", flag_values=fv)
    flags.DEFINE_integer("step", None, "That checkpoint step instead of the newest.", flag_values=fv)
    flags.DEFINE_integer("num_images", 8, "Images per held-out prompt (a VAE run: scenes per shape).",
                         flag_values=fv)
    flags.DEFINE_enum("scheduler", None, SCHEDULERS, "Sampling scheduler (default: the run's sample.scheduler).",
                      flag_values=fv)
    flags.DEFINE_integer("steps", None, "Denoising steps (default: the run's sample.steps).", flag_values=fv)
    flags.DEFINE_float("guidance", None, "Guidance scale (default: the run's sample.guidance).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Same seed, same images, same scores.", flag_values=fv)
    flags.DEFINE_boolean("ema", True, "Score the run's EMA UNet weights when it kept them (--noema: the raw ones).",
                         flag_values=fv)
    flags.DEFINE_string("out", None, "Also write the scored images as a grid PNG (rows: the held-out "
                        "prompts, then their seen counterparts; a VAE run: circles, squares, triangles).",
                        flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)
    _parse(fv, _dashes_to_underscores(argv))

    import json

    from sdjax import demo_eval
    from sdjax.checkpoint import NoCheckpointError

    try:
        report = demo_eval.evaluate(fv.workdir, fv.step, fv.num_images, fv.scheduler, fv.steps, fv.guidance,
                                    fv.seed, fv.out, fv.ema)
    except (demo_eval.NotADemoRunError, NoCheckpointError, ValueError) as e:
        sys.exit(f"sdjax eval-demo: {e}")
    print(json.dumps(report))
    return 0


COMMANDS = {"train": _train, "plan": _plan, "cache-latents": _cache_latents, "sample": _sample, "export": _export,
            "train-vae": _train_vae, "eval-demo": _eval_demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"sdjax: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command != "export":  # the one command that uses diffusers' and transformers' PyTorch classes
        import_without_torch()
    if command != "plan":  # `sdjax plan` names the TPU slice it compiles for (plan.target_devices)
        libtpu_host.quiet_start_up()
    return COMMANDS[command]([f"sdjax {command}"] + argv[2:])


if __name__ == "__main__":
    sys.exit(main())
