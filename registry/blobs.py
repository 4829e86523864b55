"""Content-addressed blob store: `blobs/sha256/ab/cdef…`, written atomically, verified on read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from moduleserve.registry.errors import IntegrityError

CHUNK = 1 << 20


class BlobStore:
    """Immutable files named by the sha256 of their bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        return self._blobs / digest[:2] / digest[2:]

    def exists(self, digest: str) -> bool:
        """Whether a blob with this digest is stored."""
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its digest; identical bytes are stored once.

        The bytes go to a temporary file that is fsynced and then renamed into
        place, and the folder is fsynced, so a crash leaves either no blob or the
        whole blob, never a partial one under its final name.
        """
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file():
            # Reused: make it young again so that gc's age guard protects this push too.
            os.utime(target)
            return digest
        self._tmp.mkdir(parents=True, exist_ok=True)
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent.parent)  # the new folder's entry must survive a crash too
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix=digest[:12], suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(target.parent)
        return digest

    def writer(self) -> BlobWriter:
        """A blob written in pieces (an upload larger than memory should hold): `write` the
        bytes, then `commit` to store it under its digest, or `abort`."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        return BlobWriter(self)

    def adopt(self, tmp_path: Path, digest: str) -> None:
        """Move a finished, fsynced temporary file into place under its digest."""
        target = self.path(digest)
        if target.is_file():
            os.utime(target)
            tmp_path.unlink()
            return
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target.parent.parent)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)

    def read(self, digest: str) -> bytes:
        """Read a blob and check its bytes against the digest."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(digest, "missing from the store") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(digest, "corrupt (its bytes no longer match its digest)")
        return data

    def verified_path(self, digest: str) -> Path:
        """The blob's path after re-hashing it in chunks (no copy of the bytes is kept)."""
        problem = self.check(digest)
        if problem == "missing":
            raise IntegrityError(digest, "missing from the store")
        if problem is not None:
            raise IntegrityError(digest, "corrupt (its bytes no longer match its digest)")
        return self.path(digest)

    def check(self, digest: str) -> str | None:
        """Re-hash a blob; return None when intact, else what is wrong."""
        path = self.path(digest)
        if not path.is_file():
            return "missing"
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
        return None if hasher.hexdigest() == digest else "corrupt"

    def digests(self) -> Iterator[str]:
        """Every stored digest."""
        if not self._blobs.is_dir():
            return
        for prefix in sorted(self._blobs.iterdir()):
            for item in sorted(prefix.iterdir()):
                yield prefix.name + item.name

    def remove(self, digest: str) -> int:
        """Delete a blob; returns the bytes freed (0 if it was gone)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def age_seconds(self, digest: str) -> float:
        """Seconds since the blob was written."""
        return time.time() - self.path(digest).stat().st_mtime

    def stale_temp_files(self, min_age_s: float) -> list[Path]:
        """Temporary files left by writers that died, older than `min_age_s`."""
        if not self._tmp.is_dir():
            return []
        now = time.time()
        return [p for p in self._tmp.iterdir() if now - p.stat().st_mtime >= min_age_s]


class BlobWriter:
    """A temporary file in the store, hashed as it is written (see `BlobStore.writer`)."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.root / "tmp", prefix="upload", suffix=".part")
        self.path = Path(name)
        self._handle = os.fdopen(fd, "wb")
        self._hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes."""
        self._handle.write(data)
        self._hasher.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """fsync, move into place under the digest, and return the digest."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        digest = self._hasher.hexdigest()
        self._store.adopt(self.path, digest)
        return digest

    def abort(self) -> None:
        """Drop the temporary file."""
        self._handle.close()
        self.path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
