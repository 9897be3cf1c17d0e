"""Large WRITE payloads are spliced from the socket into the image file through a pipe
(one kernel copy instead of two). The bytes must land exactly where a buffered write
would put them, the replies must be the same, and anything that goes wrong (a failing
disk, a client gone in the middle of a payload, a pipe the kernel keeps small) must end
as it does on the buffered path: an error reply with the stream still in step, or a
closed connection and a server that goes on serving.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from conftest import make_sparse_image, wait_until
from nbdclient import NbdClient, pattern

from nbdcore import server as engine
from nbdcore.backends import Fault, FaultInjection, SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd, CmdFlag, NbdErrno

MiB = 1 << 20
SIZE = 16 * MiB
REQUEST_MAGIC = 0x25609513


class SplicingFile(SparseFile):
    """A SparseFile that counts what reached it through ``splice_in``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.spliced = 0

    def splice_in(self, pipe: int, offset: int, count: int) -> None:
        super().splice_in(pipe, offset, count)
        self.spliced += count


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_sparse_image(tmp_path / "disk.raw", SIZE)


def connect(inprocess_server, backend, **options) -> tuple[object, NbdClient]:
    server = inprocess_server(ExportRegistry([Export("disk", backend)]), **options)
    client = NbdClient.connect(int(server.port))
    client.handshake("disk")
    return server, client


def write_header_first(client: NbdClient, cookie: int, offset: int, data: bytes,
                       flags: int = 0) -> None:
    """A WRITE whose header arrives on its own, so that the whole payload is still in
    the socket when the engine reads the header: it is spliced, not copied."""
    client.track(cookie, Cmd.WRITE, offset, len(data))
    client.send_raw(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, Cmd.WRITE, cookie, offset,
                                len(data)))
    time.sleep(0.1)
    client.send_raw(data)


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_a_large_payload_is_spliced_into_the_file(inprocess_server, disk):
    backend = SplicingFile(disk)
    server, client = connect(inprocess_server, backend)
    with client:
        data = pattern(12345, MiB)
        write_header_first(client, 7, 3 * MiB + 5, data)
        assert client.wait(7).ok
        assert backend.spliced == MiB
        assert client.read(3 * MiB + 5, MiB).data() == data
        (info,) = server.connections()
        assert info.stats.ops[Cmd.WRITE] == 1
        assert info.stats.bytes_written == MiB
    assert file_bytes(disk, 3 * MiB + 5, MiB) == data


def test_pipelined_large_writes_are_all_spliced_and_answered_in_order(inprocess_server, disk):
    backend = SplicingFile(disk)
    _, client = connect(inprocess_server, backend)
    sizes = [256 * 1024, MiB, 300_001, 65536, 2 * MiB]
    with client:
        write_header_first(client, 1, 0, pattern(0, MiB))
        offset, writes = MiB, []
        for cookie, size in enumerate(sizes * 3, start=100):
            # After a spliced payload the engine takes one header at a time, so every
            # following large payload is spliced too.
            client.send(Cmd.WRITE, offset, size, cookie=cookie, payload=pattern(offset, size))
            writes.append((cookie, offset, size))
            offset = (offset + size) % (SIZE - 2 * MiB)
        for cookie, _, _ in writes:
            assert client.wait(cookie).ok
        assert client.wait(1).ok
        assert backend.spliced == MiB + sum(sizes) * 3
        for _, at, size in writes[-len(sizes):]:  # the last round is what the file holds
            assert client.read(at, size).data() == pattern(at, size)


def test_small_requests_between_spliced_writes_keep_their_order(inprocess_server, disk):
    backend = SplicingFile(disk)
    _, client = connect(inprocess_server, backend)
    with client:
        write_header_first(client, 1, 0, bytes([1]) * MiB)
        for i in range(40):
            at = (i % 8) * 512 * 1024
            big = bytes([i]) * (384 * 1024)
            client.send(Cmd.WRITE, at, len(big), cookie=100 + 10 * i, payload=big)
            client.send(Cmd.READ, at, 4096, cookie=100 + 10 * i + 1)
            client.send(Cmd.WRITE, at, 100, cookie=100 + 10 * i + 2, payload=b"s" * 100)
            client.send(Cmd.READ, at + 50, 100, cookie=100 + 10 * i + 3)
        assert client.wait(1).ok
        for i in range(40):
            assert client.wait(100 + 10 * i).ok
            assert client.wait(100 + 10 * i + 1).data() == bytes([i]) * 4096
            assert client.wait(100 + 10 * i + 2).ok
            assert client.wait(100 + 10 * i + 3).data() == b"s" * 50 + bytes([i]) * 50
        # Small requests are received with what follows them, so how much of the later
        # payloads is spliced depends on timing; the first one always is.
        assert backend.spliced >= MiB


def test_a_failing_disk_under_a_spliced_write_answers_eio_and_stays_in_step(
        inprocess_server, disk):
    inner = SplicingFile(disk)
    backend = FaultInjection(inner, [Fault("write", offset=5 * MiB, length=4096)])
    _, client = connect(inprocess_server, backend)
    with client:
        write_header_first(client, 1, 4 * MiB, b"e" * (2 * MiB))  # crosses the fault
        assert client.wait(1).error == NbdErrno.EIO
        # The rest of the failed payload was consumed, not taken for requests.
        write_header_first(client, 2, 8 * MiB, b"g" * MiB)
        assert client.wait(2).ok
        assert client.read(8 * MiB, MiB).data() == b"g" * MiB
        assert client.write(0, b"after" * 10).ok
        assert client.read(0, 50).data() == b"after" * 10
    assert inner.spliced >= MiB


def test_a_spliced_write_with_fua_is_synced_before_its_reply(inprocess_server, disk):
    backend = SplicingFile(disk)
    _, client = connect(inprocess_server, backend)
    with client:
        write_header_first(client, 3, MiB, b"f" * MiB, flags=CmdFlag.FUA)
        assert client.wait(3).ok
        assert backend.spliced == MiB
    assert file_bytes(disk, MiB, MiB) == b"f" * MiB


def test_a_read_only_export_refuses_a_large_write_without_splicing(inprocess_server, disk):
    backend = SplicingFile(disk)
    registry = ExportRegistry([Export("disk", backend, read_only=True)])
    client = NbdClient.connect(int(inprocess_server(registry).port))
    with client:
        client.handshake("disk")
        write_header_first(client, 4, 0, b"r" * MiB)
        assert client.wait(4).error == NbdErrno.EPERM
        assert client.read(0, 4096).data() == bytes(4096)  # still in step
    assert backend.spliced == 0
    assert file_bytes(disk, 0, MiB) == bytes(MiB)


def test_a_client_gone_in_the_middle_of_a_payload_closes_only_its_connection(
        inprocess_server, disk):
    backend = SplicingFile(disk)
    server, client = connect(inprocess_server, backend)
    with client:
        client.send_raw(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 9, 0, 2 * MiB))
        time.sleep(0.1)
        client.send_raw(b"x" * (300 * 1024))
    assert wait_until(lambda: not server.connections())
    with NbdClient.connect(int(server.port)) as other:
        other.handshake("disk")
        assert other.write(MiB, b"y" * 4096).ok
        assert other.read(MiB, 4096).data() == b"y" * 4096


def test_without_splicing_or_with_a_small_pipe_payloads_are_copied(
        inprocess_server, disk, monkeypatch):
    backend = SplicingFile(disk)
    _, client = connect(inprocess_server, backend, use_splice=False)
    with client:
        write_header_first(client, 1, 0, b"n" * MiB)
        assert client.wait(1).ok
        assert client.read(0, MiB).data() == b"n" * MiB
    # A pipe the kernel keeps small (the user's pipe quota is spent) is not worth it.
    monkeypatch.setattr(engine, "PIPE_SIZE", 64 * 1024)
    _, client = connect(inprocess_server, backend)
    with client:
        write_header_first(client, 2, MiB, b"m" * MiB)
        assert client.wait(2).ok
        assert client.read(MiB, MiB).data() == b"m" * MiB
    assert backend.spliced == 0


def open_pipes() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:  # closed since the listing
            pass
    return count


def test_the_pipe_is_closed_with_its_connection(inprocess_server, disk):
    backend = SplicingFile(disk)
    server, client = connect(inprocess_server, backend)
    before = open_pipes()
    with client:
        write_header_first(client, 1, 0, b"p" * MiB)
        assert client.wait(1).ok
        assert open_pipes() == before + 2  # made on the first spliced payload
    assert wait_until(lambda: not server.connections())
    assert wait_until(lambda: open_pipes() == before)
