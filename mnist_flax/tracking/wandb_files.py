"""Reads a W&B run's `.wandb` file: what an offline run holds, before or without `wandb sync`.

The file is a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by
LevelDB-log framed records (32 KiB blocks; each chunk: CRC-32C, length, type
FULL/FIRST/MIDDLE/LAST), each record a serialized `wandb_internal_pb2.Record`.
wandb 0.31 no longer ships a Python reader; `sync` and the tests use this one.
"""

import glob
import json
import os
import struct
from collections.abc import Iterator

from mnist_flax.tracking import wandb_internals

HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = len(HEADER)
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            offset += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        if kind == 0 and length == 0:  # preallocated zeros at the end of a file being written
            return
        start = offset + CHUNK_HEADER
        if start + length > len(data):  # a run killed mid-write: what came before is whole
            return
        yield kind, data[start : start + length]
        offset = start + length


def read_records(path: str):
    """Yields each `wandb_internal_pb2.Record` of a .wandb file in order."""
    record_type = wandb_internals.record_type()
    if record_type is None:
        raise ValueError(f"{path}: this wandb has no .wandb record type (tracking/wandb_internals.py)")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a W&B run file (bad header)")
    pending = b""
    for kind, payload in _chunks(data):
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown chunk type {kind}")
        record = record_type()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def run_file(run_dir: str) -> str:
    """The .wandb file inside an offline (or online) run directory."""
    matches = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if not matches:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    return matches[0]


def summarize(path: str) -> dict:
    """What a run file records: run id, config, history rows, summary, artifacts, exit code."""
    result = {"run_id": None, "config": {}, "history": [], "summary": {}, "artifacts": [], "exit_code": None}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run_id"] = record.run.run_id
            for item in record.run.config.update:
                result["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                result["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            result["history"].append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                result["summary"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifact = record.artifact
            result["artifacts"].append(
                {
                    "type": artifact.type,
                    "name": artifact.name,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "files": [entry.path for entry in artifact.manifest.contents],
                    "references": [entry.ref for entry in artifact.manifest.contents if entry.ref],
                    "digest": artifact.digest,
                    # An input of the run (declared with use_artifact), not one of its outputs.
                    "used": bool(artifact.use_after_commit),
                }
            )
        elif kind == "exit":
            result["exit_code"] = record.exit.exit_code
    return result


def config_values(summary: dict) -> dict:
    """The run's config with W&B's {"value": ...} wrappers removed."""
    return {
        k: (v["value"] if isinstance(v, dict) and set(v) == {"value"} else v)
        for k, v in summary["config"].items()
        if k != "_wandb"
    }
