"""Inference: our engine and backends against plain transformers / mlx-lm / mlx_lm.server.

    .venv/bin/python benchmarks/inference.py [--quick] [--runs N] [--tokens 128]

Everything uses the pulled default model (SmolLM2-135M-Instruct, fp32; pulled into
GENOME_MODELS_DIR or <repo>/.cache/models first if missing), one prompt, greedy decoding,
128 new tokens, in this one process (mlx_lm.server is its own process, started here):

- base_ratio_torch: our tokens/s with no stack (Engine -> TorchBackend, the full serving
  path, prompt reuse off so both sides compute the prompt) / plain `model.generate`
  tokens/s on a second copy of the same weights, asked for exactly as many tokens as we
  produced. Runs alternate ours/theirs; medians.
- base_ratio_mlx: the same with MlxBackend against plain `mlx_lm.stream_generate`.
- stack_ratio: our tokens/s with a 3-layer rank-8 stack (q_proj and v_proj on all 30
  blocks, weights 1.0/0.5/0.25: real PEFT uploads resolved through StackResolver) / with
  none, torch backend.
- ttft_ms: submission to first token through the Engine (torch, no stack), median.
- switch_ms_cached: changing persona when both stacks are cached: StackResolver.stack()
  (a cache hit) + backend.activate(), alternating two personas, median (torch; mlx too).
- adapter_load_ms_cold: a layer never seen before: read blobs, validate, decode, assemble,
  convert to torch tensors and activate, median over fresh layers.
- switch_speedup_vs_mlx_server: time for mlx_lm.server to answer (max_tokens 1) after an
  adapter change / time for our Engine to answer (max_tokens 1) after a persona change,
  alternating two 3-layer stacks, a new question each round (an exact repeat would be
  served from mlx_lm.server's prompt cache). Ours is the auto-detected backend (torch
  on Linux, mlx on Apple silicon); `..._mlx_backend` is ours on mlx, the server's own
  compute library. `mlx_server_switch_overhead_ms` is what the change adds to the
  server's answer (against answers with the adapter kept): compare switch_ms_cached.

The machine may be shared: every figure is a median of interleaved runs, but other load
still shows. The last line of stdout is one JSON object with the headline figures; the
full results go to ``benchmarks/results/inference-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402

from fixtures.make_adapter import make_adapter_files  # noqa: E402
from inference.backends.base import ChatMessage, Finish, Sampling, Token  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.lora.stack import LoraStack  # noqa: E402
from inference.models import DEFAULT_MODEL, SMOLLM2_135M_INSTRUCT  # noqa: E402
from inference.pull import pull_default  # noqa: E402

PACKAGES = ("torch", "transformers", "mlx", "mlx-lm", "numpy", "safetensors")
PROMPT = [ChatMessage("user", "Write a short story about a lighthouse keeper who finds a message in a bottle.")]
SHORT_PROMPT = [ChatMessage("user", "What is the capital of France?")]
GOALS = {
    "base_ratio_torch": (">=", 0.95), "base_ratio_mlx": (">=", 0.95), "stack_ratio": (">=", 0.85),
    "switch_ms_cached": ("<=", 5.0), "adapter_load_ms_cold": ("<=", 50.0), "switch_speedup_vs_mlx_server": (">=", 20.0),
}  # fmt: skip
STACK_MODULES = ("q_proj", "v_proj")
STACK_WEIGHTS = (1.0, 0.5, 0.25)
COLD_LOADS = 5  # layers loaded cold, each once


# --- the model and the layers -----------------------------------------------------------


def models_dir() -> Path:
    return Path(os.environ.get("GENOME_MODELS_DIR") or harness.PROJECT_ROOT / ".cache" / "models")


class Layers:
    """A temp SQLite service with rank-8 PEFT layers uploaded, and a resolver for the model."""

    def __init__(self, work: Path, count: int) -> None:
        from genome_service.domain.layer import TraitType
        from genome_service.eventstore.migrations import upgrade
        from genome_service.eventstore.records import NO_METADATA
        from genome_service.services.bootstrap import build
        from genome_service.services.layers import LayerDetails, register_layer
        from genome_service.services.stacks import StackResolver
        from genome_service.settings import Settings

        upgrade(f"sqlite:///{work / 'genome.db'}")
        self.services = build(Settings(data_dir=work))
        details = LayerDetails(name="bench", base_model=DEFAULT_MODEL, trait_type=TraitType.DOMAIN_EXPERTISE)
        blocks = tuple(range(SMOLLM2_135M_INSTRUCT.num_hidden_layers))
        self.ids = [
            register_layer(
                self.services, "bench", details,
                make_adapter_files("peft", rank=8, modules=STACK_MODULES, layers=blocks, seed=seed), NO_METADATA,
            ).aggregate.state.layer_id
            for seed in range(count)
        ]  # fmt: skip
        self.resolver = StackResolver(self.services, SMOLLM2_135M_INSTRUCT)

    def persona(self, first: int) -> list[tuple[str, float]]:
        """Three layers starting at `first`: a persona's genome."""
        return list(zip(self.ids[first : first + 3], STACK_WEIGHTS, strict=True))

    def fresh(self) -> LoraStack:
        """A new resolver (cold caches) resolving a layer nobody resolved yet."""
        from genome_service.services.stacks import StackResolver

        return StackResolver(self.services, SMOLLM2_135M_INSTRUCT).stack([(self.ids.pop(), 1.0)])


# --- our side -----------------------------------------------------------------------------


async def _ours(engine: Engine, stack: LoraStack | None, sampling: Sampling, messages: list[ChatMessage]) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    async for event in engine.stream(messages, stack, sampling):
        if isinstance(event, Token) and first is None:
            first = time.perf_counter()
        if isinstance(event, Finish):
            seconds = time.perf_counter() - started
            if event.reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
            return {
                "tokens": event.completion_tokens, "seconds": seconds, "tokens_per_s": event.completion_tokens / seconds,
                "ttft_ms": 1000 * ((first or time.perf_counter()) - started), "finish": event.reason,
            }  # fmt: skip
    raise AssertionError("no Finish")


def ours(engine: Engine, stack: LoraStack | None, tokens: int, messages: list[ChatMessage] = PROMPT) -> dict[str, float]:
    return asyncio.run_coroutine_threadsafe(_ours(engine, stack, Sampling(max_tokens=tokens), messages), LOOP).result()


# One event loop for the whole run, in its own thread: the engines live on it.
LOOP = asyncio.new_event_loop()


def start_loop() -> None:
    import threading

    threading.Thread(target=LOOP.run_forever, daemon=True, name="bench-loop").start()


def engine_for(backend: Any) -> Engine:
    async def start() -> Engine:
        engine = Engine(backend)
        engine.start()
        return engine

    return asyncio.run_coroutine_threadsafe(start(), LOOP).result()


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    return harness.median(times)


# --- torch --------------------------------------------------------------------------------


def bench_torch(folder: Path, layers: Layers, runs: int, tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from inference.backends.torch import TorchBackend

    # Prompt reuse off: each run repeats the prompt, which our prefix cache would skip while
    # `generate` computes it; the rates compare decoding the same tokens from scratch.
    backend = TorchBackend(folder, device="cpu", prompt_cache_bytes=0)
    engine = engine_for(backend)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([backend.encode_chat(PROMPT)])
    persona_a, persona_b = layers.persona(0), layers.persona(3)
    stack = layers.resolver.stack(persona_a)

    def theirs(count: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = plain.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - started)

    harness.log("torch: warm-up")
    for warm in (None, stack):
        ours(engine, warm, 8)
    theirs(8)
    base, plain_rates, stacked = [], [], []
    for run in range(runs):
        base.append(ours(engine, None, tokens))
        plain_rates.append(theirs(base[-1]["tokens"]))
        stacked.append(ours(engine, stack, tokens))
        harness.log(f"torch run {run + 1}/{runs}: ours {base[-1]['tokens_per_s']:.1f} tok/s, "
                    f"plain {plain_rates[-1]:.1f}, stack {stacked[-1]['tokens_per_s']:.1f}")  # fmt: skip
    switch = _switch_ms(layers, backend, persona_a, persona_b)
    cold = [_cold_load_ms(layers, backend) for _ in range(COLD_LOADS)]
    asyncio.run_coroutine_threadsafe(engine.close(), LOOP).result()
    return {
        "ours_tokens_per_s": [r["tokens_per_s"] for r in base],
        "plain_generate_tokens_per_s": plain_rates,
        "stack_tokens_per_s": [r["tokens_per_s"] for r in stacked],
        "tokens": [r["tokens"] for r in base],
        "ttft_ms": [r["ttft_ms"] for r in base],
        "base_ratio": harness.median(r["tokens_per_s"] for r in base) / harness.median(plain_rates),
        "stack_ratio": harness.median(r["tokens_per_s"] for r in stacked) / harness.median(r["tokens_per_s"] for r in base),
        "switch_ms_cached": switch,
        "adapter_load_ms_cold": harness.median(c["total_ms"] for c in cold),
        "adapter_load_cold_parts": cold,
        "loads": backend.loads,
    }


def _switch_ms(layers: Layers, backend: Any, persona_a: list[tuple[str, float]], persona_b: list[tuple[str, float]]) -> float:
    for persona in (persona_a, persona_b):  # both cached: adapters, stacks and device tensors
        backend.activate(layers.resolver.stack(persona))
    personas = iter([persona_a, persona_b] * 200)
    return median_ms(lambda: backend.activate(layers.resolver.stack(next(personas))), 400)


def _cold_load_ms(layers: Layers, backend: Any) -> dict[str, float]:
    started = time.perf_counter()
    stack = layers.fresh()
    resolved = time.perf_counter()
    backend.activate(stack)
    done = time.perf_counter()
    backend.activate(None)
    return {
        "resolve_validate_assemble_ms": 1000 * (resolved - started),
        "convert_activate_ms": 1000 * (done - resolved),
        "total_ms": 1000 * (done - started),
    }


# --- mlx ----------------------------------------------------------------------------------


def bench_mlx(folder: Path, layers: Layers, runs: int, tokens: int) -> dict[str, Any]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from inference.backends.mlx import MlxBackend

    # Prompt reuse off, as for torch: both sides compute the prompt each run.
    backend = MlxBackend(folder, prompt_cache_bytes=0)
    engine = engine_for(backend)
    model, tokenizer = mlx_lm.load(str(folder))
    prompt = backend.encode_chat(PROMPT)
    greedy = make_sampler(temp=0.0)

    def theirs(count: int) -> float:
        started = time.perf_counter()
        produced = sum(1 for _ in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=count, sampler=greedy))
        return produced / (time.perf_counter() - started)

    harness.log("mlx: warm-up")
    ours(engine, None, 8)
    theirs(8)
    base, plain_rates = [], []
    for run in range(runs):
        base.append(ours(engine, None, tokens))
        plain_rates.append(theirs(base[-1]["tokens"]))
        harness.log(f"mlx run {run + 1}/{runs}: ours {base[-1]['tokens_per_s']:.1f} tok/s, plain {plain_rates[-1]:.1f}")
    asyncio.run_coroutine_threadsafe(engine.close(), LOOP).result()
    return {
        "ours_tokens_per_s": [r["tokens_per_s"] for r in base],
        "plain_stream_generate_tokens_per_s": plain_rates,
        "tokens": [r["tokens"] for r in base],
        "base_ratio": harness.median(r["tokens_per_s"] for r in base) / harness.median(plain_rates),
        "switch_ms_cached": _switch_ms(layers, backend, layers.persona(0), layers.persona(3)),
        "loads": backend.loads,
    }


def question(round_: int) -> list[ChatMessage]:
    """A new question each round: a persona change comes with a new message, and an
    exact repeat would let mlx_lm.server answer from its prompt cache."""
    return [ChatMessage("user", f"Question {round_}: what is the capital of France?")]


def bench_switch(folder: Path, layers: Layers, engines: dict[str, Engine], rounds: int) -> dict[str, Any]:
    """ms to answer (max_tokens 1) right after the stack changed: mlx_lm.server and our engines."""
    stacks = [layers.resolver.stack(p) for p in (layers.persona(0), layers.persona(3))]
    found: dict[str, Any] = {"server": _server_switch(folder, stacks, rounds)}
    for name, engine in engines.items():
        for round_ in range(2):  # each stack converted once: the cached case starts after
            ours(engine, stacks[round_ % 2], 1, question(round_))
        found[name] = [1000 * ours(engine, stacks[r % 2], 1, question(r))["seconds"] for r in range(2, 2 * rounds + 2)]
    server = harness.median(found["server"]["after_adapter_change_ms"])
    same = harness.median(found["server"]["same_adapter_ms"])
    for name in engines:
        found[f"speedup_{name}"] = server / harness.median(found[name])
    # The switch alone: what an adapter change adds to the server's answer, against our switch.
    found["server_switch_overhead_ms"] = server - same
    return found


def _server_switch(folder: Path, stacks: list[LoraStack], rounds: int) -> dict[str, list[float]]:
    """mlx_lm.server answering (max_tokens 1) with the adapter changed each request, and kept."""
    from inference.backends.openai import adapter_files

    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as work:
        folders = []
        for index, stack in enumerate(stacks):
            target = Path(work) / f"stack-{index}"
            target.mkdir()
            for name, data in adapter_files("mlx-lm", stack).items():
                (target / name).write_bytes(data)
            folders.append(target)
        with _mlx_server(folder) as url:

            def answer(round_: int, adapter: Path) -> float:
                body = {
                    "model": str(folder), "messages": [{"role": m.role, "content": m.content} for m in question(round_)],
                    "max_tokens": 1, "temperature": 0.0, "adapters": str(adapter),
                }  # fmt: skip
                request = urllib.request.Request(
                    f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=300) as response:
                    json.loads(response.read())
                return 1000 * (time.perf_counter() - started)

            answer(0, folders[0])  # the server's first load: not a switch
            changed = [answer(r, folders[r % 2]) for r in range(1, 2 * rounds + 1)]
            kept = [answer(r, folders[0]) for r in range(2 * rounds + 1, 2 * rounds + 1 + rounds)]
            return {"after_adapter_change_ms": changed, "same_adapter_ms": kept}


@contextmanager
def _mlx_server(folder: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                try:  # waiting on the process between tries also notices a server that died
                    code = server.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"mlx_lm.server exited with {code} before it was healthy") from None
        yield url
    finally:
        server.kill()
        server.wait(timeout=30)


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs instead of 5, 2 stack-switch rounds instead of 4")
    parser.add_argument("--runs", type=int, help="interleaved runs per generation workload")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation (default 128)")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    server_rounds = 2 if args.quick else 4
    watch = harness.Stopwatch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, _ = pull_default(models_dir())
    start_loop()
    from inference.backends import detect_backend
    from inference.backends.torch import TorchBackend

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as work:
        layers = Layers(Path(work), count=6 + COLD_LOADS)
        results["torch"] = bench_torch(folder, layers, runs, args.tokens)
        engines = {"torch": engine_for(TorchBackend(folder, device="cpu"))}  # as served: prefix reuse on
        try:
            from inference.backends.mlx import MlxBackend
        except ImportError as error:
            results["mlx"] = {"unavailable": str(error)}
        else:
            results["mlx"] = bench_mlx(folder, layers, runs, args.tokens)
            engines["mlx"] = engine_for(MlxBackend(folder))  # as served: prefix reuse on
            results["switch"] = bench_switch(folder, layers, engines, server_rounds)
        for engine in engines.values():
            asyncio.run_coroutine_threadsafe(engine.close(), LOOP).result()
        layers.services.close()
    mlx, switch = results["mlx"], results.get("switch", {})
    # "Ours" is what genome-service runs here: the auto-detected backend.
    auto = detect_backend()
    headline: dict[str, Any] = {
        "benchmark": "inference",
        "mode": "quick" if args.quick else "full",
        "base_ratio_torch": round(results["torch"]["base_ratio"], 3),
        "base_ratio_mlx": round(mlx["base_ratio"], 3) if "base_ratio" in mlx else None,
        "stack_ratio": round(results["torch"]["stack_ratio"], 3),
        "ttft_ms": round(harness.median(results["torch"]["ttft_ms"]), 1),
        "switch_ms_cached": round(results["torch"]["switch_ms_cached"], 3),
        "switch_ms_cached_mlx": round(mlx["switch_ms_cached"], 3) if "switch_ms_cached" in mlx else None,
        "adapter_load_ms_cold": round(results["torch"]["adapter_load_ms_cold"], 1),
        "switch_speedup_vs_mlx_server": round(switch[f"speedup_{auto}"], 2) if switch else None,
        "switch_speedup_vs_mlx_server_mlx_backend": round(switch["speedup_mlx"], 2) if switch else None,
        "mlx_server_switch_overhead_ms": round(switch["server_switch_overhead_ms"], 1) if switch else None,
        "tokens_per_s_torch": round(harness.median(results["torch"]["ours_tokens_per_s"]), 1),
        "tokens_per_s_mlx": round(harness.median(mlx["ours_tokens_per_s"]), 2) if "base_ratio" in mlx else None,
        "auto_backend": auto,
    }
    headline["goals_met"] = harness.goals_met(headline, GOALS)
    full = {
        "headline": headline,
        "results": results,
        "setup": {
            "model": f"{DEFAULT_MODEL} fp32 from {folder}", "prompt": PROMPT[0].content, "new_tokens": args.tokens,
            "runs": runs, "stack": f"3 PEFT layers, rank 8, {'+'.join(STACK_MODULES)} on all 30 blocks, "
            f"weights {STACK_WEIGHTS}", "device": "cpu (torch), mlx default device",
            "note": "interleaved runs, medians; a shared machine adds noise",
        },  # fmt: skip
        "hardware": harness.hardware_metadata(PACKAGES),
        "elapsed_s": round(watch.elapsed, 1),
    }
    harness.report("inference", f"inference ({headline['mode']}, {args.tokens} tokens, greedy)", full, args.results_dir, watch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
