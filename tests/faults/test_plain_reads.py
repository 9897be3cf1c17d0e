"""The short path of small READs: a flagless read under 64 KiB of data the backend knows
is allocated and cached skips the general path, and must answer exactly as it would.

Anything the short path is not sure of (a hole, a range never looked up, a page not in
the page cache, a punched range, a request with flags) goes the general way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_sparse_image, wait_until
from nbdclient import NbdClient, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd, CmdFlag, NbdErrno, ReplyType

MiB = 1 << 20
SIZE = 4 * MiB
HOLE_AT = 3 * MiB  # [HOLE_AT, SIZE) is a hole


class CountingFile(SparseFile):
    """A SparseFile that counts the reads the engine's short path got from it, or
    refuses them all."""

    def __init__(self, path: Path, *, refuse: bool = False) -> None:
        super().__init__(path)
        self.refuse = refuse
        self.served = 0

    def read_resident(self, offset: int, length: int) -> bytearray | None:
        if self.refuse:  # as if no page were in the page cache
            return None
        return self._count(super().read_resident(offset, length))

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """The general path reads this way too; with simple replies, so does the short."""
        if self.refuse:
            return None
        return self._count(super().pread_nowait(offset, length))

    def _count(self, data: bytes | bytearray | None) -> bytes | bytearray | None:
        if data is not None and sys._getframe(2).f_code.co_name == "_read_plain":
            self.served += 1
        return data


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_sparse_image(tmp_path / "disk.raw", SIZE, {0: pattern(0, HOLE_AT)})


def serve(inprocess_server, backend: SparseFile) -> int:
    return int(inprocess_server(ExportRegistry([Export("disk", backend)])).port)


@pytest.fixture
def warm(inprocess_server, disk) -> Iterator[tuple[CountingFile, NbdClient]]:
    """A structured client whose first read made the engine learn the allocated run."""
    backend = CountingFile(disk)
    with NbdClient.connect(serve(inprocess_server, backend)) as client:
        client.handshake("disk")
        assert client.read(0, 512).ok
        yield backend, client


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_small_reads_of_known_data_take_the_short_path(inprocess_server, disk, structured):
    backend = CountingFile(disk)
    port = serve(inprocess_server, backend)
    offsets = [0, 4096, 12345, 2 * MiB + 7, HOLE_AT - 4096]
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=structured)
        for offset in offsets:  # the first lookup learns the run; the rest are short
            reply = client.read(offset, 4096)
            assert reply.ok
            assert reply.data() == pattern(offset, 4096)
            if structured:
                (chunk,) = reply.chunks
                assert chunk.type == ReplyType.OFFSET_DATA
                assert chunk.done
    # Structured: holes must be found, so only reads inside the run a first lookup
    # learned are short. Simple: a hole is sent as zeroes, so every cached read is.
    assert backend.served == len(offsets) - (1 if structured else 0)


def test_simple_replies_send_a_hole_as_zeroes_on_the_short_path(inprocess_server, disk):
    backend = CountingFile(disk)
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=False)
        assert client.read(HOLE_AT - 100, 4096).data() == pattern(HOLE_AT - 100, 100) + bytes(3996)
    assert backend.served == 1


def test_short_path_counts_like_the_general_path(inprocess_server, disk):
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        for offset in range(0, 64 * 4096, 4096):
            assert client.read(offset, 4096).ok
        (info,) = server.connections()
        assert backend.served == 63
        assert info.stats.ops[Cmd.READ] == 64
        assert info.stats.bytes_read == 64 * 4096
        assert wait_until(lambda: sum(info.stats.latency) == 64)


def test_a_pipelined_batch_is_answered_in_full(warm):
    backend, client = warm
    offsets = [(i * 7919 * 512) % (HOLE_AT - 8192) for i in range(500)]
    for cookie, offset in enumerate(offsets, start=1000):
        client.send(Cmd.READ, offset, 512 + cookie % 7000, cookie=cookie)
    for cookie, offset in enumerate(offsets, start=1000):
        reply = client.wait(cookie)
        assert reply.ok
        assert reply.data() == pattern(offset, 512 + cookie % 7000)
    assert backend.served == len(offsets)


def test_reads_touching_a_hole_go_the_general_way(warm):
    backend, client = warm
    across = client.read(HOLE_AT - 2048, 4096)
    assert [c.type for c in across.chunks] == [ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]
    assert across.data() == pattern(HOLE_AT - 2048, 2048) + bytes(2048)
    inside = client.read(HOLE_AT + 8192, 4096)
    assert [c.type for c in inside.chunks] == [ReplyType.OFFSET_HOLE]
    assert backend.served == 0


def test_a_punched_range_is_never_served_stale(warm):
    backend, client = warm
    assert client.read(MiB, 4096).data() == pattern(MiB, 4096)
    assert backend.served == 1
    assert client.trim(MiB, 64 * 1024).ok
    assert client.read(MiB, 4096).data() == bytes(4096)
    assert client.write(MiB, b"n" * 4096).ok
    assert client.read(MiB, 4096).data() == b"n" * 4096


def test_a_write_is_seen_by_the_next_short_read(inprocess_server, disk):
    backend = CountingFile(disk)
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client, NbdClient.connect(port) as other:
        client.handshake("disk")
        other.handshake("disk")
        assert client.read(8192, 4096).ok
        assert other.write(8192 + 100, b"w" * 300).ok
        assert client.read(8192, 4096).data() == (
            pattern(8192, 100) + b"w" * 300 + pattern(8192 + 400, 3696))
    assert backend.served >= 1


def test_uncached_data_is_read_by_the_general_path(inprocess_server, disk):
    backend = CountingFile(disk, refuse=True)
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client:
        client.handshake("disk")
        for offset in (0, 4096, MiB + 3):
            assert client.read(offset, 4096).data() == pattern(offset, 4096)


def test_reads_with_flags_or_past_the_end_get_the_general_answers(warm):
    backend, client = warm
    df = client.read(4096, 4096, flags=CmdFlag.DF)
    assert df.ok
    assert df.data() == pattern(4096, 4096)
    assert client.read(SIZE - 2048, 4096).error == NbdErrno.EINVAL
    assert client.read(0, 4096, flags=0x4000).error == NbdErrno.EINVAL
    assert backend.served == 0
    assert client.read(4096, 4096).data() == pattern(4096, 4096)  # still in step


def test_a_file_cut_short_under_the_short_path_fails_the_read(warm, disk):
    _, client = warm
    os.truncate(disk, MiB)
    assert client.read(MiB - 2048, 4096).error == NbdErrno.EIO  # never zeroes
    assert client.read(0, 4096).data() == pattern(0, 4096)
