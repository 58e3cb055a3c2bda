"""What leaving TensorFlow out of a run saves: imports, a run's memory and start, the environment, the CPU image.

    python benchmarks/tensorflow_free.py [--rounds 3] [--before 684e251] [--venv LABEL=PATH ...] [--images]

Run it from a venv that has the `tfds` extra (TensorFlow installed), so the "before" side can import it. "Before"
is the `--before` commit (the last whose writers imported TensorFlow, through `clu.metric_writers`), "after"
this checkout; both run with this interpreter, so only what each tree imports differs.

- Imports: a fresh interpreter imports what a run's records need (the training loop, the metric writers,
  TensorBoard's protos, W&B), then, as the writers did before, `clu.metric_writers` (which imports TensorFlow);
  seconds of the imports alone, and the interpreter's peak RSS (VmHWM) after them.
- A run: `python main.py` of the CNN, one epoch on 4,096 Fashion-MNIST images, W&B offline, TensorBoard and
  checkpoints on, under `/usr/bin/time -v`, from this checkout and from the `--before` commit's files (`git
  archive`). The compilation cache is warm: each tree has a cache folder of its own (MNIST_FLAX_COMPILE_CACHE),
  filled by one untimed run of the same command before the rounds, and every timed run loads its programs from
  it (`programs from the cache` says how many). Per run: peak RSS and wall seconds of the whole process, and the
  time to the first training step = the `wall_time` of the run's `compile_seconds` TensorBoard event (read back
  with TensorBoard's own `EventFileLoader`) minus the moment the process was launched. Both trees' loop writes
  that scalar at the start step as the last record of `setup`, after the data, the model, the compilation, W&B
  and the writers are ready; only building the periodic actions (no I/O) lies between it and the first step. The
  writers run on a thread of their own, so the event's time is when that thread wrote it, at or just after the
  call.
- Imports and runs alternate round by round, the order rotating (`common.rotation`); ratios are the median of
  the round-by-round ratios. The load average is recorded at each round's start.
- The environments: `du` of each `--venv` (give the before environment first and the after one last; each row's
  ratio is to the last).
- `--images`: the CPU image of both trees (`docker build --build-arg JAX_FLAVOUR=cpu` on the debootstrap base of
  .ci/docker_base.sh, reused when it exists), before from the commit's files, after from this checkout, as
  tests/test_container.py builds it; the size is `docker image inspect --format '{{.Size}}'` in GB (10^9 bytes,
  as `docker images` prints it: every layer, the base's 0.16 GB included). Layers the daemon has cached from
  earlier builds of the same files are reused, which changes the build's time, not the image. A Docker daemon is
  started (as root) when none answers, and that one is stopped afterwards, by its PID; the images are removed
  again. A tree whose image cannot be built is reported as such.
"""

import argparse
import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import report  # noqa: E402
from benchmarks.common import FASHION_DIR, REPO_ROOT, load_average, median, ratio  # noqa: E402

RUN_IMPORTS = (
    "import mnist_flax.training.loop, mnist_flax.tracking.writers, mnist_flax.tracking.tensorboard_writer, wandb"
)
# Peak RSS as the kernel's VmHWM of this process's own memory since its exec: ru_maxrss would also count the
# parent's (the harness's) high-water mark, which a child started by vfork inherits at its exec.
PROBE = """
import sys, time
began = time.perf_counter()
exec(sys.argv[1])
seconds = time.perf_counter() - began
loaded = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(seconds, peak / 1024, loaded)
"""
IMPORTS = {"now": RUN_IMPORTS, "before (+ clu.metric_writers)": RUN_IMPORTS + "; from clu import metric_writers"}
SETTINGS = ["--config=configs/cnn.py", "--config.num_epochs=1", "--config.data.train_subset=4096"]
SETTINGS += ["--config.data.eval_subset=1000", "--config.wandb.mode=offline", "--config.tensorboard=True"]
FIRST_STEP_TAG = "compile_seconds"  # the scalar the loop's setup writes at the start step, right before training
BASE_IMAGE = os.environ.get("MNIST_FLAX_BASE_IMAGE", "mnist-flax-ci-base:bookworm")  # as tests/test_container.py
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the legacy builder, as tests/test_container.py


def imports(code: str) -> tuple[float, float, bool]:
    """(seconds, peak RSS MiB, TensorFlow loaded) of `code` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, code], cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"tensorflow_free.py: the imports failed:\n{out.stderr[-2000:]}")
    seconds, rss, loaded = out.stdout.split()
    return float(seconds), float(rss), loaded == "True"


def first_event_time(workdir: str, tag: str = FIRST_STEP_TAG) -> float:
    """The wall time of the first TensorBoard event of `tag` in the workdir's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = [
        event.wall_time
        for path in glob.glob(os.path.join(workdir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
        for event in EventFileLoader(path).Load()
        if any(value.tag == tag for value in event.summary.value)
    ]
    if not times:
        raise SystemExit(f"tensorflow_free.py: no '{tag}' event in {workdir}/tensorboard")
    return min(times)


def run(checkout: str, workdir: str, cache: str) -> dict:
    """Wall seconds, peak RSS MiB and seconds to the first step of one `python main.py` from `checkout`."""
    command = ["/usr/bin/time", "-v", sys.executable, "main.py", f"--workdir={workdir}", *SETTINGS]
    command += [f"--config.data.local_dir={FASHION_DIR}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MNIST_FLAX_COMPILE_CACHE": cache}
    launched, began = time.time(), time.perf_counter()
    out = subprocess.run(command, cwd=checkout, capture_output=True, text=True, env=env, timeout=1200)
    wall = time.perf_counter() - began
    if out.returncode:
        raise SystemExit(f"tensorflow_free.py: main.py in {checkout} failed:\n{out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1])
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        compilations = json.load(f)["compilations"]
    return {
        "wall": wall,
        "rss": rss / 1024,
        "first_step": first_event_time(workdir) - launched,
        "cached": f"{compilations['from_cache']} of {compilations['ahead_of_time']}",
    }


# ---------------------------------------------------------------- the CPU images


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=DOCKER_ENV)


@contextlib.contextmanager
def docker_daemon(log_path: str):
    """A Docker daemon that answers: the running one, else one started here and stopped afterwards by its PID."""
    if docker("info").returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        raise RuntimeError("no Docker daemon answers, and starting one needs root")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while docker("info", timeout=30).returncode:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start (see {log_path})")
                time.sleep(0.5)
            yield
        finally:
            if daemon.poll() is None:
                daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=60)


def image_size(context: str, rev: str, tag: str, log_path: str) -> dict:
    """{"gb": size} of the CPU image built from `context`, or {"error": why} when it could not be built."""
    command = ["docker", "build", "-t", tag, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg"]
    command += ["JAX_FLAVOUR=cpu", "--build-arg", f"GIT_COMMIT={rev}", context]
    began = time.perf_counter()
    with open(log_path, "w") as log:
        build = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=2400, env=DOCKER_ENV)
    seconds = time.perf_counter() - began
    if build.returncode:
        with open(log_path) as log:
            lines = [line.strip() for line in log if line.strip()]
        why = " / ".join(lines[-3:]).replace("|", "/")
        return {"error": f"docker build failed: {why}", "log_tail": lines[-30:], "build_seconds": seconds}
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    docker("rmi", tag)
    return {"gb": size / 1e9, "build_seconds": seconds}


def image_sizes(trees: dict[str, tuple[str, str]], work: str) -> dict[str, dict]:
    """Each tree's CPU image size ({label: (context, rev)}), or the reason none could be measured."""
    try:
        with docker_daemon(os.path.join(work, "dockerd.log")):
            base = subprocess.run(
                ["bash", os.path.join(REPO_ROOT, ".ci", "docker_base.sh"), BASE_IMAGE],
                capture_output=True,
                text=True,
                timeout=900,
                env=DOCKER_ENV,
            )
            if base.returncode:
                raise RuntimeError(f"the base image: {(base.stdout + base.stderr)[-600:].strip()}")
            sizes = {}
            for n, (label, (context, rev)) in enumerate(trees.items()):
                tag = f"mnist-flax:tensorflow-free-bench-{n}"
                sizes[label] = image_size(context, rev, tag, os.path.join(work, f"build-{n}.log"))
                print(f"image {label}: {sizes[label]}", flush=True)
            return sizes
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return {label: {"error": " ".join(str(e).split())} for label in trees}


# ---------------------------------------------------------------- the report


def venv_sizes(specs: list[str]) -> list[dict]:
    """`du` of each LABEL=PATH, one `du` each (a venv's files hard-linked from uv's cache count in each)."""
    sizes = []
    for spec in specs:
        label, _, path = spec.partition("=")
        du = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True)
        sizes.append({"venv": label, "gib": int(du.stdout.split()[0]) / 1024**2})
    for row in sizes:
        row["ratio"] = row["gib"] / sizes[-1]["gib"]
    return sizes


def summary(runs: dict, loads: list, images: dict | None, cores: int) -> str:
    """What the figures are, the load they were taken under, and the before/after ratios of the run."""
    after, before = (runs[name] for name in runs)
    ratios = {k: ratio([r[k] for r in before], [r[k] for r in after]) for k in ("first_step", "rss", "wall")}
    busy = median([load[0] for load in loads])
    text = (
        f"Load average (1, 5, 15 min) at each round's start: {'; '.join(str(list(x)) for x in loads)}, on "
        f"{cores} cores"
        + (
            " shared with other jobs (load at or above half the cores): read the ratios, not the absolute seconds. "
            if busy >= cores / 2
            else ". "
        )
        + "Imports: bytecode cached, a fresh interpreter each. `python main.py` with a warm compilation cache; "
        "time to the first step = the run's `compile_seconds` TensorBoard event (written right before training "
        "begins) minus the process's launch. Before / after, medians of round-by-round ratios: time to the first "
        f"step **{ratios['first_step']:.2f}x**, peak RSS **{ratios['rss']:.2f}x**, whole run {ratios['wall']:.2f}x."
    )
    if images:
        (after_label, after_image), (before_label, before_image) = images.items()
        if "gb" in after_image and "gb" in before_image:
            text += f" CPU image: {before_image['gb']:.2f} GB before, {after_image['gb']:.2f} GB after"
            text += f" (**{before_image['gb'] / after_image['gb']:.2f}x**; issue 36 gave 2.66 GB before)."
        elif "gb" in after_image:
            text += f" CPU image after: {after_image['gb']:.2f} GB; the before image could not be built here"
            text += " (see the table); issue 36 gave it as 2.66 GB (the issue's figure, not measured here)."
    return text


def tables(seen: dict, runs: dict, images: dict | None, sizes: list) -> list[dict]:
    """The imports, the runs, the images and the environments."""
    imports_table = {
        "columns": [
            ["imports", "name", "{}"],
            ["seconds (median)", "seconds", "{:.2f}"],
            ["peak RSS MiB (median)", "rss", "{:.0f}"],
            ["TensorFlow loaded", "tf", "{}"],
        ],
        "rows": [
            {
                "name": name,
                "seconds": median([s[0] for s in values]),
                "rss": median([s[1] for s in values]),
                "tf": "yes" if values[0][2] else "no",
            }
            for name, values in seen.items()
        ],
    }
    runs_table = {
        "columns": [
            ["python main.py (CNN, 1 epoch, 4,096 images, W&B offline, TensorBoard), warm cache", "name", "{}"],
            ["s to the first step (median)", "first_step", "{:.1f}"],
            ["rounds", "first_step_rounds", "{}"],
            ["peak RSS MiB (median)", "rss", "{:.0f}"],
            ["wall s (median)", "wall", "{:.1f}"],
            ["programs from the cache", "cached", "{}"],
        ],
        "rows": [
            {
                "name": name,
                "first_step": median([r["first_step"] for r in values]),
                "first_step_rounds": ", ".join(f"{r['first_step']:.1f}" for r in values),
                "rss": median([r["rss"] for r in values]),
                "wall": median([r["wall"] for r in values]),
                "cached": ", ".join(sorted({r["cached"] for r in values})),
                "rounds": values,
            }
            for name, values in runs.items()
        ],
    }
    result = [imports_table, runs_table]
    if images is not None:
        columns = [["CPU image (JAX_FLAVOUR=cpu)", "tree", "{}"], ["size GB", "gb", "{:.2f}"]]
        columns += [["not measured because", "error", "{}"]] if any("error" in i for i in images.values()) else []
        result.append({"columns": columns, "rows": [{"tree": label, **row} for label, row in images.items()]})
    if sizes:
        columns = [["venv", "venv", "{}"], ["size GiB", "gib", "{:.2f}"], ["/ the last", "ratio", "{:.2f}x"]]
        result.append({"columns": columns, "rows": sizes})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="684e251", help="the last commit whose writers imported TensorFlow")
    parser.add_argument("--venv", action="append", default=[], help="LABEL=PATH of a venv to measure with du")
    parser.add_argument("--images", action="store_true", help="build both trees' CPU images and measure them")
    parser.add_argument("--results", default=report.RESULTS_MD, help="RESULTS.md to rewrite ('' for none)")
    args = parser.parse_args(argv)
    started = report.start()
    given = sys.argv[1:] if argv is None else argv
    started["command"] = shlex.join(["python", "benchmarks/tensorflow_free.py", *given])
    seen = {name: [] for name in IMPORTS}
    runs, loads = {"this checkout": [], f"{args.before} (before)": []}, []
    images = None
    with tempfile.TemporaryDirectory(prefix="tensorflow-free-bench-") as work:
        before = os.path.join(work, "before")
        os.makedirs(before)
        archive = subprocess.run(["git", "-C", REPO_ROOT, "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", before], input=archive.stdout, check=True)
        trees = dict(zip(runs, (REPO_ROOT, before), strict=True))
        caches = {name: os.path.join(work, f"cache-{n}") for n, name in enumerate(trees)}
        for n, name in enumerate(trees):  # untimed: fills each tree's compilation cache
            run(trees[name], os.path.join(work, f"warm-{n}"), caches[name])
        for r in range(args.rounds):
            loads.append(load_average())
            for name in _rotated(IMPORTS, r):
                seen[name].append(imports(IMPORTS[name]))
                print(f"round {r} imports {name}: {seen[name][-1]}", flush=True)
            for n, name in enumerate(_rotated(trees, r)):
                runs[name].append(run(trees[name], os.path.join(work, f"run-{r}-{n}"), caches[name]))
                print(f"round {r} run {name}: {runs[name][-1]}", flush=True)
        if args.images:
            shutil.rmtree(before)  # the image from the commit's files alone, without the runs' leftovers
            os.makedirs(before)
            subprocess.run(["tar", "-x", "-C", before], input=archive.stdout, check=True)
            contexts = dict(zip(runs, ((REPO_ROOT, _head()), (before, args.before)), strict=True))
            images = image_sizes(contexts, work)
    sizes = venv_sizes(args.venv)
    result = {
        "summary": summary(runs, loads, images, os.cpu_count() or 1),
        "loads": loads,
        "tables": tables(seen, runs, images, sizes),
    }
    if args.results:
        report.record_beside(args.results, "tensorflow_free", result, started)
    return 0


def _head() -> str:
    return subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def _rotated(names, r: int) -> list:
    """The names in round `r`'s order: common.rotation's, one round at a time."""
    names = list(names)
    return names[r % len(names) :] + names[: r % len(names)]


if __name__ == "__main__":
    sys.exit(main())
