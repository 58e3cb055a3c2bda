"""bfloat16 against float32 for the pieces of the default CNN's step on XLA's CPU backend.

    python benchmarks/bf16.py                # prints the table; recorded in results.json as `bf16`
    python benchmarks/bf16.py --results ''   # prints it, records nothing

Where the CPU has AVX512_BF16 (Zen 5, recent Xeons), XLA's CPU backend may run bfloat16 dots on those instructions.
Each piece is timed as the default step runs it (batch 128; the convolutions
on 8 pieces of 16, side by side), on float32 data cast to bfloat16 inside the compiled function with float32
accumulation (`preferred_element_type`), as a mixed-precision model with float32 parameters would compute; the two
dtypes alternate round by round, and the ratio is the median of round-by-round ratios. The dense layers' share of
the step is in 'Where the CNN's step goes' (roofline.py).
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common, report  # noqa: E402
from benchmarks.roofline import time_call  # noqa: E402

BATCH, PIECES, ROUNDS, CALLS = 128, 8, 5, 40
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def conv(x, kernel, dtype):
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )


def dense(x, kernel, dtype):
    return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def pieces_of(x):
    """The batch as the model splits it: PIECES interleaved pieces, each run on its own."""
    grouped = x.reshape((x.shape[0] // PIECES, PIECES, *x.shape[1:]))
    return [grouped[:, p] for p in range(PIECES)]


def cases() -> dict:
    """name -> (fn(dtype) -> jitted function, its arguments)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x1 = jax.random.uniform(keys[0], (BATCH, 28, 28, 1))
    x2 = jax.random.normal(keys[1], (BATCH, 14, 14, 32))
    k1 = jax.random.normal(keys[2], (3, 3, 1, 32)) * 0.3
    k2 = jax.random.normal(keys[3], (3, 3, 32, 64)) * 0.06
    h = jax.random.normal(keys[4], (BATCH, 7 * 7 * 64))
    w1, w2 = jax.random.normal(keys[5], (7 * 7 * 64, 256)) * 0.02, jnp.ones((256, 10)) * 0.06

    def conv2_forward(dtype):
        return jax.jit(lambda x, k: [conv(p, k, dtype) for p in pieces_of(x)])

    def conv2_grads(dtype):
        loss = lambda x, k: sum(jnp.sum(conv(p, k, dtype) ** 2) for p in pieces_of(x))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    def conv1_weight_grad(dtype):
        loss = lambda x, k: sum(jnp.sum(conv(p, k, dtype) ** 2) for p in pieces_of(x))  # noqa: E731
        return jax.jit(lambda x, k: [conv(p, k, dtype) for p in pieces_of(x)] + [jax.grad(loss, argnums=1)(x, k)])

    def dense_layers(dtype):
        def loss(h, w1, w2):
            return jnp.sum(dense(jax.nn.relu(dense(h, w1, dtype)), w2, dtype) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    return {
        "conv 2 forward (8 pieces of 16)": (conv2_forward, (x2, k2)),
        "conv 2 forward + both gradients": (conv2_grads, (x2, k2)),
        "conv 1 forward + weight gradient": (conv1_weight_grad, (x1, k1)),
        "dense layers, forward + gradients (batch 128)": (dense_layers, (h, w1, w2)),
    }


def measure(rounds: int = ROUNDS) -> dict:
    rows = []
    for name, (build, args) in cases().items():
        fns = {dtype: build(dt) for dtype, dt in DTYPES.items()}
        times = {dtype: [] for dtype in DTYPES}
        for dtype in common.rotation(list(DTYPES), rounds):
            times[dtype].append(time_call(fns[dtype], args, CALLS))  # after one call (the first compiles)
        f32, bf16 = times["float32"], times["bfloat16"]
        rows.append(
            {
                "piece": name,
                "f32_ms": common.median(f32) * 1e3,
                "bf16_ms": common.median(bf16) * 1e3,
                "speedup": common.ratio(f32, bf16),
            }
        )
    with open("/proc/cpuinfo") as f:
        has_bf16 = "avx512_bf16" in f.read()
    return {
        "summary": f"AVX512_BF16 {'present' if has_bf16 else 'absent'} on this CPU. {rounds} alternating rounds of "
        f"{CALLS} calls per piece and dtype; speed-up = float32 time / bfloat16 time.",
        "tables": [
            {
                "caption": "",
                "columns": [
                    ["piece (the default step's shapes)", "piece", "{}"],
                    ["float32 ms", "f32_ms", "{:.3f}"],
                    ["bfloat16 ms", "bf16_ms", "{:.3f}"],
                    ["bfloat16 speed-up", "speedup", "{:.2f}x"],
                ],
                "rows": rows,
            }
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--results", default=report.RESULTS_MD, help="RESULTS.md to rewrite ('' for none)")
    args = parser.parse_args(argv)
    started = report.start()
    result = measure(args.rounds)
    if args.results:
        json_path = os.path.join(os.path.dirname(os.path.abspath(args.results)), "results.json")
        results = report.load(json_path)
        report.record(results, "bf16", result, started, json_path, args.results)
        print(report.render_entry("bf16", results["bf16"]))
    else:
        print(report.render_table(result["tables"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
