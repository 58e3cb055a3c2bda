"""What the persistent compilation cache saves: the compile time of a first and a second start of one run.

    python benchmarks/compile_cache.py [--rounds 2] [--config configs/cnn.py]

Each round: `python main.py` of the config (one epoch on a 3,000-image subset, tracking and checkpoints off)
with an empty cache folder (a first start: every program compiled and written), then the same command again
(a second start: every program loaded). The compile time is the run's own `compile_seconds` (the train step and
the two predicts, ahead of time); the wall time is the whole process, start-up included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import report  # noqa: E402
from benchmarks.common import FASHION_DIR, REPO_ROOT  # noqa: E402

SETTINGS = ["--config.num_epochs=1", "--config.data.train_subset=3000", "--config.data.eval_subset=1000"]
SETTINGS += ["--config.wandb.mode=disabled", "--config.tensorboard=False", "--config.checkpoint.enabled=False"]


def start(config: str, cache: str, workdir: str) -> tuple[float, float, int]:
    """(compile seconds, wall seconds, programs from the cache) of one `python main.py` with that cache."""
    command = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}", *SETTINGS]
    command += [f"--config.data.local_dir={FASHION_DIR}", f"--config.compile_cache={cache}"]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - began
    if result.returncode:
        raise SystemExit(f"compile_cache.py: main.py failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    return final["compile_seconds"], wall, final["compilations"]["from_cache"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="configs/cnn.py")
    parser.add_argument("--results", default=report.RESULTS_MD, help="RESULTS.md to rewrite ('' for none)")
    args = parser.parse_args(argv)
    started = report.start()
    started["command"] = "python benchmarks/compile_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seen = {"first": [], "second": []}
    with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as work:
        for r in range(args.rounds):
            cache = os.path.join(work, f"cache-{r}")
            for which in ("first", "second"):
                seen[which].append(start(args.config, cache, os.path.join(work, f"run-{r}-{which}")))
                print(f"round {r} {which} start: compile {seen[which][-1][0]:.1f} s", flush=True)
    ratios = [a[0] / b[0] for a, b in zip(seen["first"], seen["second"], strict=True)]
    rows = [
        {
            "start": which,
            "compile": statistics.median(s[0] for s in seen[which]),
            "rounds": ", ".join(f"{s[0]:.1f}" for s in seen[which]),
            "wall": statistics.median(s[1] for s in seen[which]),
            "cached": seen[which][-1][2],
            "ratio": statistics.median(ratios) if which == "second" else 1.0,
        }
        for which in ("first", "second")
    ]
    result = {
        "summary": f"`{args.config}`: one epoch on a 3,000-image subset, tracking and checkpoints off.",
        "tables": [
            {
                "columns": [
                    ["start", "start", "{}"],
                    ["compile s (median)", "compile", "{:.1f}"],
                    ["rounds", "rounds", "{}"],
                    ["wall s (median)", "wall", "{:.1f}"],
                    ["programs from the cache", "cached", "{}"],
                    ["first / second compile", "ratio", "{:.1f}x"],
                ],
                "rows": rows,
            }
        ],
    }
    if args.results:
        report.record_beside(args.results, "compile_cache", result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
