"""REST API throughput and latency: our server against a bare Litestar app, over real HTTP.

    .venv/bin/python benchmarks/api.py [--quick] [--clients 32] [--write-clients 4]
                                       [--loadgen {auto,asyncio,wrk}]

Two servers, each its own process, on loopback with the same
ASGI server and options (uvicorn, 1 worker, log level warning, its defaults otherwise):

- ours: ``python -m genome_service.cli serve --port P`` on a fresh SQLite database in a
  temp data dir (``GENOME_RATE_LIMIT_PER_MINUTE=0``, ``GENOME_LOG_LEVEL=WARNING``, no API
  keys: open mode on loopback), seeded over HTTP with a persona, genomes and ~20 uploaded
  PEFT layers, some of them attached;
- the floor: this file with ``--serve-floor``, a Litestar app with one async handler that
  returns constant JSON (plus a ``sync_to_thread=True`` twin, an extra figure that shows
  what the thread hop every one of our handlers takes costs by itself).

Workloads (each after a warm-up; every response's status is checked, errors counted):

- get_genome: ``GET /genomes/{id}`` (a genome with 3 layers), ``--clients`` keep-alive
  connections; ``get_ratio`` = get_genome_rps / floor_rps. Nothing is written meanwhile,
  so after the first request each is served by the read cache.
- get_genome_uncached: the same against a second server on the same database started with
  ``GENOME_READ_CACHE=false``: every GET reads SQLite, as the first GET after a write does.
- list_genomes: ``GET /genomes`` (every genome of the owner, with their stacks).
- attach/detach: each of ``--write-clients`` connections owns a genome and alternates
  ``POST /genomes/{id}/layers`` (attach a layer not yet in its stack) with
  ``DELETE /genomes/{id}/layers/{layer}`` (detach it again); the two are timed apart.
  Fewer clients than for reads: SQLite takes one writer at a time (our Database keeps
  one write connection behind a lock), so 32 writers would mostly measure the queue.
  Also run with a single client, for the write's own service time.
- interleaved: with a floor started beside ours, rounds of a burst of GET genome on ours
  then a burst of ``GET /`` on the floor; ``interleaved_get_ratio`` is the median of the
  rounds' rps ratios (``interleaved_cpu_ratio`` of their server CPU per request). A
  neighbour's load on a shared machine then falls on both sides of each round alike.

The load generator (asyncio): raw ``asyncio`` streams writing pre-built HTTP/1.1
requests and parsing only the status line and Content-Length, so it stays light on a
2-core machine; its CPU time and the server's are recorded for every workload. When
``wrk`` is installed the GET and floor workloads are also driven by wrk (one thread,
same connection count) as a cross-check; ``--loadgen wrk`` makes its figures the headline.

The last line of stdout is one JSON object with the headline figures; the full results
go to ``benchmarks/results/api-<UTC timestamp>.json`` and a table goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402

PROJECT_ROOT = harness.PROJECT_ROOT
HOST = "127.0.0.1"
BASE_MODEL = "smollm2-135m-instruct"
PACKAGES = ("litestar", "uvicorn", "h11", "httptools", "uvloop", "msgspec", "sqlalchemy", "httpx", "anyio")
FLOOR_BODY = {"status": "ok", "n": 1}
UVICORN_OPTIONS = {"workers": 1, "log_level": "warning", "factory": True}  # what `genome-service serve` passes

GOALS = {"get_ratio_at_least": 0.6, "get_p95_ms_at_most": 10.0, "attach_layer_p95_ms_at_most": 25.0}


@dataclass(frozen=True)
class Scale:
    requests: int  # per run of a read workload (GET genome, floor, floor_sync)
    list_requests: int
    runs: int  # of each read workload; rps is the median run's
    warmup: int  # requests before each read workload
    write_cycles: int  # attach+detach pairs, all write clients together
    serial_write_cycles: int  # with one client
    write_warmup: int  # cycles per write client before measuring
    wrk_seconds: float
    interleaved_rounds: int  # bursts of `requests // 2` on ours then on the floor, both servers up
    layers: int
    stack_layers: int  # attached to every genome at the start


QUICK = Scale(requests=4000, list_requests=1000, runs=3, warmup=500, write_cycles=400, serial_write_cycles=150,
              write_warmup=5, wrk_seconds=3.0, interleaved_rounds=8, layers=20, stack_layers=3)
FULL = Scale(requests=20_000, list_requests=4000, runs=3, warmup=2000, write_cycles=2000, serial_write_cycles=600,
             write_warmup=20, wrk_seconds=10.0, interleaved_rounds=12, layers=20, stack_layers=3)


# ---------------------------------------------------------------------------
# The floor: a bare Litestar app, served the way `genome-service serve` serves ours.
# ---------------------------------------------------------------------------
def create_floor_app() -> Any:
    from litestar import Litestar, get

    @get("/", sync_to_thread=False)
    async def constant() -> dict[str, Any]:
        return FLOOR_BODY

    @get("/sync", sync_to_thread=True)
    def constant_sync() -> dict[str, Any]:
        return FLOOR_BODY

    return Litestar(route_handlers=[constant, constant_sync])


def serve_floor(port: int) -> None:
    import uvicorn

    uvicorn.run(create_floor_app, host=HOST, port=port, **UVICORN_OPTIONS)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in its own process; stderr goes to a log file so a full pipe never blocks it."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, ready_path: str, log_dir: Path):
        self.name, self.command, self.env, self.port, self.ready_path = name, command, env, port, ready_path
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        import httpx

        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=PROJECT_ROOT,
                                            stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # At log level warning uvicorn does not print "Uvicorn running on": poll instead.
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server did not answer {self.ready_path} within {timeout:.0f}s:\n{self.log_tail()}")

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds of the server process, all its threads."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.start()
        yield server
    finally:
        code = server.stop()
        harness.log(f"  {server.name} server stopped (exit {code})")


def our_server(data_dir: Path, log_dir: Path, name: str = "ours", **settings: str) -> ServerProcess:
    from genome_service.eventstore.migrations import upgrade

    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(f"sqlite:///{data_dir / 'genome.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    env |= {"GENOME_DATA_DIR": str(data_dir), "GENOME_RATE_LIMIT_PER_MINUTE": "0", "GENOME_LOG_LEVEL": "WARNING"}
    env |= {f"GENOME_{key.upper()}": value for key, value in settings.items()}
    port = free_port()
    command = [sys.executable, "-m", "genome_service.cli", "serve", "--port", str(port)]
    return ServerProcess(name, command, env, port, "/health", log_dir)


def floor_server(log_dir: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    return ServerProcess("floor", command, env, port, "/", log_dir)


# ---------------------------------------------------------------------------
# Seeding ours over HTTP
# ---------------------------------------------------------------------------
@dataclass
class Seed:
    persona_id: str
    read_genome_id: str
    write_genome_ids: list[str]
    layer_ids: list[str]
    stack_layer_ids: list[str]  # attached to every genome
    free_layer_ids: list[str]  # attached and detached by the write workloads
    seconds: float
    upload_ms_median: float


def seed(url: str, scale: Scale, write_clients: int) -> Seed:
    import httpx

    from fixtures.make_adapter import make_adapter_files

    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        def ok(response: httpx.Response, status: int) -> dict[str, Any]:
            if response.status_code != status:
                raise RuntimeError(f"seeding: {response.request.method} {response.request.url} answered "
                                   f"{response.status_code}: {response.text[:500]}")
            return response.json()  # type: ignore[no-any-return]

        persona = ok(client.post("/personas", json={"name": "bench persona", "description": "benchmarks/api.py"}), 201)
        layer_ids, upload_ms = [], []
        for n in range(scale.layers):
            files = make_adapter_files("peft", seed=n)
            metadata = {"name": f"bench layer {n}", "base_model": BASE_MODEL, "trait_type": "domain_expertise",
                        "tags": ["bench"]}
            t = time.perf_counter()
            layer = ok(client.post("/layers", files=[("files", (name, data)) for name, data in files.items()],
                                   data={"metadata": json.dumps(metadata)}), 201)
            upload_ms.append((time.perf_counter() - t) * 1000)
            layer_ids.append(layer["id"])
        stack = layer_ids[: scale.stack_layers]
        genome_ids = []
        for g in range(1 + write_clients):
            genome = ok(client.post("/genomes", json={"persona_id": persona["id"], "base_model": BASE_MODEL,
                                                      "name": f"bench genome {g}"}), 201)
            for weight, layer_id in zip((1.0, 0.5, 0.25, 0.125), stack, strict=False):
                genome = ok(client.post(f"/genomes/{genome['id']}/layers",
                                        json={"layer_id": layer_id, "weight": weight}), 200)
            genome_ids.append(genome["id"])
        read = ok(client.get(f"/genomes/{genome_ids[0]}"), 200)
        if [s["layer_id"] for s in read["layers"]] != stack:
            raise RuntimeError(f"seeding: the read genome's stack is {read['layers']}, expected {stack}")
    return Seed(persona["id"], genome_ids[0], genome_ids[1:], layer_ids, stack, layer_ids[scale.stack_layers:],
                time.perf_counter() - start, harness.median(upload_ms))


# ---------------------------------------------------------------------------
# The asyncio load generator
# ---------------------------------------------------------------------------
def request_bytes(method: str, path: str, port: int, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: bench\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; return its status. Only the status line and framing are parsed."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 17)
        length = int(lower[at + 17:end])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif status not in (204, 304) and not 100 <= status < 200:
        raise ValueError(f"response without Content-Length: {head[:200]!r}")
    return status


@dataclass
class Sample:
    """What one workload saw, per kind of request."""

    latencies_ns: dict[str, list[int]]
    statuses: dict[str, Counter[int]]
    errors: dict[str, list[str]]  # exceptions (connection errors, bad framing)


Plan = Callable[[int, int], tuple[str, bytes, int]]  # (client, i-th request of that client) -> (kind, request, expected)


async def _drive(port: int, clients: int, per_client: list[int], plan: Plan, sample: Sample) -> None:
    async def client(c: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for i in range(per_client[c]):
                kind, data, expected = plan(c, i)
                start = time.perf_counter_ns()
                try:
                    writer.write(data)
                    status = await read_response(reader)
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
                    sample.errors.setdefault(kind, []).append(f"{type(error).__name__}: {error}")
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                sample.latencies_ns.setdefault(kind, []).append(time.perf_counter_ns() - start)
                sample.statuses.setdefault(kind, Counter())[status] += 1
                if status != expected:
                    sample.errors.setdefault(kind, []).append(f"status {status}, expected {expected}")
        finally:
            writer.close()

    await asyncio.gather(*(client(c) for c in range(clients)))


def drive(server: ServerProcess, clients: int, total: int, plan: Plan) -> tuple[Sample, dict[str, float]]:
    """Run ``total`` requests over ``clients`` keep-alive connections; time it and both sides' CPU."""
    per_client = [total // clients + (1 if c < total % clients else 0) for c in range(clients)]
    sample = Sample({}, {}, {})
    (user, system), client_cpu, wall = server.cpu_times(), time.process_time(), time.perf_counter()
    asyncio.run(_drive(server.port, clients, per_client, plan, sample))
    wall = time.perf_counter() - wall
    user_after, system_after = server.cpu_times()
    usage = {"seconds": wall, "server_cpu_s": user_after - user + system_after - system,
             "server_user_s": user_after - user, "server_system_s": system_after - system,
             "client_cpu_s": time.process_time() - client_cpu}
    return sample, usage


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def summarise(sample: Sample, usage: dict[str, float], kind: str, count_for_rate: int | None = None,
              errors_cap: int = 10) -> dict[str, Any]:
    latencies = sorted(ns / 1e6 for ns in sample.latencies_ns.get(kind, []))
    errors = sample.errors.get(kind, [])
    seconds = usage["seconds"]
    completed = len(latencies)
    return {
        "requests": completed + sum(1 for e in errors if not e.startswith("status ")),
        "completed": completed,
        "errors": len(errors),
        "error_examples": sorted(Counter(errors).items(), key=lambda kv: -kv[1])[:errors_cap],
        "statuses": {str(k): v for k, v in sorted(sample.statuses.get(kind, Counter()).items())},
        "seconds": round(seconds, 4),
        "rps": round(harness.rate(count_for_rate if count_for_rate is not None else completed, seconds), 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 3), "p90": round(percentile(latencies, 90), 3),
            "p95": round(percentile(latencies, 95), 3), "p99": round(percentile(latencies, 99), 3),
            "max": round(latencies[-1], 3) if latencies else None,
            "mean": round(sum(latencies) / completed, 3) if completed else None,
        },
        "server_cpu_s": round(usage["server_cpu_s"], 3),
        "server_cpu_pct_of_core": round(100 * usage["server_cpu_s"] / seconds, 1) if seconds else None,
        "server_user_s": round(usage["server_user_s"], 3),
        "server_system_s": round(usage["server_system_s"], 3),
        "client_cpu_s": round(usage["client_cpu_s"], 3),
        "client_cpu_pct_of_core": round(100 * usage["client_cpu_s"] / seconds, 1) if seconds else None,
        "server_cpu_us_per_request": round(1e6 * usage["server_cpu_s"] / completed, 1) if completed else None,
    }


def read_workload(server: ServerProcess, path: str, clients: int, requests: int, warmup: int, runs: int) -> dict[str, Any]:
    """``runs`` runs of ``requests`` each: rps is the median run's, latencies are pooled over all runs."""
    data = request_bytes("GET", path, server.port)

    def plan(_c: int, _i: int) -> tuple[str, bytes, int]:
        return "get", data, 200

    drive(server, clients, warmup, plan)
    pooled = Sample({}, {}, {})
    totals: dict[str, float] = {}
    run_rps = []
    for _ in range(runs):
        sample, usage = drive(server, clients, requests, plan)
        run_rps.append(harness.rate(len(sample.latencies_ns.get("get", [])), usage["seconds"]))
        for kind, values in sample.latencies_ns.items():
            pooled.latencies_ns.setdefault(kind, []).extend(values)
        for kind, counts in sample.statuses.items():
            pooled.statuses.setdefault(kind, Counter()).update(counts)
        for kind, errors in sample.errors.items():
            pooled.errors.setdefault(kind, []).extend(errors)
        for key, value in usage.items():
            totals[key] = totals.get(key, 0.0) + value
    summary = summarise(pooled, totals, "get")
    return summary | {"rps": round(harness.median(run_rps), 1), "rps_runs": [round(r, 1) for r in run_rps],
                      "rps_pooled": summary["rps"], "runs": runs, "path": path, "clients": clients}


def interleaved_reads(ours: ServerProcess, genome_path: str, floor: ServerProcess, clients: int, requests: int,
                      warmup: int, rounds: int) -> dict[str, Any]:
    """Both servers up; each round is a burst of ``GET genome_path`` on ours then one of ``GET /`` on the floor.

    On a machine shared with other work a neighbour's load comes and goes within seconds, so
    the sequential runs can catch it on one server and not the other; here each round's pair
    shares it, and the median of the rounds' ratios is the figure.
    """
    requests_ = {"ours": request_bytes("GET", genome_path, ours.port), "floor": request_bytes("GET", "/", floor.port)}
    servers = {"ours": ours, "floor": floor}
    for name, server in servers.items():
        drive(server, clients, warmup, lambda _c, _i, data=requests_[name]: ("get", data, 200))
    rps: dict[str, list[float]] = {"ours": [], "floor": []}
    cpu_us: dict[str, list[float]] = {"ours": [], "floor": []}
    errors = 0
    for _ in range(rounds):
        for name, server in servers.items():
            sample, usage = drive(server, clients, requests, lambda _c, _i, data=requests_[name]: ("get", data, 200))
            done = len(sample.latencies_ns.get("get", []))
            errors += sum(len(e) for e in sample.errors.values())
            rps[name].append(harness.rate(done, usage["seconds"]))
            cpu_us[name].append(1e6 * usage["server_cpu_s"] / done if done else float("nan"))
    return {
        "rounds": rounds, "requests_per_burst": requests, "clients": clients, "errors": errors,
        "get_ratio": round(harness.median([o / f for o, f in zip(rps["ours"], rps["floor"], strict=True)]), 3),
        "cpu_ratio": round(harness.median([f / o for o, f in zip(cpu_us["ours"], cpu_us["floor"], strict=True)]), 3),
        "get_server_cpu_us": round(harness.median(cpu_us["ours"]), 1),
        "floor_server_cpu_us": round(harness.median(cpu_us["floor"]), 1),
        "rps": {name: [round(r, 1) for r in values] for name, values in rps.items()},
        "server_cpu_us_per_request": {name: [round(c, 1) for c in values] for name, values in cpu_us.items()},
    }


def write_workload(server: ServerProcess, seed_: Seed, clients: int, cycles: int, warmup_cycles: int) -> dict[str, Any]:
    """Each client owns genome ``write_genome_ids[c]`` and alternates attach (even i) / detach (odd i)."""
    free = seed_.free_layer_ids
    port = server.port
    cycles = -(-cycles // clients) * clients  # every client ends on a detach
    counters = [0] * clients  # cycles each client has done, across warm-up and run

    def plan(c: int, i: int) -> tuple[str, bytes, int]:
        genome = seed_.write_genome_ids[c]
        layer = free[(c * 5 + counters[c]) % len(free)]
        if i % 2 == 0:
            body = json.dumps({"layer_id": layer, "weight": 0.5}).encode()
            return "attach", request_bytes("POST", f"/genomes/{genome}/layers", port, body), 200
        counters[c] += 1
        return "detach", request_bytes("DELETE", f"/genomes/{genome}/layers/{layer}", port), 200

    drive(server, clients, 2 * warmup_cycles * clients, plan)
    sample, usage = drive(server, clients, 2 * cycles, plan)
    pairs = min(len(sample.latencies_ns.get("attach", [])), len(sample.latencies_ns.get("detach", [])))
    per_write = {"server_cpu_us_per_request": round(1e6 * usage["server_cpu_s"] / (2 * pairs), 1) if pairs else None}
    return {
        "clients": clients,
        "cycles": cycles,
        "writes_per_s": round(harness.rate(2 * pairs, usage["seconds"]), 1),
        "attach": summarise(sample, usage, "attach", count_for_rate=pairs) | per_write | {"path": "POST /genomes/{id}/layers"},
        "detach": summarise(sample, usage, "detach", count_for_rate=pairs) | per_write
                  | {"path": "DELETE /genomes/{id}/layers/{layer_id}"},
        "note": "rps of attach/detach: pairs per second of the whole alternating run; CPU figures are for the "
                "whole run (both kinds), server_cpu_us_per_request per write of either kind",
    }


# ---------------------------------------------------------------------------
# wrk, when installed: a cross-check of the read figures with a load generator in C
# ---------------------------------------------------------------------------
WRK_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, '
    .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %f}\\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_workload(wrk: str, server: ServerProcess, path: str, clients: int, seconds: float, script: Path) -> dict[str, Any]:
    def run(duration: float) -> tuple[dict[str, Any], dict[str, float]]:
        server_cpu, wall = server.cpu_seconds(), time.perf_counter()
        out = subprocess.run([wrk, "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
                              "-s", str(script), server.url + path], check=False, capture_output=True, text=True,
                             timeout=duration + 60)
        wall = time.perf_counter() - wall
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
        return json.loads(line[8:]), {"wall_s": wall, "server_cpu_s": server.cpu_seconds() - server_cpu}

    run(1)  # warm-up
    result, usage = run(seconds)
    duration = result["duration_us"] / 1e6
    errors = sum(v for k, v in result.items() if k.startswith("errors_"))
    return {
        "path": path, "clients": clients, "threads": 1, "requests": result["requests"], "seconds": round(duration, 3),
        "rps": round(result["requests"] / duration, 1), "errors": errors,
        "latency_ms": {p: round(result[f"{p}_us"] / 1000, 3) for p in ("p50", "p90", "p95", "p99", "max")},
        "server_cpu_pct_of_core": round(100 * usage["server_cpu_s"] / usage["wall_s"], 1),
        "raw": result,
    }


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under a minute)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections for reads (default 32)")
    parser.add_argument("--write-clients", type=int, default=4, help="concurrent connections for writes (default 4)")
    parser.add_argument("--loadgen", choices=("auto", "asyncio", "wrk"), default="auto",
                        help="headline read figures from: asyncio (auto) or wrk (needs wrk; auto still cross-checks "
                             "with wrk when it is installed)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.port)
        return 0

    # A SIGTERM (from a CI runner, `timeout`) unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    scale = QUICK if args.quick else FULL
    wrk = None if args.no_wrk else shutil.which("wrk")
    if args.loadgen == "wrk" and wrk is None:
        parser.error("--loadgen wrk: wrk is not installed (or --no-wrk was given)")
    watch = harness.Stopwatch()
    results: dict[str, Any] = {}
    wrk_results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        script = root / "report.lua"
        script.write_text(WRK_SCRIPT)
        harness.log(f"api benchmark ({'quick' if args.quick else 'full'}), temp dir {root}, "
                    f"load generator: asyncio{' + wrk' if wrk else ''}")

        ours = our_server(root / "data", root)
        with running(ours):
            harness.log(f"  ours on {ours.url}: seeding")
            seeded = seed(ours.url, scale, args.write_clients)
            harness.log(f"  seeded {len(seeded.layer_ids)} layers, {1 + len(seeded.write_genome_ids)} genomes "
                        f"in {seeded.seconds:.1f}s; GET /genomes/{{id}} {scale.runs} x {scale.requests}")
            genome_path = f"/genomes/{seeded.read_genome_id}"
            results["get_genome"] = read_workload(ours, genome_path, args.clients, scale.requests, scale.warmup,
                                                  scale.runs)
            # The same reads with every one going to SQLite: what a GET costs right after a write.
            uncached = our_server(root / "data", root, "ours-uncached", read_cache="false")
            with running(uncached):
                harness.log(f"  GET /genomes/{{id}} without the read cache (a second server, GENOME_READ_CACHE=false) "
                            f"{scale.runs} x {scale.requests}")
                results["get_genome_uncached"] = read_workload(uncached, genome_path, args.clients, scale.requests,
                                                               scale.warmup, scale.runs)
            harness.log(f"  GET /genomes {scale.runs} x {scale.list_requests}")
            results["list_genomes"] = read_workload(ours, "/genomes", args.clients, scale.list_requests,
                                                    scale.warmup // 4, scale.runs)
            harness.log(f"  attach/detach: {scale.write_cycles} cycles over {args.write_clients} clients, "
                        f"then {scale.serial_write_cycles} over 1")
            results["writes"] = write_workload(ours, seeded, args.write_clients, scale.write_cycles, scale.write_warmup)
            results["writes_serial"] = write_workload(ours, seeded, 1, scale.serial_write_cycles, scale.write_warmup)
            if wrk:
                harness.log(f"  wrk GET /genomes/{{id}} {scale.wrk_seconds:.0f}s")
                wrk_results["get_genome"] = wrk_workload(wrk, ours, genome_path, args.clients, scale.wrk_seconds, script)
            harness.log(f"  interleaved: {scale.interleaved_rounds} rounds of {scale.requests // 2} on ours, then on a floor")
            floor = floor_server(root)
            with running(floor):
                results["interleaved"] = interleaved_reads(ours, genome_path, floor, args.clients, scale.requests // 2,
                                                           scale.warmup, scale.interleaved_rounds)
            server_log_tail = ours.log_tail(5)

        floor = floor_server(root)
        with running(floor):
            harness.log(f"  floor on {floor.url}: GET / and GET /sync {scale.runs} x {scale.requests}")
            results["floor"] = read_workload(floor, "/", args.clients, scale.requests, scale.warmup, scale.runs)
            results["floor_sync"] = read_workload(floor, "/sync", args.clients, scale.requests, scale.warmup,
                                                  scale.runs)
            if wrk:
                harness.log(f"  wrk GET / {scale.wrk_seconds:.0f}s")
                wrk_results["floor"] = wrk_workload(wrk, floor, "/", args.clients, scale.wrk_seconds, script)

    if wrk_results:
        wrk_results["get_ratio"] = round(wrk_results["get_genome"]["rps"] / wrk_results["floor"]["rps"], 3)
    reads = wrk_results if args.loadgen == "wrk" else results
    get, fl = reads["get_genome"], reads["floor"]
    headline: dict[str, Any] = {
        "get_genome_rps": round(get["rps"], 1),
        "floor_rps": round(fl["rps"], 1),
        "get_ratio": round(get["rps"] / fl["rps"], 3),
        "get_p95_ms": get["latency_ms"]["p95"],
        # Server CPU per request, measured by the asyncio runs: on a shared machine a busy
        # neighbour slows both servers' wall clocks unevenly, their CPU per request much less.
        "get_server_cpu_us": results["get_genome"]["server_cpu_us_per_request"],
        "floor_server_cpu_us": results["floor"]["server_cpu_us_per_request"],
        "cpu_ratio": round(results["floor"]["server_cpu_us_per_request"]
                           / results["get_genome"]["server_cpu_us_per_request"], 3),
        "interleaved_get_ratio": results["interleaved"]["get_ratio"],
        "interleaved_cpu_ratio": results["interleaved"]["cpu_ratio"],
        "get_uncached_rps": results["get_genome_uncached"]["rps"],
        "get_uncached_p95_ms": results["get_genome_uncached"]["latency_ms"]["p95"],
        "attach_layer_p95_ms": results["writes"]["attach"]["latency_ms"]["p95"],
        "detach_layer_p95_ms": results["writes"]["detach"]["latency_ms"]["p95"],
        "list_genomes_p95_ms": results["list_genomes"]["latency_ms"]["p95"],
        "errors": sum(r["errors"] for r in (results["get_genome"], results["get_genome_uncached"],
                                            results["list_genomes"], results["floor"],
                                            results["floor_sync"], results["writes"]["attach"],
                                            results["writes"]["detach"], results["writes_serial"]["attach"],
                                            results["writes_serial"]["detach"])) + results["interleaved"]["errors"],
        "loadgen": "wrk" if args.loadgen == "wrk" else "asyncio",
    }
    if wrk_results and args.loadgen != "wrk":
        headline["wrk_get_ratio"] = wrk_results["get_ratio"]
    goals = {
        f"get_ratio_at_least_{GOALS['get_ratio_at_least']}": headline["get_ratio"] >= GOALS["get_ratio_at_least"],
        f"get_p95_ms_at_most_{GOALS['get_p95_ms_at_most']:g}": headline["get_p95_ms"] <= GOALS["get_p95_ms_at_most"],
        f"attach_layer_p95_ms_at_most_{GOALS['attach_layer_p95_ms_at_most']:g}":
            headline["attach_layer_p95_ms"] <= GOALS["attach_layer_p95_ms_at_most"],
    }
    full = {
        "benchmark": "api",
        "mode": "quick" if args.quick else "full",
        "timestamp_utc": datetime.now(UTC).isoformat(),
        "headline": headline,
        "goals": goals,
        "workloads": results,
        "wrk": wrk_results or ("skipped: --no-wrk" if args.no_wrk else "unavailable: wrk is not installed"),
        "seed": asdict(seeded),
        "settings": {
            "scale": asdict(scale),
            "read_clients": args.clients,
            "write_clients": args.write_clients,
            "write_clients_why": "SQLite takes one writer at a time and our Database queues writers on one "
                                 "in-process lock, so 32 concurrent writers would measure the queue "
                                 "(about 32 x the service time); writes also run with 1 client "
                                 "(writes_serial) for the bare service time",
            "write_pattern": "each write client owns one genome (3 layers attached at the start) and alternates "
                             "POST /genomes/{id}/layers {layer_id, weight} with DELETE /genomes/{id}/layers/{layer_id} "
                             "of the same layer; only successful responses' latencies are in the percentiles",
            "loadgen": {
                "asyncio": "one process, one event loop, raw asyncio streams, pre-built HTTP/1.1 requests, "
                           "parsing only the status line and Content-Length; keep-alive; latency = write of the "
                           "request to the last byte of the body, per request",
                "wrk": f"{wrk} -t1 -c{args.clients}, duration {scale.wrk_seconds}s after a 1s warm-up "
                       "(cross-check of the read figures)" if wrk else None,
                "headline_reads_from": headline["loadgen"],
            },
            "servers": {
                "asgi_server": "uvicorn, started by each server's own process with uvicorn.run(factory=True, "
                               f"host={HOST}, workers=1, log_level=warning) and uvicorn's defaults otherwise "
                               "(http=auto, loop=auto: h11/httptools and asyncio/uvloop as installed, see packages)",
                "ours": "python -m genome_service.cli serve --port P; GENOME_DATA_DIR=<temp>/data (SQLite, "
                        "migrated with genome_service.eventstore.migrations.upgrade), GENOME_RATE_LIMIT_PER_MINUTE=0, "
                        "GENOME_LOG_LEVEL=WARNING, no API keys (open mode on loopback, owner 'local')",
                "floor": "Litestar(route_handlers=[GET / async -> {'status': 'ok', 'n': 1}, "
                         "GET /sync sync_to_thread=True -> same]) in this file (--serve-floor)",
                "ours_uncached": "the same command and settings plus GENOME_READ_CACHE=false, on ours's data dir, "
                                 "started after ours's cached GET runs and stopped after its own",
                "order": "ours (seed, reads, uncached reads on a second server, list, writes, wrk), then a floor "
                         "started beside it for the interleaved "
                         "rounds, both stopped; then a fresh floor alone for its own reads",
            },
            "percentiles": "nearest rank over every measured request (read workloads: pooled over their runs)",
            "rps": "read workloads: the median of the runs' rates (each run: completed requests / its wall time)",
        },
        "our_server_log_tail": server_log_tail,
        "hardware": harness.hardware_metadata(PACKAGES),
        "elapsed_s": round(watch.elapsed, 1),
    }
    path = harness.save_results("api", full, args.results_dir)

    rows = []
    w = args.write_clients
    for name, r in (("get genome", results["get_genome"]), ("get uncached", results["get_genome_uncached"]),
                    ("list genomes", results["list_genomes"]),
                    (f"attach x{w}", results["writes"]["attach"]), (f"detach x{w}", results["writes"]["detach"]),
                    ("attach x1", results["writes_serial"]["attach"]), ("detach x1", results["writes_serial"]["detach"]),
                    ("floor", results["floor"]), ("floor sync", results["floor_sync"])):
        lat = r["latency_ms"]
        rows.append([name, r["completed"], r["errors"], r["rps"], lat["p50"], lat["p95"], lat["p99"],
                     r["server_cpu_pct_of_core"], r["client_cpu_pct_of_core"]])
    for name, key in (("wrk get genome", "get_genome"), ("wrk floor", "floor")):
        if key in wrk_results:
            r = wrk_results[key]
            lat = r["latency_ms"]
            rows.append([name, r["requests"], r["errors"], r["rps"], lat["p50"], lat["p95"], lat["p99"],
                         r["server_cpu_pct_of_core"], None])
    harness.print_table(f"API ({full['mode']}; reads x{args.clients} clients, writes x{w}; ms; cpu % of a core)",
                        ["workload", "n", "err", "rps", "p50", "p95", "p99", "srv%", "cli%"], rows)
    harness.log(f"goals: {goals}")
    harness.log(f"results: {path} ({watch.elapsed:.1f}s)")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
