"""The one timing helper every benchmark uses: warm-up, repeats, median, and a
header naming the machine and thread count, so figures in RESULTS.md can be
reproduced and compared."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable


def machine_info(threads: int | None = None) -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import netdissect_fast as ndf
        isa = ndf.backends()["cpu"]["detail"]
    except Exception as e:  # the benchmark still prints what it can
        isa = f"netdissect_fast not importable: {e}"
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu}, {ncpu} cores{mem}; {platform.python_implementation()} {platform.python_version()}; "
            f"threads={threads if threads is not None else ncpu}; {isa}")


@dataclass
class Timing:
    name: str
    median: float
    runs: list

    def per(self, n: float) -> float:
        return self.median / n


def measure(name: str, fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median wall time of fn() over `repeats` runs after `warmup` runs;
    `setup` (untimed) runs before each call."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    runs = []
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(name, statistics.median(runs), runs)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(rows: list[tuple], header: tuple) -> str:
    """A fixed-width table as text (also valid Markdown)."""
    cols = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cols[1:]]
    return "\n".join(out)
