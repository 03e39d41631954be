"""Knowing, without asking the database, that nothing has been committed since a read.

A GET by id on SQLite spent more on opening its read transaction (file locks, the
WAL index) and decoding the row than on the rest of the request. Read models change
only when a write commits, so a row read once can be served again until the next
commit by any connection of any process. The signal for that is a change token:
8 random bytes in a small file beside the database (``genome.db-changes``), mapped
into memory by every process that opens the database, and replaced after every
committed write. Comparing it costs a memory read, no system call.

Why this is exact rather than "fresh enough", for a value cached with token ``t``
(read *before* the value was loaded):

- a commit visible before the token was read is in the loaded value;
- any other commit replaces the token after it became visible, so after that
  replacement ``t`` no longer matches and the value is read again;
- a writer answers its client only after replacing the token, so a client that
  saw its write succeed never reads the old row back, whichever process serves it.

Random tokens rather than a counter: a writer needs no lock to replace one, and two
writers racing cannot bring back a value a reader already holds (2^-64 aside).
PostgreSQL servers may run on several hosts, which share no memory: there the cache
is off and every read goes to the database.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TOKEN_BYTES = 8


class ChangeToken:
    """The shared token of one SQLite database file."""

    def __init__(self, database_path: Path) -> None:
        self.path = database_path.with_name(database_path.name + "-changes")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < TOKEN_BYTES:
                # New (or cut short): any value no reader holds will do.
                os.pwrite(fd, os.urandom(TOKEN_BYTES), 0)
            self._map = mmap.mmap(fd, TOKEN_BYTES)
        finally:
            os.close(fd)  # the mapping keeps the file open

    def current(self) -> bytes:
        return self._map[:TOKEN_BYTES]

    def replace(self) -> None:
        self._map[:TOKEN_BYTES] = os.urandom(TOKEN_BYTES)


class ReadCache:
    """Values read from the database by key, each valid while the token it was read under is current.

    Callers cache what they will not mutate (frozen structs, rows they only read). When
    the token moves every entry is dropped at once, so an erased row does not linger in
    memory either; ``capacity`` bounds the entries between two writes.
    """

    def __init__(self, token: ChangeToken | None, capacity: int = 4096) -> None:
        self.token = token
        self.capacity = capacity
        self._generation = b""
        self._entries: dict[Hashable, tuple[bytes, object]] = {}

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        if self.token is None:
            return load()
        token = self.token.current()
        if token != self._generation:
            # A racing thread may still store into the old dict, or store here under an
            # older token; neither entry is ever served, since each carries its token.
            self._entries = {}
            self._generation = token
        entries = self._entries
        hit = entries.get(key)
        if hit is not None and hit[0] == token:
            return hit[1]  # type: ignore[return-value]
        value = load()
        if len(entries) >= self.capacity:
            entries.clear()
        entries[key] = (token, value)
        return value
