"""The `sdjax` command: `sdjax <subcommand> [flags]`. Each subcommand parses its own absl flags;
`--config` takes an ml_collections config file whose every field can be overridden (`--config.train.steps=5`).
"""

from __future__ import annotations

import ast
import sys

from absl import flags, logging
from ml_collections import config_flags

USAGE = """usage: sdjax <command> [flags]

commands:
  train    train (fine-tune or from scratch): --config FILE --workdir DIR [--config.KEY=VALUE ...]

`sdjax <command> --help` lists a command's flags."""


def _parse(flag_values: flags.FlagValues, argv: list[str]) -> None:
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


def _train(argv: list[str]) -> int:
    fv = flags.FlagValues()
    # sys_argv: config_flags finds the --config.KEY overrides in this argv, not in sys.argv.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and samples go.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
    _parse(fv, argv)

    from sdjax import train as train_lib
    from sdjax.config import ConfigError

    try:
        result = train_lib.train(fv.config, fv.workdir)
    except ConfigError as e:
        sys.exit(f"sdjax train: {e}")
    print(train_lib.summarize(result))
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"sdjax: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[command]([f"sdjax {command}"] + argv[2:])


if __name__ == "__main__":
    sys.exit(main())
