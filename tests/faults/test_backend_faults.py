"""A failing disk gives an error reply for that request only (robustness notes, last line).

Backends are wrapped in ``FaultInjection`` and served in-process; the failures are seen
through our own client (every chunk visible) and through python3-libnbd (what a real
client makes of them).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import nbdsh_json
from nbdclient import NbdClient, Reply, pattern, run_libnbd

from nbdcore.backends import Fault, FaultInjection, MemoryBackend, SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd, CmdFlag, NbdErrno, ReplyType
from nbdcore.server import ERROR_PROBE

SIZE = 4 * 1024 * 1024
EXPORT = "disk"


def memory_backend(tmp_path: Path) -> MemoryBackend:
    backend = MemoryBackend(SIZE)
    backend.pwrite(pattern(0, SIZE), 0)  # all data: a read never skips the backend as a hole
    return backend


def file_backend(tmp_path: Path) -> SparseFile:
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    return SparseFile(path)


BACKENDS = {"memory": memory_backend, "file": file_backend}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest) -> Callable[[Path], object]:
    return BACKENDS[request.param]


@pytest.fixture
def serve_faults(inprocess_server, tmp_path, make_backend):
    """``serve_faults([Fault(...)])`` -> port of a server whose export injects the faults."""

    def start(faults: list[Fault]) -> int:
        backend = FaultInjection(make_backend(tmp_path), faults)
        server = inprocess_server(ExportRegistry([Export(EXPORT, backend)]))
        return int(server.port)

    return start


def uri(port: int) -> str:
    return f"nbd://127.0.0.1:{port}/{EXPORT}"


def assert_good_read(client: NbdClient, offset: int, length: int) -> None:
    reply = client.read(offset, length)
    assert reply.ok, reply.chunks
    assert reply.data() == pattern(offset, length)


def check_partial_read(reply: Reply, fault_at: int) -> int:
    """Data chunks for [offset, X), then one ERROR_OFFSET (EIO, DONE) at or just before
    the fault; returns the error offset."""
    *content, last = reply.chunks
    assert last.type == ReplyType.ERROR_OFFSET, reply.chunks
    assert last.done
    assert last.error == NbdErrno.EIO
    assert last.message
    assert all(c.type == ReplyType.OFFSET_DATA and not c.done for c in content), reply.chunks
    position = reply.offset
    for chunk in content:  # contiguous from the request offset, and the right bytes
        assert chunk.data_offset == position
        assert chunk.data == pattern(position, len(chunk.data))
        position += len(chunk.data)
    assert position <= fault_at, "data was sent for a byte the backend could not read"
    error_offset = last.error_offset
    assert error_offset is not None
    assert reply.offset <= error_offset < reply.offset + reply.length
    # The engine finds the first failing byte to ERROR_PROBE precision and reports it
    # right after the good data it sent.
    assert position <= error_offset <= fault_at
    assert fault_at - error_offset < ERROR_PROBE
    return error_offset


# ------------------------------------------------------------------ READ


@pytest.mark.parametrize(
    ("offset", "length", "fault_at"),
    [
        (0, 128 * 1024, 100_000),  # inside the first copy piece
        (64 * 1024, 1024 * 1024, 700_001),  # several pieces of good data first
        (8192, 4096, 8192),  # the very first byte fails: no data at all
    ],
)
def test_structured_read_across_fault(serve_faults, offset, length, fault_at):
    port = serve_faults([Fault("read", fault_at, 512, errno.EIO)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT)
        reply = client.read(offset, length)
        check_partial_read(reply, fault_at)
        # Only that request failed: the connection carries on.
        assert_good_read(client, 0, min(fault_at, 65536))
        assert_good_read(client, fault_at + 512, 4096)
        assert client.write(0, b"still writable").ok
        client.disconnect()
        assert client.server_closed()


def test_structured_read_across_fault_libnbd(serve_faults):
    fault_at = 300_000
    port = serve_faults([Fault("read", fault_at, 4096, errno.EIO)])
    result = nbdsh_json(
        uri(port),
        """
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append([status, offset, len(subbuf), err.value])
    return 0
try:
    h.pread_structured(512 * 1024, 0, chunk)
    failed = None
except nbd.Error as exc:
    failed = exc.errno
after = h.pread(65536, 1024 * 1024)
import hashlib
print(json.dumps({"chunks": chunks, "failed": failed,
                  "after": hashlib.sha256(after).hexdigest()}))
""",
    )
    assert result["failed"] == "EIO"  # python-libnbd names the errno
    data = [c for c in result["chunks"] if c[0] == 1]  # READ_DATA
    errors = [c for c in result["chunks"] if c[0] == 3]  # READ_ERROR
    assert data, "the good part before the fault was not delivered"
    assert [c[0] for c in result["chunks"]] == [1] * len(data) + [3], result["chunks"]
    position = 0
    for _, offset, count, _ in data:
        assert offset == position
        position += count
    assert position <= fault_at
    ((_, error_offset, _, error_value),) = errors
    assert error_value == errno.EIO
    assert position <= error_offset <= fault_at
    assert fault_at - error_offset < ERROR_PROBE
    # The next read on the same handle succeeded with the right bytes.
    assert result["after"] == hashlib.sha256(pattern(1024 * 1024, 65536)).hexdigest()


def test_simple_read_of_faulty_range(serve_faults):
    port = serve_faults([Fault("read", 10_000, 100, errno.EIO)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT, structured=False)
        reply = client.read(0, 65536)
        (chunk,) = reply.chunks
        assert chunk.kind == "simple"
        assert chunk.error == NbdErrno.EIO
        assert chunk.data == b""
        # No data followed the error header: the next reply parses and is correct.
        assert_good_read(client, 20_000, 65536)
        cookies = [client.send(Cmd.READ, 0, 20_000), client.send(Cmd.READ, 30_000, 1000)]
        first, second = (client.wait(c) for c in cookies)
        assert first.error == NbdErrno.EIO
        assert second.ok
        assert second.data() == pattern(30_000, 1000)


def test_simple_read_of_faulty_range_libnbd(serve_faults):
    port = serve_faults([Fault("read", 10_000, 100, errno.EIO)])
    out = run_libnbd(
        uri(port),
        before_connect="h.set_request_structured_replies(False)",
        script="""
assert not h.get_structured_replies_negotiated()
try:
    h.pread(65536, 0)
    failed = None
except nbd.Error as exc:
    failed = exc.errno
good = h.pread(4096, 20_000)
print(json.dumps({"failed": failed, "good": good.hex()}))
""",
    )
    result = json.loads(out)
    assert result["failed"] == "EIO"
    assert bytes.fromhex(result["good"]) == pattern(20_000, 4096)


def test_read_outside_fault_is_untouched(serve_faults):
    port = serve_faults([Fault("read", 1024 * 1024, 4096, errno.EIO)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT)
        assert_good_read(client, 0, 1024 * 1024)  # ends right before the fault
        assert_good_read(client, 1024 * 1024 + 4096, 1024 * 1024)


# ------------------------------------------------------------------ WRITE


@pytest.mark.parametrize(
    ("host_errno", "nbd_errno"),
    [(errno.ENOSPC, NbdErrno.ENOSPC), (errno.EIO, NbdErrno.EIO), (errno.EDQUOT, NbdErrno.ENOSPC)],
)
@pytest.mark.parametrize("structured", [True, False])
def test_write_fault(serve_faults, host_errno, nbd_errno, structured):
    port = serve_faults([Fault("write", 2 * 1024 * 1024, 4096, host_errno)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT, structured=structured)
        reply = client.write(2 * 1024 * 1024 - 1000, b"x" * 8192)
        assert reply.error == nbd_errno, reply.chunks
        (chunk,) = reply.chunks
        assert chunk.done
        if structured:
            assert chunk.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET)
            if chunk.type == ReplyType.ERROR_OFFSET:
                assert reply.offset <= chunk.error_offset < reply.offset + 8192
        else:
            assert chunk.kind == "simple"
        # Writes elsewhere still work and read back.
        assert client.write(0, b"fine" * 1024).ok
        reply = client.read(0, 4096)
        assert reply.ok
        assert reply.data() == b"fine" * 1024


@pytest.mark.parametrize(("host_errno", "expected"), [(errno.ENOSPC, "ENOSPC"), (errno.EIO, "EIO")])
def test_write_fault_libnbd(serve_faults, host_errno, expected):
    port = serve_faults([Fault("write", 65536, 1, host_errno)])
    result = nbdsh_json(
        uri(port),
        """
try:
    h.pwrite(b"y" * 131072, 0)
    failed = None
except nbd.Error as exc:
    failed = exc.errno
h.pwrite(b"z" * 4096, 1024 * 1024)
print(json.dumps({"failed": failed, "back": h.pread(4096, 1024 * 1024) == b"z" * 4096}))
""",
    )
    assert result["failed"] == expected
    assert result["back"] is True


# ------------------------------------------------------------------ FLUSH / FUA


def test_sync_fault_fails_flush_and_fua(serve_faults):
    port = serve_faults([Fault("sync", errno=errno.EIO)])
    for structured in (True, False):
        with NbdClient.connect(port) as client:
            client.handshake(EXPORT, structured=structured)
            assert client.flush().error == NbdErrno.EIO
            assert client.write(0, b"fua", flags=CmdFlag.FUA).error == NbdErrno.EIO
            assert client.write_zeroes(8192, 4096, flags=CmdFlag.FUA).error == NbdErrno.EIO
            assert client.trim(65536, 65536, flags=CmdFlag.FUA).error == NbdErrno.EIO
            # Without FUA nothing waits for the disk, so nothing fails.
            assert client.write(4096, b"plain").ok
            assert client.write_zeroes(16384, 4096).ok
            reply = client.read(4096, 5)
            assert reply.ok
            assert reply.data() == b"plain"
            assert client.flush().error == NbdErrno.EIO  # and it keeps failing, per request


def test_sync_fault_libnbd(serve_faults):
    port = serve_faults([Fault("sync", errno=errno.EIO)])
    result = nbdsh_json(
        uri(port),
        """
out = {}
for name, call in [("flush", lambda: h.flush()),
                   ("fua", lambda: h.pwrite(b"a" * 512, 0, nbd.CMD_FLAG_FUA)),
                   ("plain", lambda: h.pwrite(b"b" * 512, 512))]:
    try:
        call()
        out[name] = 0
    except nbd.Error as exc:
        out[name] = exc.errno
print(json.dumps(out))
""",
    )
    assert result == {"flush": "EIO", "fua": "EIO", "plain": 0}


# ------------------------------------------------------------------ truncated image


TRUNCATED_AT = 600 * 1024 + 100  # not block aligned on purpose


@pytest.fixture
def truncated_image(inprocess_server, tmp_path):
    """A file-backed export whose file loses its tail after the server opened it."""
    path = tmp_path / "shrinking.raw"
    path.write_bytes(pattern(0, 1024 * 1024))
    backend = SparseFile(path)
    server = inprocess_server(ExportRegistry([Export(EXPORT, backend)]))
    os.truncate(path, TRUNCATED_AT)
    assert backend.size == 1024 * 1024  # the export still claims its old size
    return int(server.port)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (512 * 1024, 512 * 1024),  # good data, then the missing tail (sendfile path)
        (TRUNCATED_AT, 4096),  # only missing bytes, small read (copy path)
        (TRUNCATED_AT - 1000, 2000),  # straddling, small
        (0, 1024 * 1024),  # the whole export
    ],
)
def test_truncated_image_read_fails_with_error_offset(truncated_image, offset, length):
    with NbdClient.connect(truncated_image) as client:
        client.handshake(EXPORT)
        reply = client.read(offset, length)
        assert not reply.ok, "missing bytes were answered as if they existed"
        errors = reply.errors
        assert len(errors) == 1
        (error,) = errors
        assert error.type == ReplyType.ERROR_OFFSET
        assert error.error == NbdErrno.EIO
        assert reply.chunks[-1] is error
        assert error.done
        assert error.error_offset is not None
        assert offset <= error.error_offset <= TRUNCATED_AT
        assert TRUNCATED_AT - error.error_offset < ERROR_PROBE
        # Whatever data came before the failure is the file's real content.
        for chunk in reply.chunks[:-1]:
            assert chunk.type == ReplyType.OFFSET_DATA
            assert chunk.data_offset is not None
            real = min(len(chunk.data), max(0, TRUNCATED_AT - chunk.data_offset))
            assert chunk.data[:real] == pattern(chunk.data_offset, real)
        # The intact part still reads fine afterwards.
        assert_good_read(client, 0, 65536)


def test_truncated_image_libnbd(truncated_image):
    result = nbdsh_json(
        uri(truncated_image),
        """
out = {}
for name, (count, offset) in {"tail": (65536, 960 * 1024), "small": (512, 1024 * 1024 - 512),
                              "across": (256 * 1024, 512 * 1024)}.items():
    try:
        h.pread(count, offset)
        out[name] = 0
    except nbd.Error as exc:
        out[name] = exc.errno
out["good"] = h.pread(4096, 4096).hex()
print(json.dumps(out))
""",
    )
    assert result.pop("good") == pattern(4096, 4096).hex()
    assert result == {"tail": "EIO", "small": "EIO", "across": "EIO"}


@pytest.mark.parametrize("length", [4096, 256 * 1024])
def test_truncated_image_simple_read_never_returns_zeroes(truncated_image, length):
    """Without structured replies there are two honest answers: an EIO reply without data,
    or (once a success header has gone out) a hard disconnect before the data is complete.
    What must never happen is a complete, successful reply."""
    with NbdClient.connect(truncated_image) as client:
        client.handshake(EXPORT, structured=False)
        cookie = client.send(Cmd.READ, 1024 * 1024 - length, length)
        try:
            reply = client.wait(cookie)
        except ConnectionError:
            return  # closed in the middle of the data: the client cannot take it as good
        assert reply.error == NbdErrno.EIO
        assert reply.chunks[0].data == b""
        assert_good_read(client, 0, 4096)


def test_write_fault_mid_payload_keeps_stream_in_sync(serve_faults):
    """The backend fails in the middle of a 4 MiB payload: the rest is still drained, so the
    request behind it is parsed as a request and not as payload."""
    port = serve_faults([Fault("write", 1024 * 1024 + 10, 1, errno.EIO)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT)
        write = client.send(Cmd.WRITE, 0, payload=b"\x5a" * (3 * 1024 * 1024))
        read = client.send(Cmd.READ, 3 * 1024 * 1024, 65536)
        assert client.wait(write).error == NbdErrno.EIO
        reply = client.wait(read)
        assert reply.ok
        assert reply.data() == pattern(3 * 1024 * 1024, 65536)


@pytest.mark.parametrize(
    ("fault", "cmd", "flags", "expected"),
    [
        (Fault("zero", errno=errno.ENOSPC), Cmd.WRITE_ZEROES, 0, NbdErrno.ENOSPC),
        (Fault("zero", errno=errno.EIO), Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, NbdErrno.EIO),
        # ENOTSUP is only an answer to FAST_ZERO; otherwise a client must not see it.
        (Fault("zero", errno=errno.ENOTSUP), Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, NbdErrno.ENOTSUP),
        (Fault("zero", errno=errno.ENOTSUP), Cmd.WRITE_ZEROES, 0, NbdErrno.EINVAL),
        (Fault("trim", errno=errno.EIO), Cmd.TRIM, 0, NbdErrno.EIO),
        (Fault("write", errno=errno.EROFS), Cmd.WRITE, 0, NbdErrno.EPERM),
    ],
    ids=["zero_enospc", "zero_eio", "fast_zero_enotsup", "zero_enotsup", "trim", "erofs"],
)
def test_other_backend_errors_map_to_nbd_errnos(serve_faults, fault, cmd, flags, expected):
    port = serve_faults([fault])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT)
        payload = b"p" * 4096 if cmd == Cmd.WRITE else b""
        reply = client.request(cmd, 65536, 4096, flags=flags, payload=payload)
        assert reply.error == expected, reply.chunks
        assert_good_read(client, 65536, 4096)


def test_extent_lookup_failure_is_reported_as_data(serve_faults):
    """Status 0 ("data") is always a safe answer; reads do not depend on extents."""
    port = serve_faults([Fault("extents", errno=errno.EIO)])
    with NbdClient.connect(port) as client:
        client.handshake(EXPORT)
        reply = client.block_status(4096, 1024 * 1024)
        assert reply.ok, reply.chunks
        (chunk,) = reply.chunks
        assert chunk.extents == [(1024 * 1024, 0)]
        one = client.block_status(4096, 1024 * 1024, flags=CmdFlag.REQ_ONE)  # qemu's form
        assert one.chunks[0].extents == [(1024 * 1024, 0)]
        assert_good_read(client, 4096, 1024 * 1024)
