"""Catch-up subscription: every event after a position, exactly once, in position order.

Positions are gapless and committed in order (see ``store``), so reading "after
the last position seen" can never skip a slow writer's event. Between empty
reads the subscriber waits: on PostgreSQL for a NOTIFY sent by the appending
transaction at commit (or the poll interval, whichever comes first), on SQLite
for the poll interval.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from genome_service.eventstore.records import RecordedEvent
from genome_service.eventstore.store import NOTIFY_CHANNEL, EventStore


class CatchUpSubscription:
    def __init__(
        self,
        store: EventStore,
        *,
        after_position: int = 0,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.position = after_position
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.stop = stop or threading.Event()

    def batches(self, *, follow: bool = True) -> Iterator[list[RecordedEvent]]:
        """Batches of new events; with ``follow`` it waits for more until ``stop`` is set."""
        waiter = _NotifyWaiter(self.store) if follow and self.store.database.dialect == "postgresql" else None
        try:
            while not self.stop.is_set():
                batch = self.store.read_all(after_position=self.position, limit=self.batch_size)
                if batch:
                    self.position = batch[-1].position
                    yield batch
                    continue
                if not follow:
                    return
                if waiter is not None:
                    waiter.wait(self.poll_interval)
                else:
                    self.stop.wait(self.poll_interval)
        finally:
            if waiter is not None:
                waiter.close()

    def __iter__(self) -> Iterator[RecordedEvent]:
        for batch in self.batches():
            yield from batch


class _NotifyWaiter:
    """A dedicated PostgreSQL connection LISTENing for appends."""

    def __init__(self, store: EventStore) -> None:
        import psycopg

        url = store.database.write_engine.url.set(drivername="postgresql")
        self.connection = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.connection.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def wait(self, timeout: float) -> None:
        for _ in self.connection.notifies(timeout=timeout, stop_after=1):
            pass

    def close(self) -> None:
        self.connection.close()
