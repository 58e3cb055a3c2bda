"""The resident-data torch.compile peer's step under PyTorch's profiler, by piece, beside roofline.py's XLA profile.

    python benchmarks/roofline.py            # runs it after XLA's profile, in the same invocation (`--no-torch`: not)

In a child process (child.py, kind "torch_profile"): torch_loop.py's headline peer exactly as the whole run builds
it (TorchNet, AdamW + warmup-cosine, label smoothing, dropout, batch 128, two threads, the data resident as tensors,
each batch gathered by index, `torch.compile(model)`), warmed up, 60 steps timed, then 60 steps under
`torch.profiler` (CPU). Each event's self time goes under the piece of the model its op, shapes or enclosing op
name (the convolutions by their channels, AdamW's ops inside `Optimizer.step`); what the profiler saw no op for is
Python, so the pieces sum to the traced wall time. Inductor's generated C++ kernels are profiled by name
(`cpp.enable_kernel_profile`), and the generated code itself (the fresh inductor cache's modules) is read back for
the kernels each graph has and the library kernels ("extern") it calls.

Unlike XLA's table (thread time summed over both cores), these are the main thread's times: eager PyTorch and
inductor's code run one op after another, each op on both OpenMP threads, so they add up to the step's wall time.
Imports NumPy and torch only in the child.
"""

import collections
import glob
import os
import re
import shutil
import tempfile
import time

BATCH = 128
WARMUP_STEPS = 30  # past both compilations (training forward and backward) and the first allocations
PROFILED_STEPS = 60
OTHER = "other: dynamo, AOT and autograd wrappers, allocation, Python"
CONV_PIECES = {  # by the convolution's input channels (forward) or gradient's channels (backward)
    ("forward", 1): "conv 1 forward (oneDNN, bias inside)",
    ("forward", 32): "conv 2 forward (oneDNN, bias inside)",
    ("backward", 32): "conv 1 weight gradient (oneDNN, bias gradient inside)",
    ("backward", 64): "conv 2 input + weight gradient (one oneDNN call, bias gradient inside)",
}
COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to_dense", "aten::to_mkldnn")


def spec_for(config, data_npz: str, threads: int = 2) -> dict:
    """The child's spec: the whole run's torch.compile resident peer (sections.section_whole_run) for `config`."""
    model = config.model
    return {
        "kind": "torch_profile",
        "data_npz": data_npz,
        "architecture": {
            "conv_features": tuple(model.conv_features),
            "dense_features": tuple(model.dense_features),
            "dropout_rate": float(model.dropout_rate),
        },
        "recipe": {
            "learning_rate": config.optimizer.learning_rate,
            "weight_decay": config.optimizer.weight_decay,
            "label_smoothing": config.loss.label_smoothing,
        },
        "epochs": config.num_epochs,
        "threads": threads,
    }


def kernel_piece(kernel: str) -> str:
    """The piece an inductor kernel belongs to, from the ATen ops its name lists."""
    if "dropout" in kernel:
        return "dropout, with the dense ReLU (inductor's fused loops)"
    if "avg_pool2d" in kernel:
        return "ReLU + average pools, forward and gradients (inductor's fused loops)"
    if re.fullmatch(r"cpp_fused_sum_\d+", kernel):
        return "dense layers (forward and gradients)"  # the dense layers' bias gradients
    if re.fullmatch(r"cpp_fused_\d+", kernel):
        return "layout copies (weight to channels-last, gradient copies)"  # a copy, no op of the model
    return "inductor loops of other ops"


def piece_of(event) -> str:
    """The model piece of one profiler event (its self time), from its name, shapes and enclosing events."""
    chain, parent = [event], event.cpu_parent
    while parent is not None:
        chain.append(parent)
        parent = parent.cpu_parent
    names = [e.name for e in chain]
    if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names):
        return "optimizer (AdamW, eager), metrics"
    for e in chain:  # the nearest enclosing op that names a piece
        kernel = re.sub(r"^graph_\d+_", "", e.name)
        if kernel.startswith("cpp_fused"):
            return kernel_piece(kernel)
        if e.name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution") and e.input_shapes:
            return CONV_PIECES.get(("forward", e.input_shapes[0][1]), "convolutions (other)")
        if e.name == "aten::convolution_backward" and e.input_shapes:
            return CONV_PIECES.get(("backward", e.input_shapes[0][1]), "convolutions (other)")
        if e.name in ("aten::mm", "aten::addmm"):
            return "dense layers (forward and gradients)"
        if e.name == "aten::cross_entropy_loss" or re.search(r"(LogSoftmax|NllLoss)Backward", e.name):
            return "loss (cross-entropy, eager), the loss sum"
        if e.name in ("aten::randint", "aten::random_"):  # dropout's seed, inside the compiled graph
            return "dropout, with the dense ReLU (inductor's fused loops)"
    top = chain[-1].name
    if len(chain) == 1 and top in ("aten::index", "aten::randperm", "aten::slice"):
        return "batch gather (randperm, index)"
    if len(chain) == 1 and top == "aten::add_":  # `_loss_sum += loss.detach()`
        return "loss (cross-entropy, eager), the loss sum"
    if event.name in COPIES:
        return "layout copies (weight to channels-last, gradient copies)"
    return OTHER


def generated_code(cache_dir: str) -> list[dict]:
    """Inductor's output code in `cache_dir`: per graph (forward, backward), its C++ kernels and extern calls."""
    graphs = []
    for path in sorted(glob.glob(os.path.join(cache_dir, "**", "*.py"), recursive=True)):
        with open(path) as f:
            text = f.read()
        if "def call(" not in text:
            continue
        body = text.split("def call(", 1)[1]
        graphs.append(
            {
                "graph": "backward" if "tangents_" in body else "forward",
                "kernels": re.findall(r"^(cpp_fused_\w+) = async_compile\.cpp", text, re.M),
                "extern": re.findall(
                    r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(", body
                ),
            }
        )
    return sorted(graphs, key=lambda g: g["graph"] != "forward")


def profile_child(spec: dict) -> dict:
    """In a fresh process: the compiled peer's step under torch.profiler, self time per piece, the generated code."""
    cache_dir = tempfile.mkdtemp(prefix="torch_profile_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before torch loads: nothing cached, the code written here
    import torch
    from torch._inductor import config as inductor_config

    from benchmarks import common
    from benchmarks.torch_loop import TorchContender

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel a profiler event of its own name
    recipe = spec["recipe"]
    contender = TorchContender(
        spec["architecture"],
        common.HostData.load(spec["data_npz"]),
        BATCH,
        threads=spec["threads"],
        learning_rate=recipe["learning_rate"],
        weight_decay=recipe["weight_decay"],
        label_smoothing=recipe["label_smoothing"],
        num_epochs=spec["epochs"],
        compile=True,
        data_path="resident",
    )
    contender.run(WARMUP_STEPS)
    cpu, start = os.times(), time.perf_counter()
    contender.run(PROFILED_STEPS)
    wall = time.perf_counter() - start  # untraced
    cpu_seconds = sum(os.times()[:2]) - sum(cpu[:2])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        contender.run(PROFILED_STEPS)
        traced = time.perf_counter() - start
    busy, kernels = collections.Counter(), collections.Counter()
    for event in prof.events():
        busy[piece_of(event)] += event.self_cpu_time_total / 1e6
        name = re.sub(r"^graph_\d+_", "", event.name)
        if name.startswith("cpp_fused"):
            backward = any("Backward" in e.name for e in _ancestors(event))
            kernels[f"{'backward' if backward else 'forward'} {name}"] += event.self_cpu_time_total / 1e6
    busy[OTHER] += max(0.0, traced - sum(busy.values()))  # Python the profiler saw no op for
    code = generated_code(cache_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu_seconds,
        "traced_seconds": traced,
        "steps": PROFILED_STEPS,
        "threads": torch.get_num_threads(),
        "busy": dict(busy),
        "kernel_seconds": dict(kernels),
        "code": code,
    }


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def conv_flop(config) -> dict:
    """A convolution's FLOPs a step, by layer: 2 x batch x output pixels x its kernel's size (the image halves)."""
    channels, flop = [1, *config.model.conv_features], {}
    for i in range(len(channels) - 1):
        flop[f"conv {i + 1}"] = 2 * BATCH * (28 >> i) ** 2 * 9 * channels[i] * channels[i + 1]
    return flop


def profile_compiled_step(config, data) -> dict:
    """`profile_child` in a child process (child.py); the rows of its piece table and of its kernels."""
    from benchmarks import child

    with tempfile.TemporaryDirectory(prefix="torch_profile_data_") as tmp:
        data_npz = os.path.join(tmp, "data.npz")
        data.save(data_npz)
        result = child.run_child(spec_for(config, data_npz))
    steps, traced = result["steps"], result["traced_seconds"]
    flop = conv_flop(config)
    rows = []
    for piece, seconds in sorted(result["busy"].items(), key=lambda item: -item[1]):
        per_step = seconds / steps
        layer_flop = flop.get(" ".join(piece.split()[:2]))
        if layer_flop and "input + weight" in piece:
            layer_flop *= 2
        rows.append(
            {
                "piece": piece,
                "ms_per_step": 1000 * per_step,
                "share": seconds / traced,
                "gflop_per_s": layer_flop / per_step / 1e9 if layer_flop else None,
            }
        )
    kernel_rows = []
    for graph in result["code"]:
        for kernel in graph["kernels"]:
            seconds = result["kernel_seconds"].get(f"{graph['graph']} {kernel}", 0.0)
            kernel_rows.append({"graph": graph["graph"], "kernel": kernel, "ms_per_step": 1000 * seconds / steps})
    return {
        "step_ms": 1000 * result["wall_seconds"] / steps,
        "traced_step_ms": 1000 * traced / steps,
        "busy_cores": result["cpu_seconds"] / result["wall_seconds"],
        "threads": result["threads"],
        "rows": rows,
        "kernel_rows": kernel_rows,
        "code": result["code"],
    }


def code_summary(code: list[dict]) -> str:
    """One paragraph: how many kernels inductor generated and which library kernels each graph calls."""
    parts = []
    for graph in code:
        extern = ", ".join(f"{name} x{n}" for name, n in collections.Counter(graph["extern"]).items())
        parts.append(f"{graph['graph']}: {len(graph['kernels'])} C++ kernels, extern {extern}")
    calls = [name for graph in code for name in graph["extern"]]
    fused = [name for name in calls if "pointwise" in name or "mkldnn" in name]
    conv_post_ops = (
        f"oneDNN convolutions with fused post-ops: {', '.join(sorted(set(fused)))}"
        if fused
        else "No convolution with fused post-ops (no mkldnn._convolution_pointwise): the convolutions are plain "
        "aten convolutions (bias inside oneDNN), ReLU and the pool run in inductor's own loops"
    )
    return f"Inductor's generated code, {'; '.join(parts)}. {conv_post_ops}."
