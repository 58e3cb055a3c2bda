"""How long a fresh setup takes: pip against uv installing the same locked packages into a new venv.

    python benchmarks/install.py [--rounds 2] [--results benchmarks/RESULTS.md]

Both install exactly uv.lock's packages for this machine (the run's and the dev group: what `make setup` makes):
uv with `uv sync --locked` (what tools/setup_venv.sh runs), pip with `pip install --require-hashes` of
`uv export`'s requirements file (the same pins and hashes). Each round, each installer starts twice: cold (an
empty download cache, so every wheel comes from the package index) and then warm (its cache from the cold
start, a fresh venv). The installers alternate round by round; the ratios are medians of round-by-round
ratios. The venv's own creation (`python -m venv`) and uv's bootstrap are not counted. Network-bound: the
figures move with the registry's and the proxy's speed more than with the CPU.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import report  # noqa: E402
from benchmarks.common import REPO_ROOT, rotation  # noqa: E402

UV = os.path.join(sys.prefix, "bin", "uv")


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"install.py: {' '.join(command[:3])} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def install(installer: str, work: str, cache: str, requirements: str) -> float:
    """Seconds to install the locked packages into a fresh venv under `work` with `cache` as the download cache."""
    venv = os.path.join(work, f"venv-{installer}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    if installer == "uv":
        env.update(UV_PROJECT_ENVIRONMENT=venv, UV_CACHE_DIR=cache, UV_PYTHON_DOWNLOADS="never")
        command = [UV, "sync", "--locked", "--quiet", "--project", REPO_ROOT]
    else:
        env.update(PIP_CACHE_DIR=cache, PIP_DISABLE_PIP_VERSION_CHECK="1")
        command = [os.path.join(venv, "bin", "pip"), "install", "-qq", "--require-hashes", "-r", requirements]
    seconds = _timed(command, env)
    shutil.rmtree(venv)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", default=report.RESULTS_MD, help="RESULTS.md to rewrite ('' for none)")
    args = parser.parse_args(argv)
    if not os.access(UV, os.X_OK):
        raise SystemExit("install.py: run it in the project environment (make setup; .venv/bin/python ...)")
    started = report.start()
    started["command"] = "python benchmarks/install.py " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="install-bench-") as work:
        requirements = os.path.join(work, "requirements.txt")
        with open(requirements, "w") as f:
            subprocess.run(
                [UV, "export", "--frozen", "--quiet", "--format", "requirements-txt", "--no-emit-project"],
                cwd=REPO_ROOT,
                stdout=f,
                check=True,
            )
        with open(requirements) as f:
            packages = sum(1 for line in f if "==" in line)
        for installer in rotation(["pip", "uv"], args.rounds):
            cache = os.path.join(work, f"cache-{installer}")
            shutil.rmtree(cache, ignore_errors=True)
            for state in ("cold", "warm"):
                took = install(installer, work, cache, requirements)
                seconds.setdefault((installer, state), []).append(took)
                print(f"{installer} {state}: {took:.1f} s", flush=True)
    rows = []
    for state in ("cold", "warm"):
        ratios = [p / u for p, u in zip(seconds[("pip", state)], seconds[("uv", state)], strict=True)]
        for installer in ("pip", "uv"):
            rounds = seconds[(installer, state)]
            rows.append(
                {
                    "cache": state,
                    "installer": installer,
                    "seconds": statistics.median(rounds),
                    "rounds": ", ".join(f"{s:.1f}" for s in rounds),
                    "speedup": statistics.median(ratios) if installer == "uv" else 1.0,
                }
            )
    result = {
        "summary": f"{packages} locked packages (uv.lock for this machine, the dev group included) into a fresh venv.",
        "tables": [
            {
                "columns": [
                    ["download cache", "cache", "{}"],
                    ["installer", "installer", "{}"],
                    ["seconds (median)", "seconds", "{:.1f}"],
                    ["rounds", "rounds", "{}"],
                    ["pip / uv", "speedup", "{:.1f}x"],
                ],
                "rows": rows,
            }
        ],
    }
    if args.results:
        report.record_beside(args.results, "install", result, started)
    for row in rows:
        print(
            f"{row['cache']:>4} {row['installer']:>3}: {row['seconds']:.1f} s ({row['rounds']}) {row['speedup']:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
