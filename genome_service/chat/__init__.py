"""Persona chat: retrieval -> prompt assembly -> inference -> conversation events."""
