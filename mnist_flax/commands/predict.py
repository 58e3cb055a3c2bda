"""Classify images: `python -m mnist_flax predict MODEL IMAGE... [--top K] [--json] [--invert]`.

MODEL is an export folder (`python -m mnist_flax export`; run by onnxruntime, without JAX), a run workdir
(its best model), a checkpoints folder or one step of it, or a W&B model artifact `entity/project/name:alias`
(downloaded; needs a key). Each IMAGE is a PNG or JPEG (grey or colour, any size: resized to the height and width
of the model's data set, as its run recorded them), a `.npy` array (uint8 [H, W], [N, H, W] or [N, H, W, C] of
that height and width) or an IDX images file (gzipped or not); images with other channels than the model's are
converted, and a line on stderr says so. docs/internals/serving.md says what is done to each. Prints a line per
image: the image (and its index in an array file), the predicted label, its class name and its probability;
`--top K` the K most probable classes, `--json` one JSON document. `--invert` takes 255 - each pixel first (a
dark object on a light background).

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

# The images an export takes when its predictor does not say (exports written before the data set's description
# set their input: 28x28 grey).
EXPORT_IMAGE_SHAPE = (28, 28, 1)


def classify(model: predictor.Predictor, batches: list[images.Images], top: int, invert: bool) -> list[dict]:
    """One row per image: its name, the predicted label, class and probability, the `top` best, all of them.
    `batches` are `images.fit` to the model's image shape."""
    pixels = np.concatenate([batch.pixels for batch in batches])
    if pixels.shape[-1] == 1:  # grey as [N, H, W]: what every predictor takes (an older export nothing else)
        pixels = pixels[..., 0]
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
    parser.add_argument("--top", type=int, default=1, metavar="K", help="print the K most probable classes")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--invert", action="store_true", help="255 - each pixel first (dark object on light)")
    args = parser.parse_args(argv)
    try:
        if args.top < 1:
            raise ConfigError(f"--top: {args.top} is not between 1 and the model's number of classes")
        batches = [images.read(path) for path in args.images]  # every image is checked before the model loads
        model = predictor.load(args.model)
        if args.top > len(model.class_names):
            raise ConfigError(f"--top: {args.top} is not between 1 and {len(model.class_names)} (the model's classes)")
        image_shape = tuple(getattr(model, "image_shape", None) or EXPORT_IMAGE_SHAPE)
        if len(image_shape) == 2:  # an export that takes grey [N, H, W]
            image_shape = (*image_shape, 1)
        batches = [images.fit(batch, image_shape) for batch in batches]
        for note in dict.fromkeys(batch.note for batch in batches if batch.note):
            print(f"note: {note}", file=sys.stderr, flush=True)
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
