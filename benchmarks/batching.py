"""Continuous batching: N personas with different stacks at once, against one at a time.

    .venv/bin/python benchmarks/batching.py [--quick] [--rounds N] [--tokens 128]

The pulled default model (SmolLM2-135M-Instruct, fp32, CPU), eight personas each with its
own 3-layer rank-8 stack (q_proj and v_proj on all 30 blocks; 24 distinct PEFT layers
uploaded and resolved as the service does), one fixed ~60-token chat prompt, 128 new
tokens with EOS ignored, greedy:

- batch_ratio_N (N = 1, 2, 4, 8): aggregate tokens/s with N requests submitted at once to
  the batching engine / the same N requests one after another through the one-request
  path (`TorchBackend.generate` behind an engine that runs one request at a time: packed
  weights and prompt-prefix reuse, as served before batching). `single_ratio` is
  batch_ratio_1: what the scheduler costs alone. Rounds interleave baseline and batched;
  each figure is the median of the per-round ratios (the machine's neighbours come and go).
- itl_p95_ms_8: inter-token latency of each request at N=8 (gaps between its tokens), p95.
- ttft_p95_ms_staggered: 8 requests arriving evenly over `--stagger` seconds, p95 time to
  first token, batched (and `_sequential` for the one-at-a-time engine).
- max_logit_diff: the 8 stacks decoded as one batch, teacher-forced, against each persona
  alone (the one-request forward pass), max |difference| over 16 steps.
- batch_ratio_8_mlx: the same ratio on the mlx backend (mlx-lm's BatchKVCache, the same
  per-row gains).

The last line of stdout is one JSON object with the headline figures; the full results go
to ``benchmarks/results/batching-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402
from benchmarks.inference import LOOP, Layers, models_dir, start_loop  # noqa: E402
from inference.backends.base import Backend, ChatMessage, Finish, Sampling, Token, never_cancelled  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.guards import RepetitionRule  # noqa: E402
from inference.lora.stack import LoraStack  # noqa: E402
from inference.models import DEFAULT_MODEL  # noqa: E402
from inference.pull import pull_default  # noqa: E402

PACKAGES = ("torch", "transformers", "mlx", "mlx-lm", "numpy")
PROMPT = [
    ChatMessage("system", "You are a friendly guide to the coast who answers in full sentences."),
    ChatMessage("user", "Tell me about the lighthouse on the northern cliffs: who built it, "
                        "how the keepers lived there, and what a visitor can still see today."),
]  # fmt: skip
SIZES = (1, 2, 4, 8)
PERSONAS = 8
GOALS = {"batch_ratio_8": (">=", 3.0), "single_ratio": (">=", 0.95), "max_logit_diff": ("<=", 1e-4)}
# The benchmark compares equal work: every request runs its max_tokens (no EOS, no loop guard).
NO_LOOP_GUARD = RepetitionRule(max_period=1, min_repeats=1 << 30, min_span=1 << 30)


class OneAtATime:
    """A backend's one-request path only: the engine then runs requests one after another."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = backend.name

    @property
    def loads(self) -> int:
        return self.backend.loads

    def generate(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling,
                 cancelled: Callable[[], bool] = never_cancelled) -> Iterator[Token | Finish]:
        return self.backend.generate(messages, stack, sampling, cancelled)


def on_loop(coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, LOOP).result()


async def _start(backend: Any) -> Engine:
    engine = Engine(backend, max_batch=PERSONAS)
    engine.start()
    return engine


async def _request(engine: Engine, stack: LoraStack | None, sampling: Sampling, delay: float = 0.0) -> dict[str, Any]:
    if delay:
        await asyncio.sleep(delay)  # a staggered arrival, not a wait for work
    submitted = time.perf_counter()
    stamps: list[float] = []
    async for event in engine.stream(PROMPT, stack, sampling):
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
        elif event.reason not in ("length", "stop"):
            raise RuntimeError(f"generation failed: {event.reason} {event.error}")
        else:
            finish = event
    return {
        "tokens": finish.completion_tokens,
        "ttft_s": (stamps[0] if stamps else time.perf_counter()) - submitted,
        "gaps_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    }


async def _together(engine: Engine, stacks: list[LoraStack], sampling: Sampling, spacing: float = 0.0) -> dict[str, Any]:
    started = time.perf_counter()
    runs = await asyncio.gather(*(_request(engine, stack, sampling, i * spacing) for i, stack in enumerate(stacks)))
    return {"seconds": time.perf_counter() - started, "runs": runs}


async def _one_by_one(engine: Engine, stacks: list[LoraStack], sampling: Sampling) -> dict[str, Any]:
    started = time.perf_counter()
    runs = [await _request(engine, stack, sampling) for stack in stacks]
    return {"seconds": time.perf_counter() - started, "runs": runs}


def aggregate(outcome: dict[str, Any]) -> float:
    return sum(run["tokens"] for run in outcome["runs"]) / outcome["seconds"]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0


def bench_throughput(batched: Engine, sequential: Engine, stacks: list[LoraStack], sampling: Sampling,
                     rounds: int, sizes: Sequence[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in sizes:
        ratios, ours, theirs, gaps = [], [], [], []
        for round_index in range(rounds):
            harness.log(f"N={size}: round {round_index + 1}/{rounds}")
            base = on_loop(_one_by_one(sequential, stacks[:size], sampling))
            mine = on_loop(_together(batched, stacks[:size], sampling))
            ours.append(aggregate(mine))
            theirs.append(aggregate(base))
            ratios.append(ours[-1] / theirs[-1])
            gaps += [gap for run in mine["runs"] for gap in run["gaps_s"]]
        results[str(size)] = {
            "ratio": harness.median(ratios), "ratios": ratios, "batched_tokens_per_s": ours,
            "sequential_tokens_per_s": theirs, "itl_p95_ms": 1000 * p95(gaps),
        }  # fmt: skip
    return results


def bench_staggered(batched: Engine, sequential: Engine, stacks: list[LoraStack], sampling: Sampling, spread: float) -> dict[str, Any]:
    spacing = spread / len(stacks)
    mine = on_loop(_together(batched, stacks, sampling, spacing))
    base = on_loop(_together(sequential, stacks, sampling, spacing))
    return {
        "spread_s": spread,
        "ttft_p95_ms": 1000 * p95([run["ttft_s"] for run in mine["runs"]]),
        "ttft_p95_ms_sequential": 1000 * p95([run["ttft_s"] for run in base["runs"]]),
        "aggregate_ratio": aggregate(mine) / aggregate(base),
    }


def max_logit_diff(backend: Any, stacks: list[LoraStack], steps: int) -> float:
    """The batch's logits against each persona's one-request forward pass, teacher-forced."""
    import numpy as np

    ids = backend.encode_chat(PROMPT)
    batch = backend.batch(prefill_chunk=256)
    rows = []
    for stack in stacks:
        row = batch.open_ids(ids, stack, Sampling())
        while batch.prefill(row) is None:
            pass
        rows.append(row)
    forced = [[int(t) for t in np.random.default_rng(i).integers(10, 40_000, steps)] for i in range(len(stacks))]
    worst = 0.0
    for step in range(steps):
        for index, row in enumerate(rows):
            row.next_token = forced[index][step]
        logits = batch.forward()
        for index, row in enumerate(rows):
            alone = backend.logits(ids + forced[index][: step + 1], stacks[index])[-1]
            worst = max(worst, float(np.abs(logits[row].numpy() - alone).max()))
    for row in rows:
        batch.remove(row)
    return worst


def bench_mlx(folder: Path, stacks: list[LoraStack], sampling: Sampling, rounds: int) -> dict[str, Any]:
    try:
        from inference.backends.mlx import MlxBackend
    except ImportError as error:
        return {"unavailable": str(error)}
    backend = MlxBackend(folder, repetition=NO_LOOP_GUARD)
    engine = on_loop(_start(backend))
    sequential = on_loop(_start(OneAtATime(backend)))
    try:
        on_loop(_request(engine, stacks[0], Sampling(max_tokens=4)))
        return bench_throughput(engine, sequential, stacks, sampling, rounds, (PERSONAS,))[str(PERSONAS)]
    finally:
        on_loop(engine.close())
        on_loop(sequential.close())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, ~5 minutes)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds per N (default 3, quick 1)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (EOS ignored)")
    parser.add_argument("--stagger", type=float, default=3.0, help="seconds over which the staggered requests arrive")
    parser.add_argument("--no-mlx", action="store_true", help="skip the mlx backend")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    watch = harness.Stopwatch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from inference.backends.torch import TorchBackend

    hf_logging.disable_progress_bar()
    folder, _ = pull_default(models_dir())
    start_loop()
    sampling = Sampling(max_tokens=args.tokens, ignore_eos=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as work:
        layers = Layers(Path(work), count=3 * PERSONAS)
        stacks = [layers.resolver.stack(layers.persona(3 * i)) for i in range(PERSONAS)]
        backend = TorchBackend(folder, device="cpu", repetition=NO_LOOP_GUARD)
        harness.log(f"prompt: {len(backend.encode_chat(PROMPT))} tokens")
        batched = on_loop(_start(backend))
        sequential = on_loop(_start(OneAtATime(backend)))
        harness.log("warm-up: each persona once on each engine (packs weights, fills the prefix cache)")
        on_loop(_one_by_one(sequential, stacks, Sampling(max_tokens=4)))
        on_loop(_together(batched, stacks, Sampling(max_tokens=4)))
        results["throughput"] = bench_throughput(batched, sequential, stacks, sampling, rounds, SIZES)
        harness.log("staggered arrivals")
        results["staggered"] = bench_staggered(batched, sequential, stacks, sampling, args.stagger)
        results["engine"] = msgspec.structs.asdict(batched.stats())
        on_loop(batched.close())
        on_loop(sequential.close())
        harness.log("exactness: the batch against each persona alone")
        results["max_logit_diff"] = max_logit_diff(backend, stacks, 8 if args.quick else 16)
        if not args.no_mlx:
            harness.log("mlx backend")
            results["mlx"] = bench_mlx(folder, stacks, sampling, 1)
        layers.services.close()
    throughput = results["throughput"]
    mlx = results.get("mlx") or {}
    headline: dict[str, Any] = {
        "benchmark": "batching",
        "mode": "quick" if args.quick else "full",
        **{f"batch_ratio_{n}": round(throughput[str(n)]["ratio"], 3) for n in SIZES},
        "single_ratio": round(throughput["1"]["ratio"], 3),
        "itl_p95_ms_8": round(throughput["8"]["itl_p95_ms"], 1),
        "ttft_p95_ms_staggered": round(results["staggered"]["ttft_p95_ms"], 1),
        "ttft_p95_ms_staggered_sequential": round(results["staggered"]["ttft_p95_ms_sequential"], 1),
        "max_logit_diff": float(f"{results['max_logit_diff']:.3g}"),
        "tokens_per_s_8": round(harness.median(throughput["8"]["batched_tokens_per_s"]), 1),
        "tokens_per_s_8_sequential": round(harness.median(throughput["8"]["sequential_tokens_per_s"]), 1),
        "batch_ratio_8_mlx": round(mlx["ratio"], 3) if "ratio" in mlx else None,
    }
    headline["goals_met"] = harness.goals_met(headline, GOALS)
    full = {
        "headline": headline,
        "results": results,
        "setup": {
            "model": f"{DEFAULT_MODEL} fp32 from {folder}, cpu", "prompt_messages": [m.content for m in PROMPT],
            "new_tokens": args.tokens, "eos": "ignored", "rounds": rounds, "personas": PERSONAS,
            "stacks": "8 distinct 3-layer PEFT stacks, rank 8, q_proj+v_proj on all 30 blocks, weights 1.0/0.5/0.25",
            "baseline": "the same requests one after another through TorchBackend.generate (packed weights, prefix reuse)",
            "note": "interleaved rounds, medians of per-round ratios; a shared machine adds noise",
        },  # fmt: skip
        "hardware": harness.hardware_metadata(PACKAGES),
        "elapsed_s": round(watch.elapsed, 1),
    }
    harness.report("batching", f"batching ({headline['mode']}, {args.tokens} tokens, greedy, EOS ignored)",
                   full, args.results_dir, watch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
