"""Acknowledged writes are in the image: FUA and FLUSH replies come after the data is stored.

A ``kill -9`` of the server loses everything the process kept to itself (buffers, queued
work) but not the kernel's page cache, which survives a process kill. So reading the
image file after the kill proves that every acknowledged write had reached the *file*
before its reply (or before the FLUSH reply) was sent; it does not prove the fdatasync,
which only a power cut could. The fdatasync itself is checked in-process below: the FUA
and FLUSH replies must not arrive before the backend's sync has returned.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_sparse_image, nbdsh_json, require_libnbd_python
from nbdclient import LIBNBD_PYTHON, NbdClient, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import CmdFlag

MiB = 1024 * 1024
SIZE = 8 * MiB

# What the client writes. Data is described as (offset, seed, length) and produced on both
# sides with ``pattern(seed, length)`` (shipping megabytes through argv would not fit).
FUA_WRITE = (0, 0, 300_000)
PLAIN_WRITES = [(1 * MiB, 7, 2 * MiB), (3 * MiB + 123, 200, 70_000)]
OTHER_CONNECTION_WRITE = (5 * MiB, 99, 64 * 1024)
ZEROED = (1 * MiB + 4096, 128 * 1024)  # zeroed with FUA inside a plain write

CLIENT = f"""
import sys, nbd
def pattern(offset, length):
    start = offset % 251
    return (bytes(range(251)) * ((start + length) // 251 + 1))[start:start + length]
uri = sys.argv[1]
h = nbd.NBD()
h.connect_uri(uri)
h2 = nbd.NBD()
h2.connect_uri(uri)
assert h.can_fua() and h.can_flush() and h.can_multi_conn()
offset, seed, length = {FUA_WRITE!r}
h.pwrite(pattern(seed, length), offset, nbd.CMD_FLAG_FUA)
for offset, seed, length in {PLAIN_WRITES!r}:
    h.pwrite(pattern(seed, length), offset)
h.flush()
# multi-conn: a write acknowledged on one connection is covered by a FLUSH on another
offset, seed, length = {OTHER_CONNECTION_WRITE!r}
h2.pwrite(pattern(seed, length), offset)
h.flush()
h.zero({ZEROED[1]}, {ZEROED[0]}, nbd.CMD_FLAG_FUA)
print("acknowledged", flush=True)
sys.stdin.readline()  # keep both connections open until the server is dead
"""

WRITES = [FUA_WRITE, *PLAIN_WRITES, OTHER_CONNECTION_WRITE]


def expected_image() -> bytearray:
    image = bytearray(SIZE)
    for offset, seed, length in WRITES:
        image[offset : offset + length] = pattern(seed, length)
    offset, length = ZEROED
    image[offset : offset + length] = bytes(length)
    return image


def test_acknowledged_writes_survive_kill9(serve, tmp_path: Path) -> None:
    require_libnbd_python()
    image = make_sparse_image(tmp_path / "disk.raw", SIZE)
    server = serve(image)
    client = subprocess.Popen(
        [LIBNBD_PYTHON, "-c", CLIENT, server.uri()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.strip() == "acknowledged", client.stderr.read() if client.stderr else ""
        # Every reply is in; the client still holds its connections. Now pull the plug on
        # the process (not the machine: see the module docstring).
        server.kill9()
        assert server.proc.returncode == -9
    finally:
        client.kill()
        client.wait(10)

    expected = expected_image()
    assert image.stat().st_size == SIZE
    content = image.read_bytes()
    for offset, _, length in WRITES:
        assert content[offset : offset + length] == expected[offset : offset + length], offset
    assert content[ZEROED[0] : ZEROED[0] + ZEROED[1]] == bytes(ZEROED[1])
    assert content == bytes(expected)

    # A new server on the same file serves exactly that through NBD.
    again = serve(image)
    result = nbdsh_json(
        again.uri(),
        f"""
import hashlib
print(json.dumps({{"size": h.get_size(),
                  "sha": hashlib.sha256(h.pread({SIZE}, 0)).hexdigest()}}))
""",
    )
    assert result == {"size": SIZE, "sha": hashlib.sha256(expected).hexdigest()}


# ---------------------------------------------------------------- in-process: sync before reply


class SyncRecorder:
    """Delegates to a real backend and logs writes and syncs in the order they finished.

    ``sync`` is slowed down so that a reply sent before the sync completed could not be
    missed by the test.
    """

    SYNC_DELAY = 0.2

    def __init__(self, inner: SparseFile) -> None:
        self.inner = inner
        self.size = inner.size
        self.caps = inner.caps
        self.events: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def _log(self, what: str, offset: int = 0) -> None:
        with self._lock:
            self.events.append((what, offset))

    def snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.events)

    def pwrite(self, data: Any, offset: int) -> None:
        self.inner.pwrite(data, offset)
        self._log("write", offset)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        self.inner.zero(offset, length, may_trim=may_trim, fast=fast)
        self._log("zero", offset)

    def sync(self) -> None:
        self._log("sync-start")
        time.sleep(self.SYNC_DELAY)
        self.inner.sync()
        self._log("synced")

    def __getattr__(self, name: str) -> Any:  # read_fd, pread, trim, cache, extents, close
        return getattr(self.inner, name)


@pytest.fixture
def recorder(inprocess_server, tmp_path):
    backend = SyncRecorder(SparseFile(make_sparse_image(tmp_path / "d.raw", SIZE)))
    server = inprocess_server(ExportRegistry([Export("d", backend)]))
    return backend, int(server.port)


def test_fua_write_replies_after_sync(recorder) -> None:
    backend, port = recorder
    with NbdClient.connect(port) as client:
        client.handshake("d")
        started = time.monotonic()
        assert client.write(65536, b"durable", flags=CmdFlag.FUA).ok
        elapsed = time.monotonic() - started
        assert backend.snapshot() == [("write", 65536), ("sync-start", 0), ("synced", 0)]
        assert elapsed >= SyncRecorder.SYNC_DELAY * 0.9

        assert client.write_zeroes(0, 4096, flags=CmdFlag.FUA | CmdFlag.NO_HOLE).ok
        assert backend.snapshot()[3:] == [("zero", 0), ("sync-start", 0), ("synced", 0)]


def test_flush_replies_after_sync_of_earlier_writes(recorder) -> None:
    backend, port = recorder
    with NbdClient.connect(port) as first, NbdClient.connect(port) as second:
        first.handshake("d")
        second.handshake("d")
        assert first.write(0, b"a" * 4096).ok
        assert second.write(4096, b"b" * 4096).ok
        # Plain writes are acknowledged without waiting for the disk.
        assert backend.snapshot() == [("write", 0), ("write", 4096)]
        assert first.flush().ok  # must cover the write acknowledged on the other connection
        assert backend.snapshot()[2:] == [("sync-start", 0), ("synced", 0)]
    assert (Path(backend.inner.path).read_bytes()[:8192]) == b"a" * 4096 + b"b" * 4096
