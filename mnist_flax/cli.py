"""What `main.py` needs beyond flags: one-line errors, override diagnosis, the call."""

import sys

import ml_collections
from absl import flags, logging

from mnist_flax import config_utils, overrides
from mnist_flax.errors import MnistFlaxError

USAGE_EXIT = 2


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
    flat = config_utils.flatten(config_utils.load_config_file(spec))  # raises ConfigError for a bad file
    try:
        overrides.apply(flat, overrides.from_argv(argv[1:]))
    except MnistFlaxError as e:
        return str(e)
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one line and exit status 2."""
    try:
        remaining = flags.FLAGS(argv)
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
            lines = [line for line in str(e).splitlines() if line.strip()]
            message = lines[-1] if lines else type(e).__name__
        fail(message)


def train(config, workdir: str, argv: list[str]) -> None:
    """Validates, then trains; the training modules load only now, so `--help` stays fast."""
    from mnist_flax import config_diff, study
    from mnist_flax import train as train_lib

    config_utils.validate(config)
    file_config = config_utils.load_config_file(_config_spec(argv))
    changes = config_diff.diff(config_utils.flatten(file_config), config_utils.flatten(config))
    train_lib.train_and_evaluate(
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
        fail(str(e), getattr(e, "exit_code", USAGE_EXIT))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    return 0
