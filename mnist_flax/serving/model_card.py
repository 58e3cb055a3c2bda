"""The model card beside an export: what the model is, what it was trained on, how well it does, where from.

`model_card.json` for machines (the keys below), `model_card.md` for people: the data set and its fingerprint
(provenance.json's `data`), the git commit, the config, the validation and test metrics (final_metrics.json),
the per-class accuracy on the test split (the test report's per-class recall), the export's date, format and
file sizes, and the run it came from.
"""

import datetime
import json
from importlib import metadata

import numpy as np

# The files of an export folder: the model (one per format), then the card.
MODEL_FILES = {"onnx": "model.onnx", "jax": "model.jaxexport"}
JSON_NAME = "model_card.json"
MARKDOWN_NAME = "model_card.md"
# The input's and the output's shapes are the data set's, as the run recorded it: [N, height, width, channels] in,
# [N, classes] out (`build`).
INPUT = {
    "name": "images",
    "dtype": "uint8",
    "description": "raw images, 0-255, as in the data set the model was trained on; N is dynamic",
}
OUTPUT = {"name": "probabilities", "dtype": "float32", "description": "class probabilities"}
PREPROCESSING = "inside the model: pixels / 255 as float32 (steps.preprocess)"
VERSIONS = ("jax", "flax", "onnx", "onnxruntime")


def per_class_accuracy(test: dict, class_names: list[str]) -> list[dict]:
    """Each class's share of its test examples predicted right: the test report's per-class recall, with the
    class's examples from its confusion matrix (rows are the true classes). None for a class without examples."""
    recall = (test.get("per_class") or {}).get("recall") or []
    examples = [int(sum(row)) for row in test.get("confusion_matrix") or []]
    rows = []
    for label, name in enumerate(class_names):
        count = examples[label] if label < len(examples) else 0
        accuracy = float(recall[label]) if count and label < len(recall) else None
        rows.append({"label": label, "class": name, "accuracy": accuracy, "examples": count})
    return rows


def build(record, trained, provenance: dict, config: dict, fmt: dict, files: dict[str, int]) -> dict:
    """The card's content.

    Args:
      record: the run (records.runs.RunRecord, finished).
      trained: the exported model (serving.trained.TrainedModel).
      provenance: the run's provenance.json; config: its config.json.
      fmt: {"name": "onnx"|"jax", "file": ..., and what the format adds (opset, platforms)}.
      files: the export's model file(s) and their sizes in bytes.
    """
    final = record.final
    wandb_config = config.get("wandb") or {}
    return {
        "model": {
            "name": trained.model_config["name"],
            "config": trained.model_config,
            "parameters": int(sum(np.size(p) for p in _leaves(trained.params))),
            "checkpoint_step": trained.step,
            "checkpoint": trained.checkpoint,
        },
        "format": fmt,
        "input": {**INPUT, "shape": ["N", *trained.image_shape]},
        "output": {**OUTPUT, "shape": ["N", len(trained.class_names)]},
        "preprocessing": PREPROCESSING,
        "class_names": trained.class_names,
        "data": {
            "name": trained.data_name,
            "source": (final.get("data") or {}).get("source"),
            "image_shape": list(trained.image_shape),
            "fingerprint": provenance.get("data"),
        },
        "git": provenance.get("git") or record.git,
        "metrics": {k: final.get(k) for k in ("best_validation", "validation", "test")},
        "per_class_accuracy": per_class_accuracy(final.get("test") or {}, trained.class_names),
        "config": config,
        "run": {
            "name": record.name,
            "workdir": record.path,
            "wandb": {
                "run_id": record.wandb_id,
                "mode": (final.get("wandb") or {}).get("mode"),
                "project": wandb_config.get("project"),
                "entity": wandb_config.get("entity") or None,
            },
        },
        "exported": {
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "by": "python -m mnist_flax export",
            "versions": {name: _version(name) for name in VERSIONS},
        },
        "files": files,
    }


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_section(metrics: dict, per_class: list[dict]) -> list[str]:
    lines = [
        "## Metrics",
        "",
        "| split | accuracy | loss | F1 (macro) | AUROC (macro) | examples |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("validation", "test"):
        report = metrics.get(split) or {}
        cells = [report.get(k) for k in ("accuracy", "loss", "f1_macro", "auroc_macro", "num_examples")]
        lines.append(f"| {split} | " + " | ".join(_number(c) for c in cells) + " |")
    lines += ["", "Per class, on the test split:", ""]
    lines += ["| label | class | accuracy | examples |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['label']} | {r['class']} | {_number(r['accuracy'])} | {r['examples']} |" for r in per_class]
    return lines


def markdown(card: dict) -> str:
    """The card for people."""
    model, data, git, run, metrics = card["model"], card["data"], card["git"], card["run"], card["metrics"]
    fmt, fingerprint = card["format"], data.get("fingerprint") or {}
    commit = f"{git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}"
    lines = [
        f"# Model card: {run['name']} ({model['name']} on {data['name']})",
        "",
        f"A {model['name']} of mnist_flax trained on {data['name']}, exported {card['exported']['at']} as "
        f"{fmt['name']} (`{fmt['file']}`), from the best validation checkpoint (step {model['checkpoint_step']}).",
        "",
        "## Input and output",
        "",
        f"- input `{card['input']['name']}`: {card['input']['dtype']} {card['input']['shape']}, "
        f"{card['input']['description']}",
        f"- output `{card['output']['name']}`: {card['output']['dtype']} {card['output']['shape']}, "
        f"{card['output']['description']}",
        f"- preprocessing: {card['preprocessing']}",
        f"- classes: {', '.join(f'{i} {name}' for i, name in enumerate(card['class_names']))}",
        "",
        *_metrics_section(metrics, card["per_class_accuracy"]),
        "",
        "## Data",
        "",
        f"- data set: {data['name']} from `{data.get('source')}`",
        *(
            f"- {split} split SHA-256: `{fingerprint[split]}`"
            for split in ("train", "validation", "test")
            if split in fingerprint
        ),  # fmt: skip
        *(f"- file `{name}` SHA-256: `{digest}`" for name, digest in sorted((fingerprint.get("files") or {}).items())),
        "",
        "## Provenance",
        "",
        f"- git commit: `{commit}` (branch {git.get('branch')})",
        f"- run: `{run['workdir']}`, W&B run {run['wandb']['run_id'] or 'none'} ({run['wandb']['mode']})",
        f"- model: {json.dumps(model['config'], sort_keys=True)}, {model['parameters']:,} parameters",
        f"- exported by `{card['exported']['by']}`: "
        + ", ".join(f"{k} {v}" for k, v in card["exported"]["versions"].items() if v),
        "",
        "## Files",
        "",
        "| file | bytes |",
        "| --- | ---: |",
        *(f"| `{name}` | {size:,} |" for name, size in card["files"].items()),
        "",
        "## Config",
        "",
        "```json",
        json.dumps(card["config"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)
