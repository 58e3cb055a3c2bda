"""results.json and RESULTS.md: each section's entry is recorded with its date, command, load and CPU, and rendered.

A section's result names its own `tables` (columns: [header, row key, format]), `summary` and `targets` rows, so one
renderer serves every section, those of cpu_studies.py included. Standard library only (with common.py).
"""

import json
import os

from benchmarks.common import format_table, load_average, machine_facts
from mnist_flax.records.provenance import package_versions

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_JSON, RESULTS_MD, NOTES_MD = (os.path.join(HERE, f) for f in ("results.json", "RESULTS.md", "notes.md"))
HARNESS = 2  # entries from the harness before this one (no `harness` field) are listed, not rendered
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "torch", "numpy", "wandb", "tensorflow-cpu")
TITLES = {
    "throughput": "Training throughput (steady state), evaluation, compile time and peak memory",
    "scaling": "Data parallelism: 1, 2, 4, 8 simulated CPU devices",
    "overhead": "Overheads: metric writers and checkpoints",
    "time_to_90": "Time to 90% validation accuracy (default CNN config)",
    "accuracy": "Accuracy in budget (default CNN config, 10 epochs)",
    "baseline": "Old against new: the default CNN run of a previous commit beside this checkout",
    "cnn_cpu": "CPU studies: the CNN's step on XLA's CPU backend (cpu_studies.py)",
    "whole_run": "The whole default run against PyTorch eager and torch.compile (10 epochs, validation each epoch)",
    "roofline": "Where the CNN's step goes, against the cores' fp32 peak, and torch.compile's beside it (roofline.py)",
    "bf16": "bfloat16 against float32 for the pieces of the CNN's step (bf16.py)",
    "install": "Setup: a fresh venv from uv.lock, pip against uv (install.py)",
    "compile_cache": "Start-up: a first and a second start with the persistent compilation cache (compile_cache.py)",
    "trials": "Sweep trials: the overhead beyond training, trials per hour, compiles per trial (trials.py)",
    "tensorflow_free": "Without TensorFlow (issue 36): imports, a run's start and peak memory, the environment, "
    "the CPU image (tensorflow_free.py)",
}
NOTES = {
    "compile_cache": "Each round, `python main.py` twice with one cache folder, empty before the first start: the "
    "first compiles every program and writes it, the second loads it. Compile seconds are the run's own "
    "`compile_seconds` (the train step and the two predicts, ahead of time); wall seconds the whole process. "
    "The other sections run with the cache off (a first start each time).",
    "bf16": "Each piece as the default step runs it (batch 128, the convolutions on 8 pieces of 16), on float32 "
    "data cast to bfloat16 inside the compiled function with float32 accumulation, as a mixed-precision model with "
    "float32 parameters computes; the two dtypes alternate round by round, and the speed-up is the median of the "
    "round-by-round ratios of float32 to bfloat16 time.",
    "install": "Both installers put exactly uv.lock's packages for this machine into a new venv: uv with "
    "`uv sync --locked` (what `make setup` runs), pip with `pip install --require-hashes` of `uv export`'s "
    "requirements file (the same pins and hashes). Cold: an empty download cache, every wheel from the package "
    "index; warm: the cache of the cold start, a fresh venv. The installers alternate round by round; pip / uv is "
    "the median of round-by-round ratios. Network-bound: the figures move with the registry's speed.",
    "whole_run": "Like for like: the default CNN recipe (AdamW 3e-3, warmup-cosine, label smoothing 0.1, dropout 0.25, "
    "batch 128, 10 epochs, validation after each) on Fashion-MNIST in memory, two threads each, every contender a "
    "fresh process per round, the rounds alternating; each ratio is the median of round-by-round ratios of training "
    "seconds. Ours with tracking off is `train_and_evaluate` (its `seconds`: setup, reading the IDX files and "
    "compilation included); ours tracked is `python main.py --config=configs/cnn.py` with W&B offline, TensorBoard "
    "and checkpoints on. The PyTorch peers: `torch_loop.py`, eager and `torch.compile(model)` (inductor); their "
    "test accuracy is the last epoch's, ours the validation-best model's. The time to 93% test accuracy counts from "
    "the process's start; for the peers the test set is evaluated after each epoch (its own seconds taken out), for "
    "ours each epoch's checkpoint is evaluated afterwards (`eval_only`) and the time is when that epoch's validation "
    "line appeared.",
    "roofline": "First the pieces alone (whole batch, one step a call) against the cores' fp32 peak, FLOPs from "
    "XLA's cost analysis; then the library's default step (8 pieces, 3 steps a call) under XLA's profiler, each "
    "executed fusion under the model piece its HLO metadata names. Thread time is summed over the threads of both "
    "cores; a convolution's GFLOP/s is its FLOPs over its own time, so one near a core's peak runs at the roofline "
    "while it runs. In three rounds alternating with that profile (each side's table its round with the faster "
    "untraced step, the one least disturbed by other jobs), the resident-data torch.compile peer of the whole run "
    "(torch_profile.py: same model, AdamW and schedule, label smoothing, dropout, batch 128, two threads, data "
    "resident, batches gathered by index), 30 steps of warm-up, 60 timed, 60 under torch.profiler (CPU); each op's "
    "self time on the main thread under the piece its name, shapes or enclosing op names, inductor's C++ kernels "
    "profiled by name, Python outside any op under 'other'. Its last table lists the kernels inductor generated "
    "(read back from its fresh cache) and the library kernels the generated code calls.",
    "throughput": "Every contender runs in a fresh process per round, the rounds alternating. Ours is "
    "`train.train_and_evaluate` itself on one epoch (tracking, TensorBoard and checkpoints off); its images/s is "
    "the median of its `train/images_per_second` log intervals after the first (which holds the warm-up), its "
    "eval images/s the validation set over `val/eval_seconds` (forward pass and the full report), its compile "
    "time the run's `compile_seconds`, its peak RSS that of the whole run (TensorFlow for the writers included). "
    "The peers time half an epoch after a warm-up and evaluate the 10,000 test images. Ratios are medians of the "
    "round-by-round ratios; `spread` = (max - min) / median of the rounds.",
    "scaling": "The default CNN run at batch 128 in a process per device count (`jax_num_cpu_devices`), the batch "
    "split over the mesh by the library; the counts alternate over two passes. This machine has 2 cores, so more "
    "devices cannot be faster: the test is that it runs and agrees. Agreement: after the same 20 steps from the "
    "same start, the largest difference of any of 1,000 x 10 test probabilities (predictions.csv, 6 decimals) "
    "from the 1-device run.",
    "time_to_90": "`train_and_evaluate` of the default config, seed 0: the training seconds (compile and "
    "evaluation apart) before the first validation at or above 90%. The test set is used once, at the end.",
    "accuracy": "`train_and_evaluate` as `make train` runs it (checkpoints, W&B and TensorBoard off): the test "
    "accuracy of the model selected on validation accuracy.",
    "baseline": "Each tree's own `train.train_and_evaluate` in a child process whose working directory is that "
    "tree (so its own `mnist_flax` is imported), the default CNN config for one epoch (`data.eval_subset` 1,000), "
    "interleaved round by round; images/s as in the throughput section.",
}


def load(path: str = RESULTS_JSON) -> dict:
    """The recorded results, or none."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record_beside(md_path: str, name: str, result: dict, started: dict) -> dict:
    """`record` for a standalone script's `--results PATH`: the entry goes into results.json beside PATH, and the
    Machine header stays as the throughput sections wrote it."""
    json_path = os.path.join(os.path.dirname(os.path.abspath(md_path)), "results.json")
    return record(load(json_path), name, result, started, json_path, md_path, machine=False)


def record(
    results: dict, name: str, result: dict, started: dict, json_path: str, md_path: str, machine: bool = True
) -> dict:
    """Adds a section's entry (`started`: machine_facts() and load before it) and rewrites both files.

    `machine=False` leaves the file's Machine header (the throughput sections' machine and versions) as it is,
    for a section that is about something else (install.py); the entry still names its own CPU.
    """
    import time

    entry = {
        "result": result,
        "command": started["command"],
        "date": started["date"],
        "minutes": (time.time() - started["time"]) / 60,
        "load_before": started["load"],
        "load_after": load_average(),
        "cpu": started["cpu"],
        "harness": HARNESS,
    }
    results[name] = entry
    if machine or "_meta" not in results:
        results["_meta"] = {"machine": {k: v for k, v in started.items() if k not in ("time", "load")}}
        results["_meta"]["versions"] = package_versions(VERSIONS)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1, default=float)
    if md_path:
        with open(md_path, "w") as f:
            f.write(render_markdown(results))
    return entry


def start() -> dict:
    """What `record` needs from before a section: the machine, the date, the command and the load."""
    import time

    return {**machine_facts(), "load": load_average(), "time": time.time()}


def cell(value, pattern: str) -> str:
    """A value through its format pattern; "-" for None or NaN."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return pattern.format(value)


def render_table(table: dict) -> str:
    """A section's table: its caption, then one row per result row."""
    columns, rows = table["columns"], table["rows"]
    align = "".join("l" if rows and isinstance(rows[0].get(key), str) else "r" for _, key, _ in columns)
    cells = [[cell(row.get(key), pattern) for _, key, pattern in columns] for row in rows]
    body = format_table([header for header, _, _ in columns], cells, align) if rows else "(not measured in this run)"
    return f"{table['caption']}\n\n{body}" if table.get("caption") else body


def render_entry(name: str, entry: dict) -> str:
    """A section's heading, provenance, note, summary and tables."""
    result = entry["result"]
    parts = [
        f"## {TITLES.get(name, name)}",
        f"`{entry['command']}` on {entry['date']}, {entry['minutes']:.1f} min, {entry['cpu']}; load average "
        f"{entry['load_before']} before, {entry['load_after']} after.",
    ]
    parts += [NOTES[name]] if name in NOTES else []
    parts += [result["summary"]] if result.get("summary") else []
    parts += [render_table(table) for table in result.get("tables", [])]
    return "\n\n".join(parts)


def targets(results: dict) -> list[list[str]]:
    """Every current section's target rows."""
    return [row for name, e in results.items() if _current(name, e) for row in e["result"].get("targets", [])]


def _current(name: str, entry) -> bool:
    return not name.startswith("_") and entry.get("harness") == HARNESS


def render_markdown(results: dict) -> str:
    """RESULTS.md: the machine, the targets, every current section, the stale ones listed, then notes.md."""
    meta = results.get("_meta", {})
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    lines = [
        "# Benchmarks",
        "Written by `python benchmarks/run.py` (`make bench`) and `python benchmarks/cpu_studies.py`; every figure "
        "comes from the section's run, whose date, command, CPU and load average are given with it. Do not edit "
        "by hand: rerun.",
        "## Machine",
        f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores ({machine.get('cores_usable')} usable), "
        f"{machine.get('memory_gib')} GiB; {machine.get('platform')}\n"
        f"- Python {machine.get('python')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n"
        "- The machine is shared; absolute figures move with the load, so read the ratios, taken round by round "
        "between interleaved contenders, and compare runs at a similar load (PyTorch's OpenMP threads lose more "
        "than XLA when another job takes a core: see the notes).",
        "## Targets",
        format_table(["target", "measured", "status"], targets(results), "lll"),
    ]
    current = [name for name in [*TITLES, *results] if name in results and _current(name, results[name])]
    lines += [render_entry(name, results[name]) for name in dict.fromkeys(current)]
    stale = [f"`{n}` ({e.get('date')})" for n, e in results.items() if not n.startswith("_") and not _current(n, e)]
    if stale:
        lines += [
            "## Not rerun since the harness changed",
            "Kept in results.json, rendered by the harness of their day (`git log benchmarks/RESULTS.md`): "
            + ", ".join(stale)
            + ".",
        ]
    if os.path.exists(NOTES_MD):
        with open(NOTES_MD) as f:
            lines += ["## Notes (written by hand, from these figures)", f.read().strip()]
    return "\n\n".join(lines) + "\n"
