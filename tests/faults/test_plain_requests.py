"""The short path of the commonest requests: a flagless READ of data the backend knows
is allocated and cached (under 64 KiB read into a buffer, larger ones sent from the
file's mapping), a flagless WRITE under 64 KiB whose payload is already in the receive
buffer, and a flagless WRITE of 64 KiB or more (its payload taken as it streams in,
spliced), skip the general path and must answer exactly as it would.

Anything the short path is not sure of (a hole, a range never looked up, a page not in
the page cache, a punched range, a request with flags, a payload still on its way, a
failing write) goes the general way.

A BLOCK_STATUS without flags but REQ_ONE, inside the export, takes a short path too: its
reply must be the general path's, byte for byte.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_sparse_image, wait_until
from nbdclient import NbdClient, ServerClosed, pattern

from nbdcore.backends import Fault, FaultInjection, SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd, CmdFlag, NbdErrno, ReplyType
from nbdcore.protocol.transmission import Extent
from nbdcore.stats import ConnectionStats

MiB = 1 << 20
SIZE = 4 * MiB
HOLE_AT = 3 * MiB  # [HOLE_AT, SIZE) is a hole


class CountingFile(SparseFile):
    """A SparseFile that counts the reads and writes the engine's short path asked of
    it, or refuses all the reads."""

    def __init__(self, path: Path, *, refuse: bool = False) -> None:
        super().__init__(path)
        self.refuse = refuse
        self.served = 0  # reads
        # reads of 64 KiB or more, from the mapping or (on a lone connection) with sendfile
        self.served_large = 0
        self.written = 0
        self.written_large = 0  # payload pieces of large WRITEs on the short path
        self.looked_up = 0  # extent lookups of BLOCK_STATUS on the short path

    def read_resident(self, offset: int, length: int) -> bytearray | None:
        if self.refuse:  # as if no page were in the page cache
            return None
        return self._count(super().read_resident(offset, length))

    def resident_view(self, offset: int, length: int) -> memoryview | None:
        if self.refuse:
            return None
        view = super().resident_view(offset, length)
        if view is not None and sys._getframe(1).f_code.co_name == "_plain":
            self.served_large += 1
        return view

    def resident(self, offset: int, length: int) -> bool:
        if self.refuse:
            return False
        found = super().resident(offset, length)
        if found and sys._getframe(1).f_code.co_name == "_plain_sendfile":
            self.served_large += 1
        return found

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """The general path reads this way too; with simple replies, so does the short."""
        if self.refuse:
            return None
        return self._count(super().pread_nowait(offset, length))

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        super().pwrite(data, offset)
        if sys._getframe(1).f_code.co_name == "_plain":
            self.written += 1
        self._count_large_write()

    def splice_in(self, pipe: int, offset: int, count: int) -> None:
        super().splice_in(pipe, offset, count)
        self._count_large_write()

    def _count_large_write(self) -> None:
        # Through _take_write_payload, and for spliced pieces _splice_payload too.
        caller, callers_caller = sys._getframe(3), sys._getframe(4)
        if "_plain_large_write" in (caller.f_code.co_name, callers_caller.f_code.co_name):
            self.written_large += 1

    def extents(self, offset: int, length: int, limit: int = 0) -> list[Extent]:
        if sys._getframe(1).f_code.co_name == "_plain_status":
            self.looked_up += 1
        return super().extents(offset, length, limit)

    def _count(self, data: bytes | bytearray | None) -> bytes | bytearray | None:
        if data is not None and sys._getframe(2).f_code.co_name == "_plain":
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


def test_a_batch_sharing_one_start_time_is_counted_per_request():
    stats = ConnectionStats()
    stats.record_latency(40_000, 16)  # 16 requests of one receive, 40 us each
    stats.record_latency(3_000)
    assert sum(stats.latency) == 17
    assert stats.latency[3] == 16  # 32..63 us
    assert stats.latency[0] == 1  # under 8 us
    assert stats.latency_sum_us == 16 * 40 + 3


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


# ------------------------------------------------------------------ large reads

LARGE = 256 * 1024


def test_large_reads_of_known_data_are_one_chunk_with_done(warm):
    backend, client = warm
    offsets = [0, 12345, MiB, HOLE_AT - LARGE]
    for offset in offsets:
        reply = client.read(offset, LARGE)
        (chunk,) = reply.chunks
        assert chunk.type == ReplyType.OFFSET_DATA
        assert chunk.done
        assert chunk.data_offset == offset
        assert reply.data() == pattern(offset, LARGE)
    assert backend.served_large == len(offsets)


def test_large_reads_count_like_the_general_path(inprocess_server, disk):
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        for offset in range(0, 8 * LARGE, LARGE):
            assert client.read(offset, LARGE).ok  # the first one learns the run
        (info,) = server.connections()
        assert backend.served_large == 7
        assert info.stats.ops[Cmd.READ] == 8
        assert info.stats.bytes_read == 8 * LARGE
        assert wait_until(lambda: sum(info.stats.latency) == 8)


def test_pipelined_large_and_small_reads_and_writes_keep_their_order(warm):
    backend, client = warm
    for cookie in range(0, 120, 3):
        offset = (cookie % 11) * LARGE
        client.send(Cmd.READ, offset, LARGE, cookie=cookie)
        client.send(Cmd.WRITE, offset + 100, 4096, cookie=cookie + 1,
                    payload=bytes([cookie]) * 4096)
        client.send(Cmd.READ, offset, LARGE, cookie=cookie + 2)
    for cookie in range(0, 120, 3):
        offset = (cookie % 11) * LARGE
        first = client.wait(cookie).data()
        assert client.wait(cookie + 1).ok
        second = client.wait(cookie + 2).data()
        assert second[100:4196] == bytes([cookie]) * 4096
        assert first[:100] == second[:100] == pattern(offset, 100)
    assert backend.served_large == 80


def test_large_reads_touching_a_hole_still_send_the_hole(warm):
    backend, client = warm
    across = client.read(HOLE_AT - LARGE // 2, LARGE)
    assert [c.type for c in across.chunks][:2] == [ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE]
    assert across.data() == pattern(HOLE_AT - LARGE // 2, LARGE // 2) + bytes(LARGE // 2)
    inside = client.read(HOLE_AT + LARGE, LARGE)
    assert [c.type for c in inside.chunks] == [ReplyType.OFFSET_HOLE]
    assert backend.served_large == 0


def test_large_reads_of_uncached_data_go_the_general_way(inprocess_server, disk):
    backend = CountingFile(disk, refuse=True)
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client:
        client.handshake("disk")
        for offset in (0, MiB + 3):
            assert client.read(offset, LARGE).data() == pattern(offset, LARGE)
    assert backend.served_large == 0


@pytest.mark.parametrize("option", ["simple", "sendfile", "df"])
def test_large_reads_the_short_path_leaves_alone(inprocess_server, disk, option):
    """Simple replies read through a buffer (a failing disk still gets an error reply),
    sendfile is what the server was asked for, DF wants one chunk holes included."""
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]),
                              use_sendfile=option == "sendfile")
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=option != "simple")
        flags = CmdFlag.DF if option == "df" else 0
        for offset in (0, LARGE, HOLE_AT - LARGE // 2):
            reply = client.read(offset, LARGE, flags=flags)
            assert reply.data() == pattern(offset, min(LARGE, HOLE_AT - offset)).ljust(
                LARGE, b"\0")
    assert backend.served_large == 0


def test_a_file_cut_short_under_large_short_reads_never_reads_as_success(warm, disk):
    """Pages past the new end are gone, so the short path leaves the read to the general
    one (EIO), unless cachestat still counts them (seen here while they were dirty): then
    the chunk already carried DONE and the failed send can only end the connection, as
    on the general path (tests/faults/test_read_paths.py). Never a good reply."""
    _, client = warm
    assert client.read(MiB - LARGE, LARGE).ok
    os.truncate(disk, MiB)
    try:
        reply = client.read(MiB - LARGE // 2, LARGE)
    except (ServerClosed, ConnectionError):
        return
    assert reply.error == NbdErrno.EIO
    assert client.read(MiB - LARGE, LARGE).data() == pattern(MiB - LARGE, LARGE)


# ------------------------------------------------------------------ writes


def test_small_writes_take_the_short_path_and_count(inprocess_server, disk):
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        for i in range(32):
            assert client.write(i * 5000, bytes([i]) * 3000).ok
        (info,) = server.connections()
        assert backend.written == 32
        assert info.stats.ops[Cmd.WRITE] == 32
        assert info.stats.bytes_written == 32 * 3000
        for i in range(32):
            assert client.read(i * 5000, 3000).data() == bytes([i]) * 3000
    with open(disk, "rb") as f:
        f.seek(31 * 5000)
        assert f.read(3000) == bytes([31]) * 3000


def test_pipelined_writes_and_reads_keep_their_order(warm):
    backend, client = warm
    for cookie in range(200):
        offset = (cookie % 10) * 4096
        client.send(Cmd.WRITE, offset, 4096, cookie=2 * cookie, payload=bytes([cookie]) * 4096)
        client.send(Cmd.READ, offset, 4096, cookie=2 * cookie + 1)
    for cookie in range(200):
        assert client.wait(2 * cookie).ok
        assert client.wait(2 * cookie + 1).data() == bytes([cookie]) * 4096
    # A payload split across two receives goes the general way; the rest are short.
    assert 0 < backend.written <= 200
    assert backend.served == 200


def test_a_payload_still_on_its_way_goes_the_general_way(warm):
    _, client = warm
    header = struct.pack(">IHHQQI", 0x25609513, 0, Cmd.WRITE, 5, 8192, 4096)
    client.track(5, Cmd.WRITE, 8192, 4096)
    client.send_raw(header + b"a" * 1000)
    time.sleep(0.2)  # the engine takes the header and the first part on their own
    client.send_raw(b"b" * 3096)
    assert client.wait(5).ok
    assert client.read(8192, 4096).data() == b"a" * 1000 + b"b" * 3096


def test_fua_writes_go_the_general_way(warm):
    backend, client = warm
    assert client.write(0, b"f" * 4096, flags=CmdFlag.FUA).ok
    assert client.read(0, 4096).data() == b"f" * 4096
    assert backend.written == 0


def test_a_failing_write_gets_the_general_paths_error(inprocess_server, disk):
    backend = FaultInjection(SparseFile(disk), [Fault("write", offset=MiB, length=4096)])
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client:
        client.handshake("disk")
        assert client.write(MiB - 100, b"x" * 200).error == NbdErrno.EIO
        assert client.write(0, b"y" * 200).ok
        assert client.read(0, 200).data() == b"y" * 200


def test_large_writes_take_the_short_path_and_count(inprocess_server, disk):
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        for i in range(8):  # 64 KiB (at the edge) to over 2 MiB, larger than one receive
            assert client.write(i * 256 * 1024, bytes([i + 1]) * (64 * 1024 + i * 300_000)).ok
        (info,) = server.connections()
        assert backend.written_large >= 8
        assert backend.written == 0  # none went the small writes' way
        assert info.stats.ops[Cmd.WRITE] == 8
        assert info.stats.bytes_written == sum(64 * 1024 + i * 300_000 for i in range(8))
        assert client.read(7 * 256 * 1024, 64 * 1024 + 7 * 300_000).data() == (
            bytes([8]) * (64 * 1024 + 7 * 300_000))
        assert client.read(0, 64 * 1024).data() == bytes([1]) * (64 * 1024)


def test_pipelined_large_writes_and_reads_keep_their_order(inprocess_server, disk):
    """Each READ sees the WRITE sent just before it, though neither waited for the other:
    large reads from the mapping copy the data when they are sent. (sendfile, the lone
    connection's way, lets the data leave the page cache only when the client receives
    it, so a later WRITE still in flight may show in it, as the protocol allows:
    see test_a_lone_sendfile_read_is_ordered_against_completed_writes.)"""
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]), sendfile_alone=False)
    size = 256 * 1024
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        assert client.read(0, 512).ok
        for cookie in range(24):
            offset = (cookie % 4) * size
            client.send(Cmd.WRITE, offset, size, cookie=2 * cookie,
                        payload=bytes([cookie]) * size)
            client.send(Cmd.READ, offset, size, cookie=2 * cookie + 1)
        for cookie in range(24):
            assert client.wait(2 * cookie).ok
            assert client.wait(2 * cookie + 1).data() == bytes([cookie]) * size
    assert backend.written_large >= 24
    assert backend.served_large == 24


def test_a_lone_sendfile_read_is_ordered_against_completed_writes(warm):
    """On the lone connection large reads go out with sendfile, and a READ sent after a
    WRITE was answered sees all of it, however the write came in (spliced or copied)."""
    backend, client = warm
    for round_ in range(1, 9):
        size = 64 * 1024 * round_
        offset = (round_ % 2) * MiB
        assert client.write(offset, bytes([round_]) * size).ok
        assert client.read(offset, size).data() == bytes([round_]) * size
    assert backend.served_large == 8


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_failing_disk_under_a_large_write_answers_as_the_general_path(
        inprocess_server, disk, structured):
    backend = FaultInjection(SparseFile(disk), [Fault("write", offset=MiB, length=4096)])
    port = serve(inprocess_server, backend)
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=structured)
        reply = client.write(MiB - 128 * 1024, b"x" * (512 * 1024))
        assert reply.error == NbdErrno.EIO
        if structured:  # the error chunk says where the write failed
            assert [chunk.type for chunk in reply.errors] == [ReplyType.ERROR_OFFSET]
        assert client.write(0, b"y" * (128 * 1024)).ok  # the payload was consumed: in step
        assert client.read(0, 128 * 1024).data() == b"y" * (128 * 1024)


def test_large_writes_with_flags_go_the_general_way(warm):
    backend, client = warm
    assert client.write(0, b"f" * (256 * 1024), flags=CmdFlag.FUA).ok
    assert client.read(0, 256 * 1024).data() == b"f" * (256 * 1024)
    assert backend.written_large == 0


def test_writes_to_a_read_only_export_are_refused(inprocess_server, disk):
    registry = ExportRegistry([Export("disk", CountingFile(disk), read_only=True)])
    port = int(inprocess_server(registry).port)
    with NbdClient.connect(port) as client:
        client.handshake("disk")
        assert client.write(0, b"z" * 512).error == NbdErrno.EPERM
        assert client.write(0, b"z" * (256 * 1024)).error == NbdErrno.EPERM
        assert client.read(0, 512).data() == pattern(0, 512)


# ------------------------------------------------------------------ block status

DATA, HOLE = 0, 3  # base:allocation flags of data and of a hole that reads as zeroes


@pytest.mark.parametrize("flags", [0, CmdFlag.REQ_ONE], ids=["all", "req-one"])
def test_block_status_takes_the_short_path_and_counts(inprocess_server, disk, flags):
    backend = CountingFile(disk)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    expected = [[(HOLE_AT - 4096, DATA), (SIZE - HOLE_AT, HOLE)], [(MiB, HOLE)]]
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk")
        asked = [(4096, SIZE - 4096), (HOLE_AT, MiB)]
        for (offset, length), want in zip(asked, expected, strict=True):
            reply = client.block_status(offset, length, flags=flags)
            (chunk,) = reply.chunks
            assert chunk.done
            assert chunk.extents == (want[:1] if flags else want)
        (info,) = server.connections()
        assert backend.looked_up == 2
        assert info.stats.ops[Cmd.BLOCK_STATUS] == 2
        assert wait_until(lambda: sum(info.stats.latency) == 2)


def test_pipelined_block_status_and_reads_keep_their_order(warm):
    backend, client = warm
    cookies = []
    for i in range(40):
        offset = (i * 65536) % SIZE
        if i % 2:
            cookies.append((client.send(Cmd.BLOCK_STATUS, offset, SIZE - offset,
                                        flags=CmdFlag.REQ_ONE), offset))
        else:
            cookies.append((client.send(Cmd.READ, offset, 4096), offset))
    for cookie, offset in cookies:
        reply = client.wait(cookie)
        assert reply.ok
        if reply.chunks[0].type == ReplyType.BLOCK_STATUS:
            assert reply.chunks[0].extents == (
                [(HOLE_AT - offset, DATA)] if offset < HOLE_AT else [(SIZE - offset, HOLE)])
        else:
            expected = pattern(offset, 4096) if offset < HOLE_AT else bytes(4096)
            assert reply.data() == expected
    assert backend.looked_up == 20


def test_block_status_with_other_flags_or_past_the_end_gets_the_general_answers(warm):
    backend, client = warm
    assert client.block_status(SIZE - 2048, 4096).error == NbdErrno.EINVAL
    assert client.block_status(0, 0).error == NbdErrno.EINVAL
    assert client.block_status(0, 4096, flags=0x4000).error == NbdErrno.EINVAL
    fua = client.block_status(0, 4096, flags=CmdFlag.FUA)  # valid, but not for the short path
    assert fua.chunks[0].extents == [(4096, DATA)]
    assert backend.looked_up == 0
    assert client.block_status(0, 4096).chunks[0].extents == [(4096, DATA)]  # still in step
    assert backend.looked_up == 1
