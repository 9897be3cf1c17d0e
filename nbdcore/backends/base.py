"""The one small interface every storage backend implements.

Capabilities are declared once, at open, and become the export's transmission flags,
so the engine never calls an operation a backend cannot do (nbdkit's ``can_*``).
Wrappers (fault injection, a future copy-on-write overlay) hold another backend and
implement the same interface, like nbdkit filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..protocol.transmission import Extent


@dataclass(frozen=True, slots=True)
class Capabilities:
    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_extents: bool = True
    # Every connection sees one shared state (one fd, one page cache): flush is global.
    can_multi_conn: bool = True


@runtime_checkable
class Backend(Protocol):
    size: int
    caps: Capabilities

    def read_fd(self) -> int | None:
        """A file descriptor ``os.sendfile`` may read the export from, or None."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; a short source raises OSError(EIO)."""
        ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    def sync(self) -> None:
        """Make every completed write durable (FLUSH, FUA)."""
        ...

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        """Make the range read as zeroes; ``fast`` raises OSError(ENOTSUP) if it would be slow."""
        ...

    def trim(self, offset: int, length: int) -> None: ...

    def cache(self, offset: int, length: int) -> None: ...

    def extents(self, offset: int, length: int, limit: int = 0) -> list[Extent]:
        """Consecutive extents from ``offset`` covering at most ``length`` bytes.

        With ``limit`` > 0, stop after that many extents (the rest is simply not described).
        """
        ...

    def close(self) -> None: ...
