"""A wrapper that makes chosen operations fail, like nbdkit's error filter.

Used by the fault tests and available to operators who want to check how their
clients react to a failing disk.
"""

from __future__ import annotations

import errno as host_errno
import os
from dataclasses import dataclass

from ..protocol.transmission import Extent
from .base import Backend


@dataclass(frozen=True, slots=True)
class Fault:
    op: str  # "read", "write", "sync", "zero", "trim", "extents"
    offset: int = 0
    length: int = 1 << 63
    errno: int = host_errno.EIO

    def hits(self, op: str, offset: int, length: int) -> bool:
        return op == self.op and offset < self.offset + self.length and self.offset < offset + max(
            length, 1
        )


class FaultInjection:
    """Delegates to ``inner`` but raises OSError where a Fault matches.

    A read that crosses a faulty range returns nothing: the failure is reported at the
    first faulty byte, which the engine turns into ERROR_OFFSET after the good part.
    """

    def __init__(self, inner: Backend, faults: list[Fault] | None = None) -> None:
        self.inner = inner
        self.size = inner.size
        self.caps = inner.caps
        self.faults = list(faults or [])
        # Splicing is the engine's way of writing only into backends that offer it: the
        # wrapper offers it where the inner backend does, so faults reach both paths.
        if hasattr(inner, "splice_in"):
            self.splice_in = self._splice_in

    def _check(self, op: str, offset: int, length: int) -> None:
        for fault in self.faults:
            if fault.hits(op, offset, length):
                at = max(offset, fault.offset)
                raise OSError(fault.errno, f"injected {os.strerror(fault.errno)} at {at}")

    def read_fd(self) -> None:
        return None  # force the copying path so every read passes through _check

    def pread(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return self.inner.pread(offset, length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check("write", offset, len(data))
        self.inner.pwrite(data, offset)

    def _splice_in(self, pipe: int, offset: int, count: int) -> None:
        self._check("write", offset, count)
        self.inner.splice_in(pipe, offset, count)  # type: ignore[attr-defined]

    def sync(self) -> None:
        self._check("sync", 0, 1)
        self.inner.sync()

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        self._check("zero", offset, length)
        self.inner.zero(offset, length, may_trim=may_trim, fast=fast)

    def trim(self, offset: int, length: int) -> None:
        self._check("trim", offset, length)
        self.inner.trim(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def extents(self, offset: int, length: int, limit: int = 0) -> list[Extent]:
        self._check("extents", offset, length)
        return self.inner.extents(offset, length, limit)

    def close(self) -> None:
        self.inner.close()
