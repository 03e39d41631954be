"""Shared helpers for the benchmarks: hardware metadata, timing and saving results.

Nothing here knows about a particular workload; a benchmark script imports this
module as ``benchmarks._harness`` (each script puts the project root on ``sys.path``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"


# Hardware and software metadata
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit, read from ``.git`` directly (no git process is run)."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, _common_dir(git)):
            ref_file = base / ref
            if ref_file.is_file():
                return ref_file.read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except OSError:
        pass
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_metadata(packages: Iterable[str] = ()) -> dict[str, Any]:
    memory = _memory_bytes()
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": _usable_cores(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "os": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sqlite_library": _sqlite_version(),
        "packages": package_versions(packages),
        "git_commit": git_commit(),
        "hostname": platform.node(),
    }


def _sqlite_version() -> str | None:
    try:
        import sqlite3

        return sqlite3.sqlite_version
    except ImportError:
        return None


# Timing
def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, after a full garbage collection."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class GCTimer:
    """Counts the garbage collector's passes and the time they take while active.

    Use as ``with GCTimer() as gc_time: ...``; then ``gc_time.seconds`` and
    ``gc_time.collections`` (per generation) tell how much of a run was the GC's.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


def timed_with_gc(fn: Callable[[], Any]) -> tuple[float, GCTimer]:
    """Like ``timed``, also returning how much of the time the garbage collector took."""
    gc.collect()
    with GCTimer() as gc_time:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, gc_time


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


class Stopwatch:
    """Wall time since creation, for keeping a whole run inside its budget."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# Saving and showing results
def utc_stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def save_results(name: str, results: Mapping[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write ``results`` as ``<directory>/<name>-<UTC timestamp>.json``; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{utc_stamp()}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table on stderr (rich when available, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}", file=sys.stderr)
        print(" | ".join(columns), file=sys.stderr)
        for row in rows:
            print(" | ".join(_fmt(cell) for cell in row), file=sys.stderr)
        return
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(_fmt(cell) for cell in row))
    Console(stderr=True).print(table)


def _fmt(cell: Any) -> str:
    if isinstance(cell, float):
        if cell >= 1000:
            return f"{cell:,.0f}"
        if cell >= 10:
            return f"{cell:.1f}"
        return f"{cell:.3f}"
    return "" if cell is None else str(cell)


def goals_met(headline: Mapping[str, Any], goals: Mapping[str, tuple[str, float]]) -> dict[str, bool | None]:
    """Each goal ``key: (">=" or "<=", target)`` checked against the headline (None: not measured)."""
    return {
        f"{key} {op} {target:g}": None if headline[key] is None
        else (headline[key] >= target if op == ">=" else headline[key] <= target)
        for key, (op, target) in goals.items()
    }  # fmt: skip


def report(name: str, title: str, full: Mapping[str, Any], directory: Path, watch: Stopwatch) -> None:
    """Save ``full`` and show its headline: a table, the goals, and the headline as the last stdout line."""
    headline = full["headline"]
    path = save_results(name, full, directory)
    print_table(title, ["figure", "value"],
                [[key, value] for key, value in headline.items() if key not in ("benchmark", "mode", "goals_met")])
    log(f"goals: {headline['goals_met']}")
    log(f"results: {path} ({watch.elapsed:.1f}s)")
    print(json.dumps(headline))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
