"""Vector search: our approximate index against exact search, the embedder, and the search endpoint.

    .venv/bin/python benchmarks/search.py [--quick] [--queries 500]

- Index: ``rag.index.VectorIndex`` in HNSW mode (M=16, efConstruction=80, efSearch=128, the
  service's defaults; ``ef_sweep`` also measures efSearch 32..256 on the same graph) on 384-d unit vectors, against exact search (``IndexFlatIP``) over the
  same vectors in the same process. The vectors are a Gaussian mixture (1,000 clusters,
  noise 0.35 of a centre's norm): uniform random 384-d vectors have no near neighbours, so
  recall on them says nothing about real embeddings, which cluster by topic. Queries are
  fresh draws from the same mixture, one at a time (k=10). recall10 = |approx top-10 ∩ exact
  top-10| / 10, averaged. The index is filled with the bulk path (FAISS's parallel add);
  the service adds one node at a time for determinism, which builds the same kind of graph.
- Embedder: sentences per second of the bundled all-MiniLM-L6-v2, batches of 64, cache off.
- Endpoint: ``GET /layers/search?q=`` on the real server (SQLite, 10k layers registered through
  the log; 1k with ``--quick``), a different query text each time so that embedding is measured
  too. The first search embeds and indexes every layer; it is timed apart (``first_request_s``).

``--quick`` skips the 1M set and uses fewer queries. The last line of stdout is one JSON object;
the full results go to ``benchmarks/results/search-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402
import numpy as np


DIM = 384
PACKAGES = ("faiss-cpu", "numpy", "torch", "sentence-transformers", "transformers", "litestar")


def mixture(n: int, seed: int, clusters: int = 1000, spread: float = 0.35) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((clusters, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # in slices: 1M x 384 float64 would take 3 GB
        m = min(100_000, n - start)
        block = centres[rng.integers(clusters, size=m)] + spread * rng.standard_normal((m, DIM), dtype=np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def percentile_ms(seconds: list[float], p: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, p))


def index_run(n: int, queries: int) -> dict[str, Any]:
    """The service's HNSW settings against exact search; also other efSearch values on the same graph."""
    import faiss
    import msgspec

    from rag.index import IndexConfig, VectorIndex

    harness.log(f"index: {n:,} vectors")
    data, probes = mixture(n, seed=1), mixture(queries, seed=2)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(data)
    exact_s, truths = [], []
    for q in probes:
        t = time.perf_counter()
        _, truth = exact.search(q[None, :], 10)
        exact_s.append(time.perf_counter() - t)
        truths.append(set(truth[0].tolist()))
    default = IndexConfig()
    start = time.perf_counter()
    index = VectorIndex.bulk_hnsw([f"k{i}" for i in range(n)], data, {"owner": "o"}, default)
    build_s = time.perf_counter() - start
    sweep = {}
    for ef in sorted({32, 64, 128, 256, default.ef_search}):
        index.config = msgspec.structs.replace(default, ef_search=ef)
        approx_s, recall = [], []
        for q, truth in zip(probes, truths, strict=True):
            t = time.perf_counter()
            hits = index.search(q, 10)
            approx_s.append(time.perf_counter() - t)
            recall.append(len({int(h.key[1:]) for h in hits} & truth) / 10)
        sweep[ef] = {"p50_ms": percentile_ms(approx_s, 50), "p95_ms": percentile_ms(approx_s, 95), "recall10": float(np.mean(recall))}
    return {"n": n, "build_s": build_s, "ef_search": default.ef_search, **sweep[default.ef_search],
            "exact_p50_ms": percentile_ms(exact_s, 50), "exact_p95_ms": percentile_ms(exact_s, 95),
            "queries": queries, "ef_sweep": sweep}


def embed_run(sentences: int) -> dict[str, Any]:
    from rag.embedder import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(cache_size=0)
    embedder.embed(["warm up the model"])
    texts = [f"layer {i}: a {('patient', 'witty', 'strict')[i % 3]} tutor of topic {i % 97} with tags {i % 13}" for i in range(sentences)]
    seconds = harness.timed(lambda: embedder.embed(texts))
    return {"sentences": sentences, "seconds": seconds, "sentences_per_s": harness.rate(sentences, seconds)}


def endpoint_run(layers: int, requests: int) -> dict[str, Any]:
    import httpx
    from factories import register_layer

    from genome_service.services.bootstrap import build
    from genome_service.settings import Settings

    from benchmarks.api import our_server, running

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        server = our_server(data_dir, Path(tmp))
        services = build(Settings(data_dir=data_dir))
        start = time.perf_counter()
        for i in range(layers):  # through the command handler: the same events an upload appends
            register_layer(services, f"layer-{i:05d}", owner="local" if i % 2 else f"owner{i % 7}")
        services.close()
        seed_s = time.perf_counter() - start
        harness.log(f"endpoint: {layers:,} layers appended in {seed_s:.1f}s; starting the server")
        with running(server), httpx.Client(base_url=server.url, timeout=600) as client:
            start = time.perf_counter()
            first = client.get("/layers/search", params={"q": "warm up", "k": 10})  # loads the model, indexes the log
            first_s = time.perf_counter() - start
            assert first.status_code == 200, first.text
            latencies = []
            for i in range(requests):
                q = f"tutor {hashlib.sha1(str(i).encode()).hexdigest()[:6]} for topic {i}"
                t = time.perf_counter()
                response = client.get("/layers/search", params={"q": q, "k": 10})
                latencies.append(time.perf_counter() - t)
                assert response.status_code == 200, response.text
    return {"layers": layers, "requests": requests, "seed_s": seed_s, "first_request_s": first_s,
            "p50_ms": percentile_ms(latencies, 50), "p95_ms": percentile_ms(latencies, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1M set; fewer queries (about a minute)")
    parser.add_argument("--queries", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("GENOME_LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(harness.PROJECT_ROOT / "tests"))
    queries = args.queries or (200 if args.quick else 1000)
    watch = harness.Stopwatch()
    runs = {"100k": index_run(100_000, queries)}
    if not args.quick:
        runs["1m"] = index_run(1_000_000, min(queries, 300))  # exact search at 1M costs ~0.5 s a query
    embed = embed_run(512 if args.quick else 2048)
    # --quick: 1,000 layers, since the server embeds every layer once on its first search.
    endpoint = endpoint_run(1_000 if args.quick else 10_000, 100 if args.quick else 500)
    headline = {
        "p95_ms_100k": runs["100k"]["p95_ms"], "recall10_100k": runs["100k"]["recall10"],
        "exact_p95_ms_100k": runs["100k"]["exact_p95_ms"],
        "p95_ms_1m": runs["1m"]["p95_ms"] if "1m" in runs else None,
        "recall10_1m": runs["1m"]["recall10"] if "1m" in runs else None,
        "embed_sentences_per_s": embed["sentences_per_s"], "search_endpoint_p95_ms": endpoint["p95_ms"],
    }
    results = {"benchmark": "search", "quick": args.quick, "headline": headline, "index": runs, "embed": embed,
               "endpoint": endpoint, "seconds": watch.elapsed, "hardware": harness.hardware_metadata(PACKAGES),
               "data": "Gaussian mixture on the unit sphere: 1,000 centres, noise 0.35 x centre norm; queries from the same mixture"}
    path = harness.save_results("search", results)
    harness.print_table("search", ["figure", "value"], [[k, v] for k, v in headline.items()])
    harness.log(f"saved {path}")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
