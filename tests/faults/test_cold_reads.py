"""Reads of data the page cache does not hold go to the pool: a slow disk read must not
hold up the other requests of the same connection.

The engine asks without waiting whether a read would wait (``RWF_NOWAIT`` for small reads,
``cachestat`` for reads sent from the file's mapping). ``SlowDisk`` answers "not cached"
for one offset and makes the real read of it wait until the test lets it go, so a read
done on the connection's own thread would visibly stall the request behind it.
"""

from __future__ import annotations

import os
import threading

import pytest
from nbdclient import NbdClient, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd

MiB = 1 << 20
SLOW = 2 * MiB  # the offset whose data is "on a slow disk"


class SlowDisk:
    """A SparseFile whose range at SLOW is not cached and takes until ``release``."""

    def __init__(self, inner: SparseFile) -> None:
        self.inner = inner
        self.size, self.caps = inner.size, inner.caps
        self.release = threading.Event()
        self.disk_reads: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        return None if offset == SLOW else self.inner.pread(offset, length)

    def cached(self, offset: int, length: int) -> bool:
        return offset != SLOW

    def pread(self, offset: int, length: int) -> bytes:
        if offset == SLOW:
            self.disk_reads.append(offset)
            assert self.release.wait(30)
        return self.inner.pread(offset, length)


@pytest.fixture
def slow_disk(tmp_path, inprocess_server):
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, 4 * MiB))
    disk = SlowDisk(SparseFile(path))
    server = inprocess_server(ExportRegistry([Export("disk", disk)]))
    yield disk, int(server.port)
    disk.release.set()


@pytest.mark.parametrize(
    ("length", "structured"),
    [(4096, True), (4096, False), (256 * 1024, True)],
    ids=["small-structured", "small-simple", "mapped-structured"],
)
def test_cold_read_does_not_hold_up_the_next_request(slow_disk, length, structured):
    disk, port = slow_disk
    with NbdClient.connect(port, timeout=3) as client:
        client.handshake("disk", structured=structured)
        slow = client.send(Cmd.READ, SLOW, length)
        fast = client.send(Cmd.READ, 0, length)
        try:
            # Within the client's 3 s timeout, while the slow read is still waiting.
            assert client.wait(fast).data() == pattern(0, length)
            assert disk.disk_reads == [SLOW]
            assert slow not in client._stash  # not answered yet: it is still on the disk
        finally:
            disk.release.set()
        assert client.wait(slow).data() == pattern(SLOW, length)


def test_cold_reads_in_flight_are_bounded(slow_disk):
    """Beyond COLD_BYTES of cold reads in flight the engine reads inline again (memory
    stays bounded); every reply still arrives, with the right data."""
    from nbdcore.server import COLD_BYTES

    disk, port = slow_disk
    disk.release.set()
    count = COLD_BYTES // MiB + 4
    with NbdClient.connect(port, timeout=10) as client:
        client.handshake("disk", structured=True)
        cookies = [client.send(Cmd.READ, SLOW, MiB) for _ in range(count)]
        for cookie in cookies:
            assert client.wait(cookie).data() == pattern(SLOW, MiB)


def test_the_backend_tells_an_evicted_file_from_a_cached_one(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, MiB))
    backend = SparseFile(path)
    backend.pread(0, MiB)
    assert backend.pread_nowait(4096, 4096) == pattern(4096, 4096)
    cachestat = backend.cached(0, MiB)
    os.fsync(backend.fd)
    os.posix_fadvise(backend.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert backend.pread_nowait(4096, 4096) is None
    if _kernel_at_least(6, 5):
        assert cachestat is True
        assert backend.cached(0, MiB) is False
    else:
        assert cachestat is None  # no cachestat: such reads are done inline
    backend.close()


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)

