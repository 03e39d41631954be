"""Persona chat: what retrieval adds to a turn, time to first token, and 8 concurrent chats.

    .venv/bin/python benchmarks/chat.py [--quick]

In process, on the real parts: a fresh SQLite database, the bundled embedder, the
default model (SmolLM2-135M-Instruct on torch; pulled into GENOME_MODELS_DIR or the
tests' shared cache `.cache/models`), one engine, and `genome_service.chat.turn`.

- retrieval overhead: one persona with 1,000 knowledge chunks. The same question is
  prepared (everything before the first token) with retrieval (context_k = 4) and
  without (context_k = 0), interleaved; ``retrieval_overhead_p95_ms`` is the p95 of the
  pairwise difference: embedding the question, the FAISS search, reading the chunk
  texts and fitting them into the prompt. ``turn_overhead_p95_ms`` is the same for the
  whole turn (1 generated token, recorded), which adds the model's prefill of the
  passages' tokens: a cost of the longer prompt, not of retrieval.
- ttft: a whole turn with retrieval, from the call to its first token.
- concurrency: 8 chats at once across 8 personas (each with its own small knowledge),
  32 tokens each; errors counted, tokens per second over the wall time.

The last line of stdout is one JSON object with the headline figures; the full
results go to ``benchmarks/results/chat-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402


QUICK = {"pairs": 20, "ttft_turns": 10, "chunks": 1000}
FULL = {"pairs": 100, "ttft_turns": 40, "chunks": 1000}
WORDS = ("river stone lantern copper meadow falcon harbor velvet ember orchard glacier comet willow "
         "quartz saffron thunder marble cedar tide beacon").split()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def synthetic_text(rng: random.Random, chunks: int, words_per_chunk: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(chunks * words_per_chunk))


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from genome_service.chat.runtime import ChatRuntime
    from genome_service.chat.turn import Reply, TurnRequest, prepare_turn, run_turn
    from genome_service.domain.conversation import Message
    from genome_service.domain.persona import PERSONA, CreatePersona
    from genome_service.eventstore.migrations import upgrade
    from genome_service.eventstore.records import NO_METADATA
    from genome_service.services.bootstrap import build
    from genome_service.services.knowledge import add_knowledge
    from genome_service.settings import Settings
    from inference.pull import pull_default

    scale = QUICK if args.quick else FULL
    models_dir = Path(os.environ.get("GENOME_MODELS_DIR") or harness.PROJECT_ROOT / ".cache" / "models")
    pull_default(models_dir)
    upgrade(f"sqlite:///{root / 'genome.db'}")
    # 40-word chunks (no overlap): 1,000 of them from one 40,000-word document.
    settings = Settings(data_dir=root, models_dir=models_dir, inference_backend="torch", inference_device="cpu",
                        chunk_words=40, chunk_overlap_words=0, chat_timeout=600.0)
    services = build(settings)
    rng = random.Random(7)
    for i in range(8):
        services.commands.execute(PERSONA, f"p{i}", CreatePersona(f"p{i}", "bench", f"Persona {i}", system_prompt="You are concise."))
    started = time.perf_counter()
    add_knowledge(services, "bench", "p0", "corpus", "text/plain", synthetic_text(rng, scale["chunks"], 40), NO_METADATA)
    for i in range(1, 8):
        add_knowledge(services, "bench", f"p{i}", "notes", "text/plain", synthetic_text(rng, 5, 40), NO_METADATA)
    services.search.current()
    harness.log(f"seeded {scale['chunks']} chunks in {time.perf_counter() - started:.1f} s")

    runtime = ChatRuntime(services)
    loaded = await runtime.ready()
    question = (Message("user", "Tell me about the copper lantern by the river."),)

    def turn(persona: str, k: int, max_tokens: int) -> TurnRequest:
        return TurnRequest(persona_id=persona, owner="bench", messages=question, max_tokens=max_tokens, context_k=k)

    async def whole_turn(request: TurnRequest) -> tuple[float, float, Reply]:
        start = time.perf_counter()
        first = None
        async for event in run_turn(services, runtime, request, NO_METADATA):
            if first is None:
                first = time.perf_counter() - start
            if isinstance(event, Reply):
                return first, time.perf_counter() - start, event
        raise AssertionError("a turn ends with a Reply")

    try:
        for _ in range(3):  # warm-up: tokenizer, embedder, model, caches
            await whole_turn(turn("p0", 4, 1))
        prepare_diffs, turn_diffs = [], []
        for _ in range(scale["pairs"]):
            with_k = harness.timed(lambda: prepare_turn(services, loaded, turn("p0", 4, 1)))
            without = harness.timed(lambda: prepare_turn(services, loaded, turn("p0", 0, 1)))
            prepare_diffs.append((with_k - without) * 1000)
            _, turn_with, _ = await whole_turn(turn("p0", 4, 1))
            _, turn_without, _ = await whole_turn(turn("p0", 0, 1))
            turn_diffs.append((turn_with - turn_without) * 1000)
        ttfts = [(await whole_turn(turn("p0", 4, 16)))[0] * 1000 for _ in range(scale["ttft_turns"])]

        wall_start = time.perf_counter()
        results = await asyncio.gather(*(whole_turn(turn(f"p{i}", 4, 32)) for i in range(8)), return_exceptions=True)
        wall = time.perf_counter() - wall_start
        replies = [r[2] for r in results if not isinstance(r, BaseException)]
        errors = len(results) - len(replies) + sum(1 for r in replies if r.failure is not None)
        tokens = sum(r.generation.usage.completion_tokens for r in replies)
    finally:
        await runtime.close()
        services.close()
    return {
        "retrieval_overhead_p95_ms": round(p95(prepare_diffs), 2),
        "retrieval_overhead_median_ms": round(harness.median(prepare_diffs), 2),
        "turn_overhead_p95_ms": round(p95(turn_diffs), 2),
        "ttft_p95_ms": round(p95(ttfts), 1),
        "ttft_median_ms": round(harness.median(ttfts), 1),
        "concurrent_errors": errors,
        "concurrent_tokens_per_s": round(harness.rate(tokens, wall), 1),
        "concurrent_wall_s": round(wall, 2),
        "knowledge_chunks": scale["chunks"],
        "pairs": scale["pairs"],
        "model": loaded.model,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a couple of minutes)")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as temp:
        headline = asyncio.run(run(args, Path(temp)))
    headline["goals_met"] = headline["retrieval_overhead_p95_ms"] <= 50 and headline["concurrent_errors"] == 0
    full = {"benchmark": "chat", "mode": "quick" if args.quick else "full", "results": headline,
            "hardware": harness.hardware_metadata(["torch", "transformers", "faiss-cpu", "litestar"])}
    path = harness.save_results("chat", full, args.results_dir)
    harness.print_table("chat", ["figure", "value"], [[k, v] for k, v in headline.items()])
    harness.log(f"saved {path}")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
