"""Pure domain: aggregates as deciders (``decide`` + ``evolve``), commands and events.

Nothing here does I/O or imports a framework; the event store and the services
depend on this package, never the reverse.
"""
