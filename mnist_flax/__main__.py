"""`python -m mnist_flax COMMAND [ARGS...]`: one entry for every command (mnist_flax/commands/)."""

import importlib
import sys

from mnist_flax.commands import COMMANDS

USAGE = "usage: python -m mnist_flax COMMAND [ARGS...]   (python -m mnist_flax COMMAND --help for its flags)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:\n" + "\n".join(f"  {name:10s} {text}" for name, (_, text) in COMMANDS.items()))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mnist_flax.commands.{COMMANDS[name][0]}")
    if name == "train":  # absl reads the program's name and its flags from argv, as main.py's
        sys.argv = [f"{sys.argv[0]} train", *rest]
        module.main(sys.argv)
        return 0
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
