"""The inference daemon against the in-process engine: throughput, time to first token, restarts, memory.

    .venv/bin/python benchmarks/daemon.py [--quick] [--rounds N] [--concurrency 8] [--tokens 64]

On the default model (SmolLM2-135M-Instruct, torch, CPU; pulled into GENOME_MODELS_DIR or
the tests' cache `.cache/models`):

- **daemon_ratio**: the same chats (`--concurrency` at once, `--tokens` each, EOS ignored)
  through a daemon started as `genome-service inference serve` (HTTP, SSE, a worker
  process) and through an engine in this process, interleaved round by round (the order
  alternates); the ratio of aggregate tokens per second, median over rounds. p95 time to
  first token on both sides.
- **restart_s**: the daemon's worker killed with SIGKILL, to the next chat answered (which
  waits for the restart: backoff, process start, model load).
- **memory**: `genome-service serve --workers 3` with the embedded daemon and with it off
  (GENOME_INFERENCE_DAEMON=off: each API process loads its own model), each once every
  worker has answered a chat: proportional set size summed over the whole process tree.

The last line of stdout is one JSON object with the headline figures; the full results go
to ``benchmarks/results/daemon-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402
from benchmarks.inference import LOOP, models_dir, start_loop  # noqa: E402
from fixtures.processes import pss_bytes, tree  # noqa: E402

CLI = [sys.executable, "-m", "genome_service.cli", "--quiet"]
GOALS = {"daemon_ratio": (">=", 0.9)}
QUESTION = "Tell me a long story about a lighthouse keeper and the sea."


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_loop(coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, LOOP).result()


def wait_for_http(url: str, headers: dict[str, str], process: subprocess.Popen[bytes], limit: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {process.returncode}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {limit:g} s") from None
        time.sleep(0.05)  # a process starting: nothing to await but its port


def env_for(data: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    return clean | {"GENOME_DATA_DIR": str(data), "GENOME_MODELS_DIR": str(models_dir()), "GENOME_INFERENCE_DEVICE": "cpu",
                    "GENOME_INFERENCE_BACKEND": "torch", "GENOME_ACADEMY_WORKER": "off", **extra}


# --- one workload, two engines ----------------------------------------------------------------


async def _one(engine: Any, tokens: int) -> tuple[float, int, float]:
    from inference.backends.base import ChatMessage, Finish, Sampling

    sampling = Sampling(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    started, first, count = time.perf_counter(), None, 0
    async for event in engine.stream([ChatMessage("user", QUESTION)], None, sampling):
        if isinstance(event, Finish):
            if event.reason not in ("length", "stop"):
                raise RuntimeError(f"a benchmark request failed: {event}")
            count = event.completion_tokens
            break
        first = first or time.perf_counter() - started
    return first or 0.0, count, time.perf_counter() - started


async def _together(engine: Any, concurrency: int, tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    runs = await asyncio.gather(*(_one(engine, tokens) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"tokens_per_s": sum(count for _, count, _ in runs) / wall, "ttfts_s": [ttft for ttft, _, _ in runs]}


def bench_throughput(local: Any, remote: Any, rounds: int, concurrency: int, tokens: int) -> dict[str, Any]:
    ratios, ours, theirs, ttft_local, ttft_daemon = [], [], [], [], []
    for index in range(rounds):
        order = [("local", local), ("daemon", remote)]
        measured = {}
        for name, engine in order if index % 2 == 0 else order[::-1]:
            measured[name] = on_loop(_together(engine, concurrency, tokens))
        harness.log(f"round {index + 1}/{rounds}: daemon {measured['daemon']['tokens_per_s']:.1f} tok/s, "
                    f"in-process {measured['local']['tokens_per_s']:.1f} tok/s")
        ratios.append(measured["daemon"]["tokens_per_s"] / measured["local"]["tokens_per_s"])
        theirs.append(measured["local"]["tokens_per_s"])
        ours.append(measured["daemon"]["tokens_per_s"])
        ttft_local += measured["local"]["ttfts_s"]
        ttft_daemon += measured["daemon"]["ttfts_s"]
    return {
        "ratio": harness.median(ratios), "ratios": ratios, "daemon_tokens_per_s": ours, "in_process_tokens_per_s": theirs,
        "ttft_p95_ms_daemon": 1000 * p95(ttft_daemon), "ttft_p95_ms_in_process": 1000 * p95(ttft_local),
    }  # fmt: skip


def bench_restart(remote: Any, url: str, headers: dict[str, str], times: int) -> list[float]:
    import httpx

    seconds = []
    for _ in range(times):
        pid = next(m["pid"] for m in httpx.get(f"{url}/health", headers=headers).json()["models"] if m["state"] == "ready")
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        # Once the daemon has seen the death (a request sent before then is failed as in flight),
        # the next one waits for the restart: backoff, spawn, model load, answer.
        while any(m["pid"] == pid for m in httpx.get(f"{url}/health", headers=headers).json()["models"]):
            time.sleep(0.01)
        on_loop(_one(remote, 1))
        seconds.append(time.perf_counter() - killed)
        harness.log(f"restart: {seconds[-1]:.2f} s")
    return seconds


# --- serve --workers 3, with and without the daemon -----------------------------------------


def bench_memory(root: Path, daemon: bool, workers: int = 3) -> dict[str, Any]:
    import httpx

    data = root / ("with-daemon" if daemon else "without-daemon")
    env = env_for(data, GENOME_INFERENCE_DAEMON="embedded" if daemon else "off")
    subprocess.run([*CLI, "db", "upgrade"], env=env, check=True)
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", str(workers)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", {}, server)
        persona = httpx.post(f"{url}/personas", json={"name": "M", "system_prompt": "You are brief."}).json()["id"]
        answered: set[str] = set()
        for _ in range(100):  # a new connection each time: the kernel spreads them over the workers
            response = httpx.post(f"{url}/personas/{persona}/chat", timeout=300,
                                  json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "context_k": 0})
            response.raise_for_status()
            answered.add(response.headers["x-genome-process"])
            if len(answered) == workers:
                break
        processes = tree(server.pid)
        return {"daemon": daemon, "workers_answered": len(answered), "processes": len(processes),
                "pss_bytes": sum(pss_bytes(pid) for pid in processes)}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, ~3 minutes)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 6, quick 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="chats at once in a round")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per chat (EOS ignored)")
    parser.add_argument("--no-memory", action="store_true", help="skip the serve --workers 3 memory comparison")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 6)
    watch = harness.Stopwatch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from inference.backends.torch import TorchBackend
    from inference.daemon.client import DaemonClient
    from inference.engine import Engine
    from inference.pull import pull_default

    hf_logging.disable_progress_bar()
    folder, _ = pull_default(models_dir())
    start_loop()
    results: dict[str, Any] = {"concurrency": args.concurrency, "tokens": args.tokens, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as work:
        root = Path(work)
        token = secrets.token_urlsafe(16)
        headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        daemon = subprocess.Popen([*CLI, "inference", "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env_for(root / "daemon", GENOME_INFERENCE_TOKEN=token))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/health", headers, daemon)

            async def engines() -> tuple[Engine, Any, DaemonClient]:
                local = Engine(TorchBackend(folder, device="cpu"))
                local.start()
                client = DaemonClient(url, token)
                return local, client.engine(folder.name, timeout=600), client

            local, remote, client = on_loop(engines())
            harness.log("warm-up: both engines load and run once")
            on_loop(_together(local, args.concurrency, 4))
            on_loop(_together(remote, args.concurrency, 4))
            results["throughput"] = bench_throughput(local, remote, rounds, args.concurrency, args.tokens)
            on_loop(local.close())
            results["restart_s"] = bench_restart(remote, url, headers, 1 if args.quick else 3)
            on_loop(client.close())
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
        if not args.no_memory:
            harness.log("memory: serve --workers 3 with the embedded daemon, then without it")
            results["memory"] = [bench_memory(root, daemon=True), bench_memory(root, daemon=False)]
    throughput = results["throughput"]
    memory = {entry["daemon"]: entry for entry in results.get("memory", [])}
    headline: dict[str, Any] = {
        "benchmark": "daemon",
        "mode": "quick" if args.quick else "full",
        "daemon_ratio": round(throughput["ratio"], 3),
        "daemon_tokens_per_s": round(harness.median(throughput["daemon_tokens_per_s"]), 1),
        "in_process_tokens_per_s": round(harness.median(throughput["in_process_tokens_per_s"]), 1),
        "ttft_p95_ms_daemon": round(throughput["ttft_p95_ms_daemon"], 1),
        "ttft_p95_ms_in_process": round(throughput["ttft_p95_ms_in_process"], 1),
        "restart_s": round(harness.median(results["restart_s"]), 2),
        "serve_3_workers_pss_mib_daemon": round(memory[True]["pss_bytes"] / 2**20, 1) if memory else None,
        "serve_3_workers_pss_mib_in_process": round(memory[False]["pss_bytes"] / 2**20, 1) if memory else None,
    }
    headline["goals_met"] = harness.goals_met(headline, GOALS)
    full = {"headline": headline, "results": results, "hardware": harness.hardware_metadata(["torch", "transformers", "litestar"])}
    harness.report("daemon", "inference daemon vs in-process engine", full, args.results_dir, watch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
