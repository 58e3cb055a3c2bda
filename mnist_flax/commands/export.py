"""Export a run's best model: `python -m mnist_flax export RUN [--format onnx|jax] [--out DIR] [--no-wandb]`.

Writes the model of the run's best validation step, with its preprocessing, as one file a runtime outside this
code base runs: ONNX (`model.onnx`, the default, converted by jax2onnx; onnxruntime or any ONNX runtime) or JAX's
serialized `jax.export` program (`model.jaxexport`). Its input is raw uint8 images [N, height, width, channels]
([N, 28, 28, 1] for the MNIST family), its output the class probabilities [N, classes]. Beside it,
model_card.json and model_card.md. The folder is DIR (default RUN/export/),
which must be new or empty. A run tracked in W&B logs the export as a `model-export` artifact of its W&B
run (offline: a new segment in RUN/wandb/, uploaded by `sync`); `--no-wandb` skips that.

Exit status: 0 when written; 2 for bad input (one `error:` line; nothing written, nothing of the run changed).
"""

import argparse
import sys

from mnist_flax import layout
from mnist_flax.errors import MnistFlaxError, first_line
from mnist_flax.serving import export


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line on stderr and exit status 2, as every other bad input."""

    def error(self, message: str):
        print(f"error: {message} (python -m mnist_flax {self.prog.split()[-1]} --help)", file=sys.stderr)
        sys.exit(layout.EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mnist_flax export", description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="a finished run's workdir")
    parser.add_argument("--format", default="onnx", help=f"{' or '.join(export.FORMATS)} (default onnx)")
    parser.add_argument(
        "--out", metavar="DIR", help="the folder to write (default RUN/export/): a new one, or an empty one"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log the export to the run's W&B run")
    args = parser.parse_args(argv)
    try:
        exported = export.export_run(args.run, args.format, args.out)
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    card = exported.card
    test = (card["metrics"].get("test") or {}).get("accuracy")
    print(
        f"exported the {card['model']['name']} of {card['run']['workdir']} (step {card['model']['checkpoint_step']}"
        + (f", test accuracy {test:.4f}" if test is not None else "")
        + f") as {args.format} to {exported.folder}"
    )
    for name, size in exported.files.items():
        print(f"  {name:18s} {size:>12,} bytes")
    if not args.no_wandb:
        try:
            logged = export.log_to_wandb(exported, args.run, args.format)
        except Exception as e:  # the export is written; W&B's failure is reported, not fatal
            print(f"warning: the export is written, but W&B did not log it: {first_line(e)}", file=sys.stderr)
            return layout.EXIT_OK
        if logged is None:
            print("W&B: the run has no W&B run; the export is not logged")
        elif logged["mode"] == "offline":
            print(f"W&B: artifact {logged['name']} ({logged['type']}) logged offline in {logged['folder']}")
            print(f"  upload it with: python -m mnist_flax sync {card['run']['workdir']}")
        else:
            print(f"W&B: artifact {logged['name']} ({logged['type']}) logged to run {logged['run_id']}")
    return layout.EXIT_OK
