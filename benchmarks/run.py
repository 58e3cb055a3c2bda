"""The headline benchmark on the real Fashion-MNIST data: `train_and_evaluate` against PyTorch and the Flax
example's host-fed loop, on 1-8 CPU devices, with and without tracking, to 90%, in accuracy, and against an old commit.

    python benchmarks/run.py                      # every section but accuracy and baseline (about 30 min on 2 cores)
    python benchmarks/run.py --quick              # a smoke run of the same code (under 3 min); RESULTS.md untouched
    python benchmarks/run.py --only throughput    # one section (or several: --only scaling,overhead)
    python benchmarks/run.py --only accuracy      # 3 seeds x 10 epochs of the default CNN (about 10 min a seed)
    python benchmarks/run.py --only baseline --baseline-rev aa717e7   # that commit's run beside this checkout's
    python benchmarks/run.py --only whole_run     # 10 epochs each: ours (bare, tracked), PyTorch, torch.compile
    python benchmarks/run.py --only trials        # sweeps of one-epoch trials: overhead, trials/hour, compiles

Each section's result is kept in benchmarks/results.json (with its date, command, CPU and load average) and
benchmarks/RESULTS.md is rendered from all of them. The studies of the CNN's step on CPU are apart, in
cpu_studies.py; the GPU script is gpu.py.
"""

import argparse
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import report, sections  # noqa: E402
from benchmarks.common import FASHION_DIR, format_table  # noqa: E402
from benchmarks.overhead import section_overhead  # noqa: E402
from benchmarks.trials import section_trials  # noqa: E402

SECTIONS = {
    "throughput": sections.section_throughput,
    "scaling": sections.section_scaling,
    "overhead": section_overhead,
    "time_to_90": sections.section_time_to_90,
    "accuracy": sections.section_accuracy,
    "baseline": sections.section_baseline,
    "whole_run": sections.section_whole_run,
    "trials": section_trials,
}
DEFAULT_SECTIONS = ("throughput", "whole_run", "scaling", "overhead", "time_to_90")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run; does not touch RESULTS.md")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds per contender (default 3; quick 1)")
    parser.add_argument("--baseline-rev", default="HEAD", help="the old commit of the baseline section")
    parser.add_argument("--cases", default="", help="throughput cases as MODEL:BATCH, comma-separated (cnn:128)")
    parser.add_argument("--data-dir", default=FASHION_DIR, help="folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--results", default="", help="write RESULTS.md here (and its .json beside it)")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results.json; run nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Runs the chosen sections, recording each as it ends."""
    args = parse_args(argv)
    md_path = args.results or ("" if args.quick else report.RESULTS_MD)
    json_path = os.path.splitext(args.results)[0] + ".json" if args.results else md_path and report.RESULTS_JSON
    if args.render_only:
        with open(md_path or report.RESULTS_MD, "w") as f:
            f.write(report.render_markdown(report.load()))
        return 0
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(DEFAULT_SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if {"throughput", "whole_run"} & set(chosen) and not _has_torch():
        print("the throughput section needs PyTorch: pip install -r benchmarks/requirements.txt", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow loads with the writers (overhead)
    from benchmarks import pieces

    machine = report.start()
    print(f"{machine['cpu']}, {machine['cores']} cores; load {machine['load']}", flush=True)
    results = report.load(json_path)
    with tempfile.TemporaryDirectory(prefix="mnist_flax_bench_data_") as tmp:
        data_npz = os.path.join(tmp, "data.npz")
        pieces.load_host_data(args.data_dir).save(data_npz)
        architectures = {m: _architecture(pieces.load_config(f"configs/{m}.py")) for m in ("cnn", "mlp")}
        settings = sections.Settings(args.quick, args.rounds)
        if args.cases:
            settings.cases = tuple((m, int(b)) for m, b in (case.split(":") for case in args.cases.split(",")))
        ctx = sections.Context(settings, args.data_dir, data_npz, architectures, args.baseline_rev)
        for name in chosen:
            print(f"\n== {name}" + (" (quick)" if args.quick else ""), flush=True)
            started = report.start()
            entry = report.record(results, name, SECTIONS[name](ctx), started, json_path, md_path)
            print("\n" + report.render_entry(name, entry), flush=True)
    print("\n### Targets\n\n" + format_table(["target", "measured", "status"], report.targets(results), "lll"))
    if md_path:
        print(f"\nwrote {md_path} and {json_path}")
    return 0


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _architecture(config) -> dict:
    """The model's shapes, for the PyTorch twin."""
    return {
        "conv_features": tuple(config.model.get("conv_features", ())) if config.model.name == "cnn" else (),
        "dense_features": tuple(config.model.dense_features),
        "dropout_rate": float(config.model.dropout_rate),
    }


if __name__ == "__main__":
    sys.exit(main())
