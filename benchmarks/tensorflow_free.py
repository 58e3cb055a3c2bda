"""What leaving TensorFlow out of a run saves: import time and memory, a run's peak memory and time, the venv.

    python benchmarks/tensorflow_free.py [--rounds 3] [--before 684e251] [--venv LABEL=PATH ...]

Run it from a venv that has the `tfds` extra (TensorFlow installed), so the "before" side can import it.

- Imports: a fresh interpreter imports what a run's records need (the training loop, the metric writers,
  TensorBoard's protos, W&B), then, as the writers did before, `clu.metric_writers` (which imports TensorFlow);
  seconds and peak RSS of the imports alone. The two alternate round by round.
- A run: `python main.py` of the CNN, one epoch on 4,096 Fashion-MNIST images, W&B offline, TensorBoard and
  checkpoints on, under `/usr/bin/time -v` (peak RSS, wall seconds), from this checkout and from the `--before`
  commit (its files, `git archive`, run with the same interpreter), alternating.
- The venvs: `du` of each `--venv` (e.g. one synced with the `tfds` extra and one without).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import report  # noqa: E402
from benchmarks.common import FASHION_DIR, REPO_ROOT  # noqa: E402

RUN_IMPORTS = (
    "import mnist_flax.training.loop, mnist_flax.tracking.writers, mnist_flax.tracking.tensorboard_writer, wandb"
)
PROBE = """
import resource, sys, time
began = time.perf_counter()
exec(sys.argv[1])
seconds = time.perf_counter() - began
loaded = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, loaded)
"""
IMPORTS = {"now": RUN_IMPORTS, "before (+ clu.metric_writers)": RUN_IMPORTS + "; from clu import metric_writers"}
SETTINGS = ["--config=configs/cnn.py", "--config.num_epochs=1", "--config.data.train_subset=4096"]
SETTINGS += ["--config.data.eval_subset=1000", "--config.wandb.mode=offline", "--config.tensorboard=True"]


def imports(code: str) -> tuple[float, float, bool]:
    """(seconds, peak RSS MiB, TensorFlow loaded) of `code` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, code], cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"tensorflow_free.py: the imports failed:\n{out.stderr[-2000:]}")
    seconds, rss, loaded = out.stdout.split()
    return float(seconds), float(rss), loaded == "True"


def run(checkout: str, workdir: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `python main.py` from `checkout`."""
    command = ["/usr/bin/time", "-v", sys.executable, "main.py", f"--workdir={workdir}", *SETTINGS]
    command += [f"--config.data.local_dir={FASHION_DIR}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MNIST_FLAX_COMPILE_CACHE": "off"}
    began = time.perf_counter()
    out = subprocess.run(command, cwd=checkout, capture_output=True, text=True, env=env, timeout=1200)
    wall = time.perf_counter() - began
    if out.returncode:
        raise SystemExit(f"tensorflow_free.py: main.py in {checkout} failed:\n{out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1])
    return wall, rss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="684e251", help="the last commit whose writers imported TensorFlow")
    parser.add_argument("--venv", action="append", default=[], help="LABEL=PATH of a venv to measure with du")
    parser.add_argument("--results", default=report.RESULTS_MD, help="RESULTS.md to rewrite ('' for none)")
    args = parser.parse_args(argv)
    started = report.start()
    started["command"] = "python benchmarks/tensorflow_free.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seen = {name: [] for name in IMPORTS}
    runs = {"this checkout": [], f"{args.before} (before)": []}
    with tempfile.TemporaryDirectory(prefix="tensorflow-free-bench-") as work:
        before = os.path.join(work, "before")
        os.makedirs(before)
        archive = subprocess.run(["git", "-C", REPO_ROOT, "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", before], input=archive.stdout, check=True)
        for r in range(args.rounds):
            for name, code in IMPORTS.items():
                seen[name].append(imports(code))
                print(f"round {r} imports {name}: {seen[name][-1]}", flush=True)
            for name, checkout in zip(runs, (REPO_ROOT, before), strict=True):
                runs[name].append(run(checkout, os.path.join(work, f"run-{r}-{len(runs[name])}-{checkout == before}")))
                print(f"round {r} run {name}: {runs[name][-1]}", flush=True)
    sizes = []
    for spec in args.venv:
        label, _, path = spec.partition("=")
        du = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True)
        sizes.append({"venv": label, "gib": int(du.stdout.split()[0]) / 1024**2})
    result = {
        "summary": "Measured on a loaded machine (other engineers' test suites on the same 2 cores): read the "
        "ratios, not the absolute seconds. Imports: bytecode cached, a fresh interpreter each.",
        "tables": [
            {
                "columns": [
                    ["imports", "name", "{}"],
                    ["seconds (median)", "seconds", "{:.2f}"],
                    ["peak RSS MiB (median)", "rss", "{:.0f}"],
                    ["TensorFlow loaded", "tf", "{}"],
                ],
                "rows": [
                    {
                        "name": name,
                        "seconds": statistics.median(s[0] for s in values),
                        "rss": statistics.median(s[1] for s in values),
                        "tf": "yes" if values[0][2] else "no",
                    }
                    for name, values in seen.items()
                ],
            },
            {
                "columns": [
                    ["python main.py (CNN, 1 epoch, 4,096 images, W&B offline, TensorBoard)", "name", "{}"],
                    ["wall s (median)", "wall", "{:.1f}"],
                    ["rounds", "rounds", "{}"],
                    ["peak RSS MiB (median)", "rss", "{:.0f}"],
                ],
                "rows": [
                    {
                        "name": name,
                        "wall": statistics.median(s[0] for s in values),
                        "rounds": ", ".join(f"{s[0]:.1f}" for s in values),
                        "rss": statistics.median(s[1] for s in values),
                    }
                    for name, values in runs.items()
                ],
            },
        ]
        + ([{"columns": [["venv", "venv", "{}"], ["size GiB", "gib", "{:.2f}"]], "rows": sizes}] if sizes else []),
    }
    if args.results:
        report.record_beside(args.results, "tensorflow_free", result, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
