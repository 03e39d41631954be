"""Genome Service: event-sourced genomes of LoRA layers and the personas that use them."""
