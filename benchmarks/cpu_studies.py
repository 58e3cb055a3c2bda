"""Studies of the CNN's train step on XLA's CPU backend, apart from the headline benchmark (run.py).

    python benchmarks/cpu_studies.py            # formulations, batch split x fused steps, batch size, XLA flags
    python benchmarks/cpu_studies.py --quick    # a smoke run of the same code; RESULTS.md untouched

The library's compiled step alone (pieces.StepTimer), in-process contenders alternating in short rounds, with every
knob given: the convolution and pooling formulations (same parameters, same outputs), the batch split into pieces
for the convolutions against steps fused without a loop (the figures behind the CPU defaults), the batch size, and
XLA flags (a child process each). Recorded in results.json as `cnn_cpu` and rendered into RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, pieces, report  # noqa: E402
from benchmarks.common import FASHION_DIR, ratio  # noqa: E402
from mnist_flax.training import steps  # noqa: E402

FLAG_SETS = (
    "",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_experimental_ynn_fusion_type=-reduce",
)
# (conv_impl, pieces, steps per call, written out) of the split x fused study; the last: the previous default.
SPLIT_VARIANTS = ((1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 3), (1, 10), (4, 3), (8, 2), (8, 3), (8, 5), (8, 10))


def conv3x3_xla(x, kernel):
    """3x3 SAME convolution through XLA's native convolution (nn.Conv's)."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv3x3_shifted_matmul(x, kernel):
    """The same convolution as nine shifted slices and one matrix multiply (the library's former `shifted_matmul`)."""
    kh, kw, cin, cout = kernel.shape
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return patches @ kernel.reshape(kh * kw * cin, cout)


# ---------------------------------------------------------------- formulations of the same CNN


def conv3x3_nchw(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's convolution in NCHW/OIHW layout, NHWC in and out: the same maths and parameters."""
    y = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2),
        kernel.transpose(3, 2, 0, 1),
        (1, 1),
        "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y.transpose(0, 2, 3, 1)


@jax.custom_vjp
def conv3x3_xla_nchw_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's NHWC convolution forward and input gradient; the weight gradient computed in NCHW layout."""
    return conv3x3_xla(x, kernel)


def _conv_fwd(x, kernel):
    return conv3x3_xla(x, kernel), (x, kernel)


def _conv_bwd(residuals, grad):
    x, kernel = residuals
    grad_x = jax.vjp(lambda xx: conv3x3_xla(xx, kernel), x)[1](grad)[0]
    return grad_x, jax.vjp(lambda kk: conv3x3_nchw(x, kk), kernel)[1](grad)[0]


conv3x3_xla_nchw_grad.defvjp(_conv_fwd, _conv_bwd)
CONVS = {
    "xla": conv3x3_xla,
    "shifted_matmul": conv3x3_shifted_matmul,
    "xla_nchw": conv3x3_nchw,
    "xla_nchw_grad": conv3x3_xla_nchw_grad,
}
POOLS = {
    "window": lambda x: nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2)),  # the CNN's
    "reshape": lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).mean(axis=(2, 4)),
}


class StudyConv3x3(nn.Module):
    """A 3x3 convolution's parameters (nn.Conv's) with any formulation of CONVS."""

    features: int
    impl: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        return CONVS[self.impl](x, kernel) + self.param("bias", nn.initializers.zeros_init(), (self.features,))


class StudyCNN(nn.Module):
    """The CNN (models/cnn.py: the same outputs) with a choice of convolution and pooling formulation."""

    conv_impl: str = "xla"
    pool: str = "window"
    conv_features: tuple = (32, 64)
    dense_features: tuple = (256,)
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate(self.conv_features):
            x = POOLS[self.pool](nn.relu(StudyConv3x3(features, self.conv_impl, name=f"Conv3x3_{i}")(x)))
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(nn.Dense(features)(x)))
        return nn.Dense(10)(x)


# ---------------------------------------------------------------- the studies


def timed_rows(timers: dict, round_steps: int, rounds: int, base: str | None = None) -> list[dict]:
    """Interleaved rounds of each StepTimer: images/s, the round-by-round ratio to `base`, cores, compile."""
    for timer in timers.values():
        timer.run(timer.steps_per_call)  # the first calls allocate
    timed = common.interleave({k: (lambda t=t: t.run(round_steps(t))) for k, t in timers.items()}, rounds)
    base_ips = timed[base or next(iter(timed))].images_per_second()
    return [
        {
            "label": label,
            "images_per_second": common.median(rounds.images_per_second()),
            "vs_base": ratio(rounds.images_per_second(), base_ips),
            "cpu_per_wall": rounds.cpu_per_wall(),
            "compile_seconds": timers[label].compile_train_seconds,
        }
        for label, rounds in timed.items()
    ]


def formulations(data, quick: bool, rounds: int) -> list[dict]:
    """Convolution and pooling formulations of the same model, batch 128, one step a call."""
    variants = [("xla", "window"), ("xla", "reshape")]
    if not quick:
        variants += [("shifted_matmul", "window"), ("xla_nchw", "window"), ("xla_nchw_grad", "window")]
    config, timers, logits = pieces.load_config(), {}, {}
    for conv, pool in variants:
        label = f"conv={conv}, pool={pool}"
        timers[label] = pieces.StepTimer(config, data, model=StudyCNN(conv, pool))
        state = timers[label].state  # the same seed gives the same parameter tree
        logits[label] = state.apply_fn({"params": state.params}, steps.preprocess(data.test_images[:256]))
    rows = timed_rows(timers, lambda t: 10 if quick else 20, rounds)
    first = next(iter(logits.values()))
    for row in rows:
        row["max_abs_logit_diff"] = float(np.abs(np.asarray(logits[row["label"]] - first)).max())
    return rows


def split_and_fused(data, quick: bool, rounds: int) -> list[dict]:
    """The batch split into pieces for the convolutions against fused steps (conv=xla, batch 128)."""
    config, timers = pieces.load_config(), {}
    variants = [("xla", p, n, True) for p, n in (((1, 1), (8, 3)) if quick else SPLIT_VARIANTS)]
    variants += [] if quick else [("shifted_matmul", 1, 10, False)]
    for impl, split, fused, written_out in variants:
        label = f"conv={impl} on {split} piece(s), {fused} step(s)/call" + ("" if written_out else " in a scan")
        timers[label] = pieces.StepTimer(
            config,
            data,
            model=StudyCNN(impl),
            steps_per_call=fused,
            scan_unroll=fused if written_out else 1,
            batch_split=split,
        )
    return timed_rows(timers, lambda t: 10 if quick else 30, rounds)


def batch_sizes(data, quick: bool, rounds: int) -> list[dict]:
    """Smaller and larger whole batches (conv=xla, one step a call), the same images a round."""
    sizes = () if quick else (32, 64, 128, 256)
    timers = {f"batch {b}": pieces.StepTimer(pieces.load_config(batch_size=b), data) for b in sizes}
    return timed_rows(timers, lambda t: max(1, 2560 // t.batch_size), rounds, "batch 128") if timers else []


def xla_flags(data_npz: str, quick: bool) -> list[dict]:
    """conv=xla against conv=shifted_matmul under each XLA flag set, a child process each."""
    rows = []
    for flags in () if quick else FLAG_SETS:
        print(f"  XLA_FLAGS={flags!r}", flush=True)
        command = [sys.executable, os.path.abspath(__file__), "--flags-child", data_npz]
        done = subprocess.run(command, env={**os.environ, "XLA_FLAGS": flags}, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"XLA_FLAGS={flags!r}: " + done.stderr.strip().splitlines()[-1])
        rows.append({"xla_flags": flags or "(none)", **json.loads(done.stdout.strip().splitlines()[-1])})
        rows[-1]["xla_vs_shifted"] = rows[-1]["xla"] / rows[-1]["shifted_matmul"]
    return rows


def flags_child(data_npz: str) -> dict:
    """Images/s of the two formulations in this process (XLA_FLAGS set by the parent)."""
    data, config = common.HostData.load(data_npz), pieces.load_config()
    timers = {i: pieces.StepTimer(config, data, model=StudyCNN(i)) for i in ("xla", "shifted_matmul")}
    return {row["label"]: row["images_per_second"] for row in timed_rows(timers, lambda t: 20, 2)}


IPS, VS, CORES = (
    ["images/s", "images_per_second", "{:,.0f}"],
    ["vs first", "vs_base", "{:.2f}x"],
    ["cores", "cpu_per_wall", "{:.2f}"],
)
VARIANT, COMPILE = ["variant", "label", "{}"], ["compile s", "compile_seconds", "{:.1f}"]
CAPTIONS = {
    "formulations": "Formulations of the same model (same parameters; max |logit difference| from the first), "
    "batch 128, 1 step/call, whole batch:",
    "fused": "The batch split into pieces the model is applied to (`train.batch_split`) and steps fused without a "
    "loop (`train.steps_per_call`, written out unless in a scan), batch 128; compile s = the train step's:",
    "batch_sizes": "Batch size (whole batch, 1 step/call, the same images a round):",
    "xla_flags": "XLA flags (a child process each; batch 128, whole batch, 1 step/call; images/s):",
}
COLUMNS = {
    "formulations": [VARIANT, IPS, VS, CORES, ["max abs logit diff", "max_abs_logit_diff", "{:.1e}"], COMPILE],
    "fused": [VARIANT, IPS, VS, CORES, COMPILE],
    "batch_sizes": [VARIANT, IPS, ["vs batch 128", "vs_base", "{:.2f}x"], CORES],
    "xla_flags": [
        ["XLA_FLAGS", "xla_flags", "{}"],
        ["conv=xla", "xla", "{:,.0f}"],
        ["conv=shifted_matmul", "shifted_matmul", "{:,.0f}"],
        ["xla / shifted", "xla_vs_shifted", "{:.2f}x"],
    ],
}


def studies_result(data, data_npz: str, quick: bool, rounds: int) -> dict:
    """Every study, as a `cnn_cpu` result with its tables."""
    result = {}
    for name, study in (("formulations", formulations), ("fused", split_and_fused), ("batch_sizes", batch_sizes)):
        print(f"== {name}", flush=True)
        result[name] = study(data, quick, rounds)
    result["xla_flags"] = xla_flags(data_npz, quick)
    result["tables"] = [{"caption": CAPTIONS[k], "columns": COLUMNS[k], "rows": result[k]} for k in CAPTIONS]
    return result


def main(argv=None) -> int:
    """Runs the studies; records them unless quick."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run; does not touch RESULTS.md")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3; quick 2)")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--flags-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flags_child:
        print(json.dumps(flags_child(args.flags_child)), flush=True)
        return 0
    started = report.start()
    print(f"{started['cpu']}, {started['cores']} cores; load {started['load']}", flush=True)
    data = pieces.load_host_data(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="mnist_flax_bench_data_") as tmp:
        data.save(os.path.join(tmp, "data.npz"))
        result = studies_result(
            data, os.path.join(tmp, "data.npz"), args.quick, args.rounds or (2 if args.quick else 3)
        )
    paths = ("", "") if args.quick else (report.RESULTS_JSON, report.RESULTS_MD)
    entry = report.record(report.load(paths[0]), "cnn_cpu", result, started, *paths)
    print("\n" + report.render_entry("cnn_cpu", entry), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
