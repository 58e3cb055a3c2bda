"""Trains a model: `python -m mnist_flax train --config=configs/mlp.py [--workdir=runs/x] [--config.FIELD=VALUE ...]`
(`python main.py ...` is the same command). Flags as absl parses them; every failure is one line and exit 2."""

import datetime
import os
import sys

# TensorFlow is only the TensorBoard writer here: keep its start-up chatter out of the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mnist_flax import layout  # noqa: E402
from mnist_flax.config import diff, overrides, schema  # noqa: E402
from mnist_flax.errors import ConfigError, MnistFlaxError, first_line  # noqa: E402

USAGE_EXIT = layout.EXIT_USAGE
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the run writes; default: a fresh folder under runs/.")
config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/cnn.py (or configs/cnn.py:mnist).", lock_config=True
)


def fail(message: str, code: int = USAGE_EXIT):
    """Prints one line to stderr and exits."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config_spec(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def diagnose(argv: list[str]) -> str | None:
    """Explains a failed flag parse in one line: unknown field (with nearest names) or bad value."""
    spec = _config_spec(argv)
    if spec is None:
        return "--config is required, e.g. --config=configs/cnn.py"
    flat = schema.flatten(schema.load_config_file(spec))  # raises ConfigError for a bad file
    try:
        overrides.apply(flat, overrides.from_argv(argv[1:]))
    except MnistFlaxError as e:
        return str(e)
    return None


def spell_booleans(argv: list[str]) -> list[str]:
    """argv with each bool field's `--config.FIELD=VALUE` read by `overrides.parse_value`, the parser of every
    override (sweeps and `diff` too), and written as absl's own parser takes it: so `no` and `yes` work here too."""
    spec = _config_spec(argv)
    if spec is None:
        return argv
    flat = schema.flatten(schema.load_config_file(spec))  # raises ConfigError for a bad file
    spelled = []
    for arg in argv:
        if arg.startswith(overrides.PREFIX) and "=" in arg:
            name, value = overrides.parse_assignment(arg, "argument", allow_empty=True)
            if isinstance(flat.get(name), bool):
                try:
                    arg = f"{overrides.PREFIX}{name}={overrides.parse_value(value, True)}"
                except ConfigError as e:
                    raise ConfigError(f"config field {name!r} {e}") from None
        spelled.append(arg)
    return spelled


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one line and exit status 2."""
    try:
        remaining = flags.FLAGS(spell_booleans(argv))
        # config_flags defers a bad file's error to first use; surface it here.
        if not isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
            raise flags.Error("config file failed to load")
        return remaining
    except (flags.Error, MnistFlaxError, Exception) as e:
        try:
            message = diagnose(argv)
        except MnistFlaxError as diag:
            message = str(diag)
        if message is None:
            message = first_line(e, limit=1000, last=True)
        fail(message)


def train(config, workdir: str, argv: list[str]) -> None:
    """Trains (train_and_evaluate validates the config); the training modules load only now, so `--help` is fast."""
    from mnist_flax.sweeps import study
    from mnist_flax.training import loop

    file_config = schema.load_config_file(_config_spec(argv))
    changes = diff.diff(schema.flatten(file_config), schema.flatten(config))
    loop.train_and_evaluate(
        config,
        workdir,
        overrides=overrides.from_argv(argv[1:]),
        config_changes=changes,
        on_validation=study.reporter_from_environment(
            config.num_epochs
        ),  # a sweep's trial reports to its study and may be pruned
    )


def run_main(fn) -> int:
    """Runs fn; known errors become one line, preemption its own exit status."""
    # Libraries log their own warnings and tracebacks (orbax: "directory is read only", a failed background
    # save); what a user needs comes as one line from us, or as an exception with its traceback if it is a bug.
    logging.set_verbosity(logging.FATAL)
    try:
        fn()
    except MnistFlaxError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", layout.EXIT_INTERRUPTED)
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (fields are set with --config.FIELD=VALUE)")
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return run_main(lambda: train(FLAGS.config, workdir, sys.argv))


HELP = """usage: {program} --config=FILE [--workdir=DIR] [--config.FIELD=VALUE ...]

Trains a model on the config file's data and writes the run to --workdir; a run started again with the same
--workdir resumes from its latest checkpoint. --config.FIELD=VALUE sets any field of the config (repeatable),
e.g. --config.num_epochs=2 --config.wandb.mode=offline; docs/config.md lists the fields.
{flags}

absl's own flags (logging, JAX, ...): --helpfull"""


def main(argv: list[str]) -> None:
    """The command: argv as sys.argv holds it (the program, then the flags)."""
    if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv[1:]):
        # absl's --help lists only the flags of the program's main module, which defines none here.
        program = "python -m mnist_flax train" if argv[0].endswith(" train") else "python main.py"
        print(HELP.format(program=program, flags=FLAGS.module_help(__name__)))
        sys.exit(0)
    flags.mark_flags_as_required(["config"])
    app.run(_main, argv=argv, flags_parser=parse_flags)
