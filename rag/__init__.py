"""Retrieval: embedder, chunker, FAISS index and retriever.

Knows nothing of HTTP or of the event store: the service feeds it texts, vectors
and ids, and keeps it in step with the log (``genome_service.services.indexes``).
"""
