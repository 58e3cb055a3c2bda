"""A sweep's trials: what a trial costs beyond its training, trials per hour, and what each trial compiles.

    python benchmarks/run.py --only trials

Each variant is one `python -m mnist_flax sweep` of four one-epoch MLP trials, a grid over the learning rate
(1e-3 .. 4e-3), on the Fashion-MNIST IDX files, with a compilation cache of its own, empty at the start
(MNIST_FLAX_COMPILE_CACHE), so the first trial compiles what the others may load:

- `sweep default`: what `python -m mnist_flax sweep` runs (W&B offline, TensorBoard, checkpoints);
- `W&B disabled`: the same with `--wandb-mode disabled`;
- `W&B disabled, no TensorBoard, no checkpoints`: the trial as bare as a sweep allows;
- with `--baseline-rev REV`, also the default sweep of that commit (a git worktree): the "before" of a change.

The variants alternate round by round. Per trial: the worker's seconds (from its start of the trial, forked
from its trial launcher or `python main.py`, to the process's end), the run's own `seconds` (final_metrics.json:
setup, data, compilation, training and validation, up to the test report), and the difference, the overhead;
its compilations (`compilations.ahead_of_time`) and how many of them the persistent cache gave (`from_cache`).
A worker's first trial also waits for its launcher's imports: its overhead is reported apart.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks.common import REPO_ROOT, median
from benchmarks.sections import Context, git, interleaved, worktree
from mnist_flax import layout
from mnist_flax.records import files

LEARNING_RATES = "0.001,0.002,0.003,0.004"
VARIANTS = {
    "sweep default (W&B offline, TensorBoard, checkpoints)": [],
    "W&B disabled": ["--wandb-mode", "disabled"],
    "W&B disabled, no TensorBoard, no checkpoints": [
        "--wandb-mode", "disabled", "--set", "tensorboard=False", "--set", "checkpoint.enabled=False",
    ],
}  # fmt: skip


def sweep(ctx: Context, extra: list[str], tree: str = REPO_ROOT) -> dict:
    """One sweep of the learning-rate grid in a fresh root and a fresh compilation cache; its trials' figures."""
    base = tempfile.mkdtemp(prefix="mnist_flax_bench_trials_")
    root = os.path.join(base, "sweep")
    epochs = {"num_epochs": 1} | ({"data.train_subset": 2560, "data.eval_subset": 1000} if ctx.settings.quick else {})
    fields = {"data.local_dir": ctx.data_dir, **epochs}
    command = [sys.executable, "-m", "mnist_flax", "sweep", "--config=configs/mlp.py", f"--root={root}",
               f"--grid=optimizer.learning_rate={LEARNING_RATES}", "--pruner=none",
               *(f"--set={k}={v}" for k, v in fields.items()), *extra]  # fmt: skip
    env = {**os.environ, "MNIST_FLAX_COMPILE_CACHE": os.path.join(base, "xla"), "WANDB_SILENT": "true",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": tree}  # fmt: skip
    try:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if result.returncode:
            raise RuntimeError(f"the sweep failed (exit {result.returncode}): {result.stdout[-1500:]}")
        trials = []
        for name in sorted(os.listdir(root)):
            record = files.read_json(os.path.join(root, name, layout.TRIAL), None)
            final = files.read_json(os.path.join(root, name, layout.FINAL_METRICS), None)
            if record and final:
                trials.append(
                    {
                        "number": record["number"],
                        "launch": record.get("launch", "main.py"),
                        "seconds": record["seconds"],
                        "train_seconds": final["seconds"],
                        "overhead_seconds": record["seconds"] - final["seconds"],
                        "compiles": final["compilations"]["ahead_of_time"],
                        "from_cache": final["compilations"]["from_cache"],
                        "compile_seconds": final["compile_seconds"],
                    }
                )
        return {"wall_seconds": wall, "trials": sorted(trials, key=lambda t: t["number"])}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def section_trials(ctx: Context) -> dict:
    contenders = {label: (lambda extra=extra: sweep(ctx, extra)) for label, extra in VARIANTS.items()}
    with contextlib.ExitStack() as stack:
        if ctx.baseline_rev != "HEAD":
            rev = git("rev-parse", "--short", f"{ctx.baseline_rev}^{{commit}}")
            tree = stack.enter_context(worktree(rev))
            contenders[f"sweep default at {rev} (before)"] = lambda: sweep(ctx, [], tree)
        results = interleaved(contenders, max(1, ctx.settings.rounds - 1))
    rows = []
    for label, sweeps in results.items():
        trials = [t for s in sweeps for t in s["trials"]]
        later = [t for t in trials if t["number"] > 0]  # the trials after the first, which warmed the cache
        per_trial = median([s["wall_seconds"] / max(1, len(s["trials"])) for s in sweeps])
        rows.append(
            {
                "label": label,
                "trial_seconds": median([t["seconds"] for t in trials]),
                "train_seconds": median([t["train_seconds"] for t in trials]),
                "overhead_seconds": median([t["overhead_seconds"] for t in trials]),
                "first_overhead_seconds": median([t["overhead_seconds"] for t in trials if t["number"] == 0]),
                "later_overhead_seconds": median([t["overhead_seconds"] for t in later]) if later else None,
                "trials_per_hour": 3600 / per_trial,
                "first_compiles": median([t["compiles"] - t["from_cache"] for t in trials if t["number"] == 0]),
                "later_compiles": median([t["compiles"] - t["from_cache"] for t in later]) if later else None,
                "compiles": median([t["compiles"] for t in trials]),
                "later_compile_seconds": median([t["compile_seconds"] for t in later]) if later else None,
                "sweeps": sweeps,
            }
        )
    default = rows[0]
    summary = (
        f"{len(default['sweeps'][0]['trials'])} one-epoch MLP trials a sweep, {len(default['sweeps'])} sweep(s) per "
        f"variant, alternating. A trial of the default sweep spends "
        f"**{default['later_overhead_seconds']:.1f} s** beyond its run's own seconds after the worker's first trial "
        f"(the first: {default['first_overhead_seconds']:.1f} s, waiting for the trial launcher's imports); trials "
        f"per hour (the sweep's wall time over its trials, the worker's start included): "
        f"**{default['trials_per_hour']:.0f}**."
    )
    if len(rows) > len(VARIANTS):
        before = rows[-1]
        summary += (
            f" {before['label']}: {before['later_overhead_seconds']:.1f} s after its first trial, "
            f"{before['trials_per_hour']:.0f} trials per hour; the default sweep runs "
            f"{default['trials_per_hour'] / before['trials_per_hour']:.2f}x as many trials an hour."
        )
    return {
        "rows": rows,
        "cpu": common.cpu_model(),
        "summary": summary,
        "tables": [
            {
                "columns": [
                    ["variant", "label", "{}"],
                    ["s a trial", "trial_seconds", "{:.1f}"],
                    ["run's own s", "train_seconds", "{:.1f}"],
                    ["overhead s", "overhead_seconds", "{:.1f}"],
                    ["overhead s, first trial", "first_overhead_seconds", "{:.1f}"],
                    ["overhead s, later trials", "later_overhead_seconds", "{:.1f}"],
                    ["trials/hour", "trials_per_hour", "{:,.0f}"],
                    ["programs a trial", "compiles", "{:.0f}"],
                    ["compiled, first trial", "first_compiles", "{:.0f}"],
                    ["compiled, later trials", "later_compiles", "{:.0f}"],
                    ["compile s, later trials", "later_compile_seconds", "{:.2f}"],
                ],
                "rows": rows,
            }
        ],
        "targets": [
            [
                "a sweep trial's overhead beyond its training < 1.5 s (after a worker's first trial)",
                f"{default['later_overhead_seconds']:.1f} s",
                "met" if default["later_overhead_seconds"] < 1.5 else "missed",
            ]
        ],
    }
