"""Classify images: `python -m mnist_flax predict MODEL IMAGE... [--top K] [--json] [--invert]`.

MODEL is an export folder (`python -m mnist_flax export`; run by onnxruntime, without JAX), a run workdir
(its best model), a checkpoints folder or one step of it, or a W&B model artifact `entity/project/name:alias`
(downloaded; needs a key). Each IMAGE is a PNG or JPEG (grey or colour, any size: converted to grey and resized
to 28x28), a `.npy` array (uint8 [28, 28] or [N, 28, 28]) or an IDX images file (gzipped or not);
docs/internals/serving.md says what is done to each. Prints a line per image: the image (and its index in an array
file), the predicted label, its class name and its probability; `--top K` the K most probable classes, `--json`
one JSON document. `--invert` takes 255 - each pixel first (a dark object on a light background).

Exit status: 0 when every image was classified; 2 for bad input (one `error:` line).
"""

import json
import os
import sys

import numpy as np

from mnist_flax import layout
from mnist_flax.commands.export import OneLineParser
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.serving import images, predictor


def classify(model: predictor.Predictor, batches: list[images.Images], top: int, invert: bool) -> list[dict]:
    """One row per image: its name, the predicted label, class and probability, the `top` best, all ten."""
    pixels = np.concatenate([batch.pixels for batch in batches])
    probabilities = model(images.invert(pixels) if invert else pixels)
    rows, offset = [], 0
    for batch in batches:
        for index in range(len(batch.pixels)):
            row = probabilities[offset + index]
            best = np.argsort(-row, kind="stable")[:top]
            ranked = [{"label": int(c), "class": model.class_names[c], "probability": float(row[c])} for c in best]
            rows.append(
                {
                    "image": images.describe(batch, index),
                    "file": batch.path,
                    "index": index if batch.indexed else None,
                    **ranked[0],
                    "top": ranked,
                    "probabilities": [float(p) for p in row],
                }
            )
        offset += len(batch.pixels)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as text: one line per image, K lines with `--top K` (the image named on the first)."""
    width = max([len("image")] + [len(r["image"]) for r in rows])
    names = max([len("class")] + [len(t["class"]) for r in rows for t in r["top"]])
    lines = [f"{'image':{width}s}  label  {'class':{names}s}  probability"]
    for row in rows:
        for rank, entry in enumerate(row["top"]):
            shown = row["image"] if rank == 0 else ""
            lines.append(
                f"{shown:{width}s}  {entry['label']:5d}  {entry['class']:{names}s}  {entry['probability']:.6f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mnist_flax predict", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="an export folder, a run workdir, a checkpoint folder or entity/project/name:alias"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG images, .npy arrays, IDX image files")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="print the K most probable classes (1-10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--invert", action="store_true", help="255 - each pixel first (dark object on light)")
    args = parser.parse_args(argv)
    try:
        if not 1 <= args.top <= predictor.NUM_CLASSES:
            raise ConfigError(f"--top: {args.top} is not between 1 and {predictor.NUM_CLASSES}")
        batches = [images.read(path) for path in args.images]  # every image is checked before the model loads
        model = predictor.load(args.model)
        rows = classify(model, batches, args.top, args.invert)
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    document = {"model": model.describe(), "invert": args.invert, "predictions": rows}
    try:
        print(json.dumps(document, indent=2) if args.json else table(rows), flush=True)
    except BrokenPipeError:  # `predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return layout.EXIT_OK
