"""Read models derived from events, each group with a checkpoint: inline, catch-up, rebuild."""
