"""Where the default CNN's training step spends its time on this CPU, against the cores' fp32 peak.

    python benchmarks/roofline.py            # prints the tables; recorded in results.json as `roofline`
    python benchmarks/roofline.py --no-torch # without the torch.compile peer's profile (also left out without torch)

Pieces at batch 128, each a jitted function on device-resident arrays, timed in alternating rounds: the forward
pass (loss), forward + backward (value_and_grad), the library's whole train step (one step per call: gradients,
AdamW, metrics), and the second convolution (the largest, 64x32x3x3 on 14x14) alone, forward and with both its
gradients, and the first (32x1x3x3 on 28x28) with its weight gradient. FLOPs come from XLA's own cost analysis of
each compiled function. The peak is cores x fp32 FLOP/cycle (`flop_per_cycle`) x the clock /proc/cpuinfo reports;
a turbo clock above it makes the true fraction lower.

Then the library's default step itself (8 pieces, 3 steps a call written out), profiled: XLA's trace of 60 steps in a
child process (`--xla_cpu_enable_xprof_traceme`), each executed fusion put under the piece of the model its HLO
metadata names (the convolutions' forward, input and weight gradients, bias + ReLU, pooling, dense layers, the
optimizer, the batch gather); a dot or copy outside any fusion by its own metadata. Times are thread time, summed
over both cores' threads, as a share of all of it.

In the same invocation, in three rounds alternating with that profile, the resident-data torch.compile peer's step
under torch.profiler, by the same pieces where they apply, and the kernels inductor generated for it
(torch_profile.py); each side's table is its round with the faster untraced step.
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import child, common, pieces, report, torch_profile  # noqa: E402
from benchmarks.common import FASHION_DIR, median  # noqa: E402
from mnist_flax.training import resolution  # noqa: E402

BATCH = 128
PROFILED_STEPS = 60
PROFILE_ROUNDS = 3  # alternating rounds of the two profiles (ours, torch.compile's)
# The library's CPU defaults, as its resolver decides "auto" at batch 128: 8 pieces, 3 steps a call written out.
DEFAULT_PIECES = resolution.batch_split("auto", BATCH, "cpu")
DEFAULT_STEPS = resolution.steps_per_call("auto", "cpu")


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


def piece_of(op_name: str, shape_numel: int, kernel_numels: dict) -> str:
    """The model piece an executed fusion belongs to, from its HLO metadata (`op_name`) and output size."""
    layer = re.search(r"(Conv3x3|Dense)_(\d+)", op_name)
    backward = "transpose(" in op_name
    if op_name == "convolution":  # one of XLA's own making, unnamed: a weight gradient is the size of its kernel
        layers = [i for i, numel in kernel_numels.items() if numel == shape_numel]
        return f"conv {layers[0] + 1} weight gradient" if layers else "convolutions XLA made (unnamed)"
    if not op_name:
        return "layout copies XLA inserts (no op of the model)"
    if layer and op_name.endswith("conv_general_dilated"):
        name = f"conv {int(layer.group(2)) + 1}"
        if not backward:
            return f"{name} forward"
        weight = shape_numel == kernel_numels.get(int(layer.group(2)))
        return f"{name} {'weight' if weight else 'input'} gradient"
    if layer and layer.group(1) == "Dense":
        return "dense layers (forward and gradients)"
    if "Conv3x3" in op_name or "relu" in op_name or ("transpose(jvp(CNN))/select_n" in op_name):
        return "bias + ReLU (forward and gradients)"
    if "reduce_window" in op_name or "transpose(jvp(CNN))/div" in op_name:
        return "average pools (forward and gradients)"
    if "Dropout" in op_name:
        return "dropout"
    if op_name.rsplit("/", 1)[-1] in ("gather", "slice", "stack", "concatenate") or "jvp(CNN)/slice" in op_name:
        return "batch gather, split and join"
    if "CNN" in op_name or "log_softmax" in op_name or "jvp()" in op_name:
        return "loss and the rest of the model"
    return "optimizer (AdamW), metrics, epoch-end select"


def profile_child() -> dict:
    """In a process started with the traceme flag: the default step's thread time per model piece."""
    data = pieces.load_host_data()
    config = pieces.load_config("configs/cnn.py", batch_size=BATCH)
    timer = pieces.StepTimer(
        config, data, steps_per_call=DEFAULT_STEPS, scan_unroll=DEFAULT_STEPS, batch_split=DEFAULT_PIECES
    )
    timer.run(3 * PROFILED_STEPS)  # warm
    start = time.perf_counter()
    timer.run(PROFILED_STEPS)
    wall = time.perf_counter() - start  # untraced
    trace_dir = tempfile.mkdtemp(prefix="roofline_trace_")
    with jax.profiler.trace(trace_dir):
        timer.run(PROFILED_STEPS)
    hlo = timer.step_fn.as_text()
    calls, numels, own = {}, {}, {}  # per fusion: its computation, output size, own op_name
    for line in hlo.splitlines():
        found = re.search(r"%([\w.\-]+) = \(?\w+\[([\d,]*)\].*? fusion\(.*calls=%([\w.\-]+)", line)
        # A dot or copy XLA left outside any fusion runs as a thunk of its own: counted too, by its own op_name.
        found = found or re.search(r"^\s*%([\w.\-]+) = \w+\[([\d,]*)\]\S* (?:dot|copy)\(()", line)
        if found:
            name, meta = found.group(1), re.search(r'op_name="([^"]+)"', line)
            calls[name] = found.group(3)
            numels[name] = int(np.prod([int(d) for d in found.group(2).split(",") if d]))
            own[name] = meta.group(1) if meta else ""
    # Else the op_name of its computation's last instruction that has one ("convolution" for an unnamed one).
    computations, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
        elif current:
            meta = re.search(r'op_name="([^"]+)"', line)
            unnamed = "convolution" if " convolution(" in line else ""
            computations[current] = meta.group(1) if meta else computations.get(current) or unnamed
    convs = [v["kernel"].shape for k, v in sorted(timer.state.params.items()) if k.startswith("Conv_")]
    kernels = {i: int(np.prod(shape)) for i, shape in enumerate(convs)}
    # A convolution's FLOPs a step: 2 x batch x output pixels x its kernel's size (the image halves per stage).
    conv_flop = {f"conv {i + 1}": 2 * BATCH * (28 >> i) ** 2 * kernels[i] for i in range(len(convs))}
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    busy, spans = collections.Counter(), []
    for event in events:
        name = event.get("name")
        if event.get("ph") == "X" and name in calls:
            op_name = own[name] or computations.get(calls[name], "")
            busy[piece_of(op_name, numels[name], kernels)] += event["dur"] / 1e6
            spans += [event["ts"], event["ts"] + event["dur"]]
    shutil.rmtree(trace_dir, ignore_errors=True)
    traced = (max(spans) - min(spans)) / 1e6
    return {
        "wall_seconds": wall,
        "traced_seconds": traced,
        "steps": PROFILED_STEPS,
        "busy": dict(busy),
        "conv_flop": conv_flop,
    }


def profile_default_step() -> dict:
    """`profile_child` in a child process (child.py) with XLA's traceme flag (off for every other timing here)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    result = child.run_child({"kind": "roofline_profile"}, env={"XLA_FLAGS": flags})
    total = sum(result["busy"].values())
    step_ms = 1000 * result["wall_seconds"] / result["steps"]
    conv_flop = result["conv_flop"]  # forward, input and weight gradient alike: for GFLOP/s while each runs
    rows = []
    for piece, seconds in sorted(result["busy"].items(), key=lambda item: -item[1]):
        per_step = seconds / result["steps"]
        flop = conv_flop.get(" ".join(piece.split()[:2]))
        rows.append(
            {
                "piece": piece,
                "thread_ms_per_step": 1000 * per_step,
                "share": seconds / total,
                "gflop_per_s": flop / per_step / 1e9 if flop else None,
            }
        )
    return {"step_ms": step_ms, "busy_cores": total / result["traced_seconds"], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.compile peer's profile")
    options = parser.parse_args(argv)
    started = report.start()
    data = pieces.load_host_data(FASHION_DIR)
    config = pieces.load_config("configs/cnn.py", batch_size=BATCH)
    timer = pieces.StepTimer(config, data)
    model = timer.model
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
    # Ours and the torch.compile peer's step (torch_profile.py) profiled in alternating rounds, a child process
    # each, so both tables come from one machine state; each side's table is its round of the fastest untraced step
    # (the one least disturbed by another job on this shared machine). Without torch, ours alone.
    sides = {"xla": profile_default_step}
    if not options.no_torch and _has_torch():
        sides["torch"] = lambda: torch_profile.profile_compiled_step(config, data)
    rounds = {name: [] for name in sides}
    for name in common.rotation(sides, PROFILE_ROUNDS):
        rounds[name].append(sides[name]())
    profile = min(rounds["xla"], key=lambda p: p["step_ms"])
    torch_side = min(rounds["torch"], key=lambda p: p["step_ms"]) if "torch" in rounds else None
    step_rounds = {name: ", ".join(f"{p['step_ms']:.1f}" for p in runs) for name, runs in rounds.items()}
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
        "profile": profile,
    }
    result["tables"].append(
        {
            "columns": [
                ["the default step, by piece (XLA's profiler)", "piece", "{}"],
                ["thread ms per step", "thread_ms_per_step", "{:.2f}"],
                ["of all thread time", "share", "{:.0%}"],
                ["GFLOP/s while it runs", "gflop_per_s", "{:.0f}"],
            ],
            "rows": profile["rows"],
            "caption": f"Ours: the default step under XLA's profiler, {profile['step_ms']:.1f} ms a step untraced; "
            "thread time summed over both cores, so the rows add up to more than the step.",
        }
    )
    result["summary"] = (
        f"{result['cpu']}, {cores} cores at {result['clock_ghz']:.2f} GHz: fp32 peak {peak:.0f} GFLOP/s "
        f"({peak / cores:.0f} a core). The default step ({DEFAULT_PIECES} pieces, {DEFAULT_STEPS} steps a call) "
        f"under the profiler: {profile['step_ms']:.1f} ms a step untraced, {profile['busy_cores']:.2f} cores busy "
        f"while traced (untraced ms a step, round by round: {step_rounds['xla']})."
    )
    if torch_side:
        result["torch_profile"] = torch_side
        result["tables"] += torch_tables(torch_side)
        result["summary"] += (
            f" The resident-data torch.compile peer's step under torch.profiler, in rounds alternating with ours: "
            f"{torch_side['step_ms']:.1f} ms a step untraced ({torch_side['traced_step_ms']:.1f} traced), "
            f"{torch_side['busy_cores']:.2f} cores busy untraced (process CPU time over wall time; round by round: "
            f"{step_rounds['torch']} ms)."
        )
    results = report.load()
    report.record(results, "roofline", result, started, report.RESULTS_JSON, report.RESULTS_MD)
    print(report.render_entry("roofline", results["roofline"]))
    return 0


def torch_tables(side: dict) -> list[dict]:
    """The torch.compile peer's piece table and its generated kernels, for RESULTS.md beside ours."""
    return [
        {
            "columns": [
                ["the torch.compile peer's step, by piece (torch.profiler)", "piece", "{}"],
                ["ms per step (main thread)", "ms_per_step", "{:.2f}"],
                ["of the traced step", "share", "{:.0%}"],
                ["GFLOP/s while it runs (both threads)", "gflop_per_s", "{:.0f}"],
            ],
            "rows": side["rows"],
            "caption": f"PyTorch: the resident-data torch.compile peer's step under torch.profiler, "
            f"{side['step_ms']:.1f} ms a step untraced, {side['traced_step_ms']:.1f} traced; the main thread's "
            f"self time per op, each op on {side['threads']} OpenMP threads, so the rows add up to the traced step.",
        },
        {
            "columns": [
                ["graph", "graph", "{}"],
                ["inductor's generated C++ kernel (the ATen ops it fuses)", "kernel", "{}"],
                ["ms per step", "ms_per_step", "{:.2f}"],
            ],
            "rows": side["kernel_rows"],
            "caption": torch_profile.code_summary(side["code"]),
        },
    ]


def _has_torch() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: the torch.compile peer's profile is left out", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
