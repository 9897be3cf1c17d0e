"""An in-memory sparse disk for tests: pages that were never written are holes."""

from __future__ import annotations

import threading

from ..protocol.constants import State
from ..protocol.transmission import Extent
from .base import Capabilities

PAGE = 4096
HOLE_FLAGS = int(State.HOLE | State.ZERO)


class MemoryBackend:
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()
        writable = not read_only
        self.caps = Capabilities(
            can_write=writable, can_flush=writable, can_fua=writable, can_trim=writable,
            can_zero=writable, can_fast_zero=writable,
        )

    def read_fd(self) -> None:
        return None

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        with self._lock:
            for page_no, start, stop, at in self._spans(offset, length):
                page = self.pages.get(page_no)
                if page is not None:
                    out[at : at + stop - start] = page[start:stop]
        return bytes(out)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        with self._lock:
            for page_no, start, stop, at in self._spans(offset, len(view)):
                page = self.pages.setdefault(page_no, bytearray(PAGE))
                page[start:stop] = view[at : at + stop - start]

    def sync(self) -> None:
        return None

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        with self._lock:
            for page_no, start, stop, _ in self._spans(offset, length):
                page = self.pages.get(page_no)
                if page is None:
                    continue
                if may_trim and start == 0 and stop == PAGE:
                    del self.pages[page_no]
                else:
                    page[start:stop] = bytes(stop - start)

    def trim(self, offset: int, length: int) -> None:
        with self._lock:
            for page_no, start, stop, _ in self._spans(offset, length):
                if start == 0 and stop == PAGE:
                    self.pages.pop(page_no, None)

    def cache(self, offset: int, length: int) -> None:
        return None

    def extents(self, offset: int, length: int, limit: int = 0) -> list[Extent]:
        out: list[Extent] = []
        with self._lock:
            for page_no, start, stop, at in self._spans(offset, length):
                flags = 0 if page_no in self.pages else HOLE_FLAGS
                n = stop - start
                if out and out[-1].flags == flags:
                    last = out[-1]
                    out[-1] = Extent(last.offset, last.length + n, flags)
                elif limit and len(out) >= limit:
                    break
                else:
                    out.append(Extent(offset + at, n, flags))
        return out

    def _spans(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        """(page number, start in page, stop in page, position in the request)."""
        at = 0
        while at < length:
            pos = offset + at
            page_no, start = divmod(pos, PAGE)
            stop = min(PAGE, start + length - at)
            yield page_no, start, stop, at
            at += stop - start

    def close(self) -> None:
        self.pages.clear()
