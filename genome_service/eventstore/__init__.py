"""Append-only event log on SQLAlchemy: append, read, subscribe, snapshots, upcasting."""
