"""Content-addressed blob storage: a file's name is the SHA-256 of its bytes.

Writes go to a temporary file in the same directory, are fsynced and then
renamed into place, so a crash never leaves a half-written blob under a real
name, and writing the same bytes twice is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.exists():
            return sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return sha256

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def delete(self, sha256: str) -> None:
        """Delete the blob, leaving no readable copy of it (`shred`)."""
        target = self.path(sha256)
        if target.exists():
            shred(target)


def shred(path: Path) -> None:
    """Overwrite a file with zeros, then unlink it; a folder: each file in it, then the folder.

    Erased data leaves no readable copy in the old blocks (on file systems that write in place)."""
    if path.is_dir():
        for child in path.iterdir():
            shred(child)
        path.rmdir()
        return
    with path.open("r+b") as handle:
        handle.write(b"\0" * path.stat().st_size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
