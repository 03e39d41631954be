"""Real databases made unreachable for a while, then reachable again."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from genome_service.eventstore.migrations import upgrade

# Another process rebuilding the WAL index (as after a crashed writer) holds SQLite's write and
# recovery locks: bytes 120 and 122 of the -shm file (https://sqlite.org/walformat.html). It clears
# both copies of the index header, so every connection must rebuild the index too and waits on the
# recovery lock: readers as well as writers, which a plain BEGIN EXCLUSIVE would not block under WAL.
# Like any process with the database open it also holds shared locks on the -shm file's byte 128 and
# on the database file's shared range (https://sqlite.org/lockingv3.html), so that no connection
# closing meanwhile believes itself the last and deletes the WAL and its index.
# Once it exits, its locks go with it and the next connection rebuilds the index from the WAL.
_RECOVERING = """
import fcntl, os, sys
PENDING_BYTE = 0x40000000
database = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(database, fcntl.LOCK_SH, 510, PENDING_BYTE + 2)
index = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(index, fcntl.LOCK_SH, 1, 128)
fcntl.lockf(index, fcntl.LOCK_EX, 1, 120)
fcntl.lockf(index, fcntl.LOCK_EX, 1, 122)
os.pwrite(index, bytes(96), 0)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def sqlite_locked(database_file: Path) -> Iterator[None]:
    """While inside, every reader and writer of the (WAL-mode, open) SQLite file waits out its busy timeout."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _RECOVERING, str(database_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0


class PostgresDatabase:
    """A database of its own on the test server, which the test can close to connections and open again."""

    def __init__(self, server_url: str) -> None:
        self.name = f"outage_{uuid.uuid4().hex[:12]}"
        self.admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
        self.url = sa.engine.make_url(server_url).set(database=self.name).render_as_string(hide_password=False)

    @contextmanager
    def closed(self) -> Iterator[None]:
        """While inside, it refuses new connections, and every session open on it was ended first."""
        self.admin_execute(f"ALTER DATABASE {self.name} ALLOW_CONNECTIONS false")
        try:
            # The timeout (ms) makes it wait until each session is gone.
            self.admin_execute(f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{self.name}'")
            yield
        finally:
            self.admin_execute(f"ALTER DATABASE {self.name} ALLOW_CONNECTIONS true")

    def admin_execute(self, statement: str) -> None:
        with self.admin.connect() as connection:
            connection.exec_driver_sql(statement)


@contextmanager
def postgres_database(server_url: str) -> Iterator[PostgresDatabase]:
    """A new, migrated database, dropped afterwards whatever state it was left in."""
    database = PostgresDatabase(server_url)
    database.admin_execute(f"CREATE DATABASE {database.name}")
    try:
        upgrade(database.url)
        yield database
    finally:
        database.admin_execute(f"DROP DATABASE {database.name} WITH (FORCE)")
        database.admin.dispose()
