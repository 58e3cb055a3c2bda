"""One prepared benchmark for a GPU machine: the CNN's throughput at several batch sizes with fused steps, compile
time, time to 90% Fashion-MNIST test accuracy with the data on the device, and PyTorch on CUDA beside it.

    python benchmarks/gpu.py --data-dir DIR            # on the GPU machine (about 5 min on an H200)
    python benchmarks/gpu.py --data-dir DIR --quick    # a smoke run of the same code (runs on CPU too)

DIR holds the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...); the default is
benchmarks/_work/fashion-mnist (git-ignored, so it can travel to a device machine as a carried path) if it exists,
else Debian's folder. It times the library's compiled step through pieces.py, which imports the training core only
(mnist_flax.training: models, input_pipeline, steps, metrics: JAX with its GPU plugin, flax, optax, ml_collections; no
TensorFlow, W&B or orbax), and torch with CUDA for the comparison. Prints the tables; with $OUT set, writes
$OUT/gpu_results.json.

On a device machine of this project (the `device` tool), for example:

    mkdir -p benchmarks/_work/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz benchmarks/_work/fashion-mnist/
    run(command="python benchmarks/gpu.py", carry=["benchmarks/_work"], timeout_s=540)

Throughput rounds are timed, not counted: each contender's round is sized from a timed warm-up to last about
`--round-seconds`, and the contenders alternate for `--rounds` rounds; the median round is reported.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import common, report  # noqa: E402
from benchmarks.common import median  # noqa: E402
from mnist_flax.records import provenance  # noqa: E402


def default_data_dir() -> str:
    """The carried copy of the IDX files if there is one, else Debian's folder."""
    carried = os.path.join(REPO_ROOT, "benchmarks", "_work", "fashion-mnist")
    return carried if os.path.isdir(carried) else common.FASHION_DIR


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=default_data_dir(), help="folder of the four IDX files")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (CPU is fine)")
    parser.add_argument("--batch-sizes", default="", help="comma-separated (default 128,512,2048,8192)")
    parser.add_argument("--steps-per-call", type=int, default=0, help="fused steps per call (default 100)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3)")
    parser.add_argument("--round-seconds", type=float, default=0.0, help="length of a round (default 2 s)")
    parser.add_argument(
        "--t90",
        default="",
        help="time-to-90%% runs as batch:learning_rate:num_epochs, comma-separated "
        "(default 128:0.002:10,512:0.004:10,1024:0.006:10; the first is the default config)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    return parser.parse_args(argv)


def calibrate(run, unit: int, seconds: float) -> int:
    """How many units (steps) of `run` fill about `seconds`, from a timed run of `unit` steps."""
    start = time.perf_counter()
    run(unit)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return max(unit, int(round(seconds / elapsed)) * unit)


def throughput(data, args, settings) -> list[dict]:
    """Ours (fused steps, data on the device) against PyTorch's DataLoader loop, per batch size."""
    from benchmarks import pieces

    torch_device = settings["torch_device"]
    rows = []
    for batch_size in settings["batch_sizes"]:
        # The whole batch and fused steps in a lax.scan (what "auto" gives on a GPU), also when checked on CPU.
        config = pieces.load_config(batch_size=batch_size)
        contenders, units = {}, {}
        start = time.perf_counter()
        ours = pieces.StepTimer(config, data, steps_per_call=settings["steps_per_call"], scan_unroll=1)
        compile_wall = time.perf_counter() - start
        ours.run(ours.steps_per_call)  # warm
        contenders["ours"], units["ours"] = ours, ours.steps_per_call
        if torch_device:
            from benchmarks.torch_loop import TorchContender

            shapes = {"conv_features": (32, 64), "dense_features": (256,), "dropout_rate": 0.25}
            contenders["torch"] = TorchContender(shapes, data, batch_size, device=torch_device)
            contenders["torch"].run(5)
            units["torch"] = 10
        steps = {name: calibrate(c.run, units[name], settings["round_seconds"]) for name, c in contenders.items()}
        timed = common.interleave(
            {name: (lambda c=c, n=steps[name]: c.run(n)) for name, c in contenders.items()}, settings["rounds"]
        )
        ours_ips = timed["ours"].images_per_second()
        row = {
            "batch_size": batch_size,
            "steps_per_call": ours.steps_per_call,
            "batch_split": int(ours.config.train.batch_split),
            "ours_images_per_second": median(ours_ips),
            "ours_rounds": ours_ips,
            "compile_train_seconds": ours.compile_train_seconds,
            "compile_predict_seconds": ours.compile_predict_seconds,
            "setup_and_compile_wall_seconds": compile_wall,
            "steps_per_round": steps,
        }
        if "torch" in timed:
            torch_ips = timed["torch"].images_per_second()
            row["torch_images_per_second"] = median(torch_ips)
            row["torch_rounds"] = torch_ips
            row["ours_vs_torch"] = common.ratio(ours_ips, torch_ips)
        eval_seconds, _ = ours.evaluate()
        row["eval_seconds"] = min(eval_seconds, ours.evaluate()[0])
        rows.append(row)
        print(
            f"  batch {batch_size}: ours {row['ours_images_per_second']:,.0f} img/s"
            + (f", torch {row['torch_images_per_second']:,.0f} img/s" if "torch" in timed else ""),
            flush=True,
        )
        del contenders, ours
    return rows


def time_to_90(data, spec: str, settings) -> dict:
    """Trains with one fused call per epoch (data on the device) until the test accuracy first reaches 90%.

    The test set is used only as a stopwatch, never for model selection.
    """
    from benchmarks import pieces

    batch_size, learning_rate, num_epochs = spec.split(":")
    batch_size = int(batch_size)
    config = pieces.load_config(
        batch_size=batch_size, optimizer__learning_rate=float(learning_rate), num_epochs=int(num_epochs)
    )
    steps_per_epoch = len(data.train_labels) // batch_size
    start = time.perf_counter()
    ours = pieces.StepTimer(config, data, steps_per_call=steps_per_epoch, scan_unroll=1)
    compile_seconds = time.perf_counter() - start
    train_seconds, epochs = 0.0, []
    for epoch in range(settings["t90_max_epochs"] or config.num_epochs):
        epoch_start = time.perf_counter()
        ours.run_epoch()  # one call, blocks at its end
        train_seconds += time.perf_counter() - epoch_start
        _, accuracy = ours.evaluate()
        epochs.append({"epoch": epoch + 1, "test_accuracy": accuracy, "train_seconds": train_seconds})
        if accuracy >= 0.90:
            break
    result = {
        "spec": spec,
        "batch_size": batch_size,
        "learning_rate": float(learning_rate),
        "num_epochs_schedule": int(num_epochs),
        "reached": epochs[-1]["test_accuracy"] >= 0.90,
        "epochs": len(epochs),
        "train_seconds": train_seconds,
        "setup_and_compile_seconds": compile_seconds,
        "per_epoch": epochs,
    }
    print(
        f"  t90 {spec}: {'reached' if result['reached'] else 'not reached'} after {len(epochs)} epoch(s), "
        f"{train_seconds:.2f} s of training",
        flush=True,
    )
    return result


def settings_from(args: argparse.Namespace) -> dict:
    """Sizes of the run from the command line (quick: small enough for a CPU)."""
    t90 = args.t90 or ("128:0.002:10" if args.quick else "128:0.002:10,512:0.004:10,1024:0.006:10")
    return {
        "batch_sizes": [int(b) for b in args.batch_sizes.split(",") if b]
        or ([64, 128] if args.quick else [128, 512, 2048, 8192]),
        "steps_per_call": args.steps_per_call or (4 if args.quick else 100),
        "rounds": args.rounds or (2 if args.quick else 3),
        "round_seconds": args.round_seconds or (0.3 if args.quick else 2.0),
        "t90": [s for s in t90.split(",") if s],
        "t90_max_epochs": 1 if args.quick else 0,
        "torch_device": None,
    }


def environment(args: argparse.Namespace, settings: dict) -> dict:
    """The machine, versions, JAX's devices and PyTorch's device (set in `settings`)."""
    import jax

    torch_info = {}
    if not args.no_torch:
        try:
            import torch

            settings["torch_device"] = "cuda" if torch.cuda.is_available() else "cpu"
            torch_info = {
                "device": settings["torch_device"],
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        except ImportError:
            torch_info = {"device": None, "note": "torch not installed"}
    return {
        "machine": common.machine_facts(),
        "versions": provenance.package_versions(
            ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "torch", "numpy")
        ),
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.device_kind} ({d.platform})" for d in jax.devices()],
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "torch": torch_info,
        "settings": settings,
    }


THROUGHPUT_COLUMNS = [
    ["batch", "batch_size", "{}"],
    ["ours images/s", "ours_images_per_second", "{:,.0f}"],
    ["PyTorch images/s", "torch_images_per_second", "{:,.0f}"],
    ["ours / PyTorch", "ours_vs_torch", "{:.2f}x"],
    ["compile s (train)", "compile_train_seconds", "{:.1f}"],
    ["compile s (predict)", "compile_predict_seconds", "{:.1f}"],
    ["eval 10k s", "eval_seconds", "{:.3f}"],
]
T90_COLUMNS = [
    ["batch:lr:epochs", "spec", "{}"],
    ["reached 90%", "reached", "{}"],
    ["epochs", "epochs", "{}"],
    ["training s", "train_seconds", "{:.2f}"],
    ["setup + compile s", "setup_and_compile_seconds", "{:.1f}"],
]


def main(argv=None) -> int:
    """Runs both measurements, prints the tables and writes $OUT/gpu_results.json."""
    args = parse_args(argv)
    from benchmarks import pieces

    settings = settings_from(args)
    info = environment(args, settings)
    print(
        f"JAX {info['versions']['jax']} on {info['jax_devices'][0]} x{len(info['jax_devices'])}; torch: {info['torch']}"
    )
    data = pieces.load_host_data(args.data_dir)
    if args.quick:  # a slice of the training set (steps in a lax.scan run 10x slower on CPU: jax#12868)
        data = dataclasses.replace(data, train_images=data.train_images[:2048], train_labels=data.train_labels[:2048])
    print("== throughput", flush=True)
    rows = throughput(data, args, settings)
    print("== time to 90% test accuracy", flush=True)
    t90 = [time_to_90(data, spec, settings) for spec in settings["t90"]]
    caption = f"CNN throughput ({settings['steps_per_call']} fused steps a call, data on the device):"
    print("\n" + report.render_table({"caption": caption, "columns": THROUGHPUT_COLUMNS, "rows": rows}))
    caption = "Time to 90% test accuracy (one fused call per epoch; the test set only as a stopwatch):"
    print("\n" + report.render_table({"caption": caption, "columns": T90_COLUMNS, "rows": t90}))
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_results.json")
        with open(path, "w") as f:
            json.dump({**info, "throughput": rows, "time_to_90": t90}, f, indent=1, default=str)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
