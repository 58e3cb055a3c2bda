"""What every benchmark shares: the data on the host, interleaved rounds, memory and machine facts, tables.

NumPy and the standard library only, so a PyTorch child process measured for its memory does not load JAX.
"""

import dataclasses
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@dataclasses.dataclass(frozen=True)
class HostData:
    """Train, validation and test splits as NumPy arrays: images (N, 28, 28, 1) uint8, labels (N,) int32."""

    train_images: object
    train_labels: object
    validation_images: object
    validation_labels: object
    test_images: object
    test_labels: object

    def save(self, path: str) -> None:
        """Writes the splits to one uncompressed .npz (children load it without JAX)."""
        import numpy as np

        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> "HostData":
        """Reads what `save` wrote."""
        import numpy as np

        with np.load(path) as arrays:
            return cls(**{field.name: arrays[field.name] for field in dataclasses.fields(cls)})


# ---------------------------------------------------------------- rounds


def rotation(names: Sequence[str], rounds: int) -> Iterator[str]:
    """Each name once per round; the order rotates, so no contender always follows the same neighbour."""
    names = list(names)
    for r in range(rounds if names else 0):
        yield from names[r % len(names) :] + names[: r % len(names)]


@dataclasses.dataclass
class Rounds:
    """Per-round wall seconds, process CPU seconds and images of one in-process contender."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    images: list[int] = dataclasses.field(default_factory=list)

    def images_per_second(self) -> list[float]:
        """Images per second of each round."""
        return [n / s for n, s in zip(self.images, self.seconds, strict=True)]

    def cpu_per_wall(self) -> float:
        """Cores kept busy by the whole process while this contender ran."""
        return sum(self.cpu_seconds) / max(sum(self.seconds), 1e-9)


def interleave(runners: dict[str, Callable[[], int]], rounds: int) -> dict[str, Rounds]:
    """Times each runner (it trains, blocks and returns the images it processed) once per round, alternating."""
    results = {name: Rounds() for name in runners}
    for name in rotation(runners, rounds):
        cpu_start, start = process_cpu_seconds(), time.perf_counter()
        images = runners[name]()
        results[name].seconds.append(time.perf_counter() - start)
        results[name].cpu_seconds.append(process_cpu_seconds() - cpu_start)
        results[name].images.append(images)
    return results


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the rounds were."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def ratio(values: Sequence[float], bases: Sequence[float]) -> float:
    """The median of the round-by-round ratios values[i] / bases[i]."""
    return median([v / b for v, b in zip(values, bases, strict=True)])


# ---------------------------------------------------------------- processes


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of the live descendants of `pid` (e.g. W&B's service process)."""
    ticks, parents = os.sysconf("SC_CLK_TCK"), {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    total, frontier = 0.0, {pid or os.getpid()}
    while frontier:
        frontier = {child for child, (parent, _) in parents.items() if parent in frontier}
        total += sum(parents[child][1] for child in frontier)
    return total


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM, MiB); not ru_maxrss, which Linux carries across exec."""
    with open("/proc/self/status") as f:
        return next((float(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), float("nan"))


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine_facts() -> dict:
    """CPU model, cores, memory, Python, the date and the command."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return tuple(round(x, 2) for x in os.getloadavg())


# ---------------------------------------------------------------- tables


def format_table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table (also readable as plain text); `align` is one "l" or "r" per column."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * w if a == "l" else "-" * (w - 1) + ":" for w, a in zip(widths, align, strict=True))
    rule += " |"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
