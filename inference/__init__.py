"""Inference: base model specs, LoRA adapter formats and validation, stacks, backends.

Knows nothing of HTTP, databases or the event store; `genome_service` calls into it.
"""
