"""Backends behind one protocol (`inference.backends.base`): torch, mlx and openai."""
