"""Command handlers: load aggregate -> decide -> append (+ inline projections)."""
