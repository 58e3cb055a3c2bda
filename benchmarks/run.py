"""Benchmarks on the real Fashion-MNIST data: throughput against PyTorch and the host-fed JAX loop, compile and
evaluation time, memory, the CNN on XLA's CPU backend, logging/checkpoint overheads, time to 90%, accuracy.

    python benchmarks/run.py                    # every section but `accuracy` (about 25 min on 2 busy cores)
    python benchmarks/run.py --quick            # a smoke run of the same code (under 3 min); RESULTS.md untouched
    python benchmarks/run.py --only throughput  # one section (or several: --only memory,overhead)
    python benchmarks/run.py --only accuracy    # 3 seeds x 10 epochs of the default CNN (about 10 min a seed)

Each section's figures are kept in benchmarks/results.json (with its date, command and the load average), and
benchmarks/RESULTS.md is rendered from all the sections there. Contenders run in the same process, alternating
in short rounds; the tables give the median round and ratios taken round by round, so that a change in the
machine's load hits every contender alike.
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import children, common, report, sections  # noqa: E402
from benchmarks.common import format_table  # noqa: E402
from benchmarks.overhead import section_overhead  # noqa: E402
from benchmarks.sections import DEFAULT_SECTIONS, SECTIONS, Settings  # noqa: E402

RESULTS_JSON = os.path.join(REPO_ROOT, "benchmarks", "results.json")
RESULTS_MD = os.path.join(REPO_ROOT, "benchmarks", "RESULTS.md")
VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "torch", "numpy", "wandb", "tensorflow-cpu")
SECTION_FUNCTIONS = {
    "throughput": sections.section_throughput,
    "memory": sections.section_memory,
    "cnn_cpu": sections.section_cnn_cpu,
    "scaling": sections.section_scaling,
    "overhead": section_overhead,
    "time_to_90": sections.section_time_to_90,
    "accuracy": sections.section_accuracy,
}


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run; does not touch RESULTS.md")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--data-dir", default="", help="folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--results", default="", help="write the results here (default: benchmarks/RESULTS.md)")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite RESULTS.md from results.json (and notes.md); run nothing"
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--data-npz", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = children.child_main(args.child, json.loads(args.child_spec), args.data_npz)
        print("CHILD_RESULT " + json.dumps(result), flush=True)
        return 0
    if args.render_only:
        with open(RESULTS_JSON) as f:
            results = json.load(f)
        with open(args.results or RESULTS_MD, "w") as f:
            f.write(report.render_markdown(results))
        print(f"wrote {args.results or RESULTS_MD} from {RESULTS_JSON}")
        return 0
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(DEFAULT_SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    try:
        import torch  # noqa: F401
    except ImportError:
        print("benchmarks need PyTorch for the comparison: pip install -r benchmarks/requirements.txt", file=sys.stderr)
        return 2
    settings = Settings(args.quick)
    json_path = RESULTS_JSON if not args.quick else ""
    md_path = args.results or (RESULTS_MD if not args.quick else "")
    if args.results and args.quick:
        json_path = os.path.splitext(args.results)[0] + ".json"

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks import jax_loops

    machine = common.machine_facts()
    versions = common.package_versions(VERSIONS)
    print(
        f"{machine['cpu']}, {machine['cores']} cores; load {common.load_average()}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        flush=True,
    )
    data = jax_loops.load_host_data(args.data_dir)
    results = {}
    if json_path and os.path.exists(json_path):
        with open(json_path) as f:
            results = json.load(f)
    results["_meta"] = {"machine": machine, "versions": versions}
    with tempfile.TemporaryDirectory(prefix="mnist_flax_bench_data_") as tmp:
        data_path = os.path.join(tmp, "data.npz")
        data.save(data_path)
        for name in chosen:
            print(f"\n== {name}" + (" (quick)" if args.quick else ""), flush=True)
            load_before, start = common.load_average(), time.perf_counter()
            result = SECTION_FUNCTIONS[name](data, settings, data_path)
            entry = {
                "result": result,
                "command": machine["command"],
                "date": common.machine_facts()["date"],
                "minutes": (time.perf_counter() - start) / 60,
                "load_before": load_before,
                "load_after": common.load_average(),
            }
            results[name] = entry
            title, renderer = report.RENDERERS[name]
            print(f"\n### {title}  ({entry['minutes']:.1f} min, load {load_before} -> {entry['load_after']})\n")
            print(renderer(result), flush=True)
            if json_path:
                with open(json_path, "w") as f:
                    json.dump(results, f, indent=1, default=float)
            if md_path:
                with open(md_path, "w") as f:
                    f.write(report.render_markdown(results))
    print("\n### Targets\n")
    print(format_table(["target", "measured", "status"], report.targets(results), "lll"))
    if md_path:
        print(f"\nwrote {md_path}" + (f" and {json_path}" if json_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
