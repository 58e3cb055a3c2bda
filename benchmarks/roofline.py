"""Where the default CNN's training step spends its time on this CPU, against the cores' fp32 peak.

    python benchmarks/roofline.py            # prints the table; recorded in results.json as `roofline`

Pieces at batch 128, each a jitted function on device-resident arrays, timed in alternating rounds: the forward
pass (loss), forward + backward (value_and_grad), the library's whole train step (one step per call: gradients,
AdamW, metrics), and the second convolution (the largest, 64x32x3x3 on 14x14) alone, forward and with both its
gradients, and the first (32x1x3x3 on 28x28) with its weight gradient. FLOPs come from XLA's own cost analysis of
each compiled function. The peak is cores x fp32 FLOP/cycle (`flop_per_cycle`) x the clock /proc/cpuinfo reports;
a turbo clock above it makes the true fraction lower.
"""

import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common, pieces, report  # noqa: E402
from benchmarks.common import FASHION_DIR, format_table, median  # noqa: E402

BATCH = 128


def flop_per_cycle() -> int:
    """fp32 FLOP per cycle per core: 2 FMA pipes x lanes x 2. Zen 5 (family 26) and Intel's AVX-512 cores have
    512-bit FMA pipes (16 lanes); Zen 4 (family 25) runs AVX-512 on 256-bit pipes, as AVX2 machines do (8 lanes)."""
    with open("/proc/cpuinfo") as f:
        text = f.read()
    family = next((int(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu family")), 0)
    amd = "AuthenticAMD" in text
    wide = "avx512f" in text and (family >= 26 if amd else True)
    return 2 * (16 if wide else 8) * 2


def clock_ghz() -> float:
    with open("/proc/cpuinfo") as f:
        mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    return max(mhz) / 1000 if mhz else float("nan")


def flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", float("nan")))


def time_call(fn, args, calls: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def main() -> int:
    started = report.start()
    data = pieces.load_host_data(FASHION_DIR)
    config = pieces.load_config("configs/cnn.py", batch_size=BATCH)
    model = pieces.build_model(config, conv_impl="xla", conv_batch_split=1)
    timer = pieces.StepTimer(config, data, model=model)
    params = jax.tree.map(jnp.copy, timer.state.params)  # the train step donates its carry
    images = jnp.asarray(data.train_images[:BATCH], jnp.float32) / 255.0
    labels = jnp.asarray(data.train_labels[:BATCH])
    rng = jax.random.PRNGKey(0)

    def loss(p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    x = jax.random.normal(rng, (BATCH, 14, 14, 32))
    w = jax.random.normal(rng, (3, 3, 32, 64))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def conv_grads(x, w):
        out, vjp = jax.vjp(conv, x, w)
        return vjp(jnp.ones_like(out))

    x1 = jax.random.normal(rng, (BATCH, 28, 28, 1))
    w1 = jax.random.normal(rng, (3, 3, 1, 32))

    def conv1_weight_grad(x, w):  # the first layer needs no input gradient
        out, vjp = jax.vjp(lambda w: conv(x, w), w)
        return vjp(jnp.ones_like(out))

    functions = {
        "forward (loss)": (jax.jit(loss), (params,)),
        "forward + backward": (jax.jit(jax.value_and_grad(loss)), (params,)),
        "conv 2 forward": (jax.jit(conv), (x, w)),
        "conv 2 forward + both gradients": (jax.jit(conv_grads), (x, w)),
        "conv 1 forward": (jax.jit(conv), (x1, w1)),
        "conv 1 forward + weight gradient": (jax.jit(conv1_weight_grad), (x1, w1)),
    }
    compiled = {name: fn.lower(*args).compile() for name, (fn, args) in functions.items()}
    rows = {name: [] for name in [*functions, "whole train step (library)"]}
    for _ in range(5):  # alternating rounds
        for name, (_, args) in functions.items():
            rows[name].append(time_call(compiled[name], args, 30))
        seconds = time_call(lambda: timer.run(1) and timer.carry, (), 30)
        rows["whole train step (library)"].append(seconds)
    counted = {name: flops(c) for name, c in compiled.items()}
    counted["whole train step (library)"] = flops(timer.step_fn)
    cores = len(os.sched_getaffinity(0))
    peak = cores * flop_per_cycle() * clock_ghz()
    table = []
    step = median(rows["whole train step (library)"])
    for name, times in rows.items():
        t = median(times)
        gflops = counted[name] / t / 1e9
        table.append(
            {
                "piece": name,
                "ms": 1000 * t,
                "share_of_step": t / step,
                "mflop_per_image": counted[name] / BATCH / 1e6,
                "gflop_per_s": gflops,
                "of_peak": gflops / peak,
            }
        )
    result = {
        "cpu": common.cpu_model(),
        "cores": cores,
        "clock_ghz": clock_ghz(),
        "peak_gflop_per_s": peak,
        "images_per_second_step": BATCH / step,
        "rows": table,
        "tables": [
            {
                "columns": [
                    ["piece (batch 128)", "piece", "{}"],
                    ["ms", "ms", "{:.2f}"],
                    ["of the step", "share_of_step", "{:.0%}"],
                    ["MFLOP per image (XLA)", "mflop_per_image", "{:.1f}"],
                    ["GFLOP/s", "gflop_per_s", "{:.0f}"],
                    ["of fp32 peak", "of_peak", "{:.0%}"],
                ],
                "rows": table,
            }
        ],
        "targets": [],
    }
    results = report.load()
    report.record(results, "roofline", result, started, report.RESULTS_JSON, report.RESULTS_MD)
    headers = ["piece", "ms", "of step", "MFLOP/img", "GFLOP/s", "of peak"]
    cells = [
        [r["piece"], f"{r['ms']:.2f}", f"{r['share_of_step']:.0%}", f"{r['mflop_per_image']:.1f}"]
        + [f"{r['gflop_per_s']:.0f}", f"{r['of_peak']:.0%}"]
        for r in table
    ]
    print(f"{result['cpu']}, {cores} cores at {result['clock_ghz']:.2f} GHz: fp32 peak {peak:.0f} GFLOP/s")
    print(format_table(headers, cells, "lrrrrr"))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
