"""nbdcore.client, the appliance's own NBD client, against the engine: the handshake with
and without TLS, commands, errors, and the allocated-only copy that moves images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import file_extents
from nbdclient import pattern
from tlsutil import client_ssl_context, make_test_pki

from nbdcore.backends import MemoryBackend, SparseFile
from nbdcore.client import (
    NbdClient,
    NbdClientError,
    NbdCommandError,
    copy_allocated,
    digest_allocated,
    digest_file,
)
from nbdcore.exports import Export, ExportRegistry
from nbdcore.tls import TlsSettings, server_context

from .helpers import MiB

SIZE = 64 * MiB
ISLANDS = {0: pattern(1, MiB), 10 * MiB + 4096: pattern(2, 3 * MiB), SIZE - 8192: pattern(3, 8192)}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "source.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, data in ISLANDS.items():
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def server(inprocess_server, image):
    registry = ExportRegistry([
        Export("disk", SparseFile(str(image), read_only=True), read_only=True),
        Export("scratch", MemoryBackend(8 * MiB)),
    ])
    return inprocess_server(registry)


def test_read_write_flush_zero_round_trip(server) -> None:
    with NbdClient.connect("127.0.0.1", server.port, "scratch") as client:
        assert client.size == 8 * MiB
        assert not client.read_only
        client.pwrite(pattern(5, 2 * MiB), MiB)
        client.flush()
        assert client.pread(2 * MiB, MiB) == pattern(5, 2 * MiB)
        client.write_zeroes(MiB, 4096)
        assert client.pread(4096, MiB) == bytes(4096)
        # a piece that is a hole comes back as zeroes
        assert client.pread(4096, 6 * MiB) == bytes(4096)


def test_block_status_follows_the_files_holes(server, image) -> None:
    with NbdClient.connect("127.0.0.1", server.port, "disk") as client:
        assert client.read_only
        data = [(e.offset, e.length) for e in client.extents() if not e.zero]
        expected = [(o, n) for o, n, is_data in file_extents(image) if is_data]
        assert data == expected
        assert sum(e.length for e in client.extents()) == SIZE


def test_copy_allocated_moves_only_data_and_keeps_holes(server, image, tmp_path) -> None:
    target = tmp_path / "copy.raw"
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        with NbdClient.connect("127.0.0.1", server.port, "disk") as client:
            result = copy_allocated(client, fd)
    finally:
        os.close(fd)
    assert target.read_bytes() == image.read_bytes()
    assert result.data_bytes == sum(len(d) for d in ISLANDS.values())
    assert result.hole_bytes == SIZE - result.data_bytes
    assert file_extents(target) == file_extents(image)  # the copy is as sparse
    with NbdClient.connect("127.0.0.1", server.port, "disk") as client:
        assert digest_allocated(client) == result
    fd = os.open(target, os.O_RDONLY)
    try:
        assert digest_file(fd, result.extents) == result.sha256
    finally:
        os.close(fd)


def test_errors_are_exceptions_with_the_servers_words(server) -> None:
    with pytest.raises(NbdClientError, match="ERR_UNKNOWN"):
        NbdClient.connect("127.0.0.1", server.port, "nope")
    with NbdClient.connect("127.0.0.1", server.port, "disk") as client:
        with pytest.raises(NbdCommandError) as failure:
            client.pwrite(b"x" * 512, 0)  # read-only export
        assert failure.value.errno == 1  # EPERM
        assert client.pread(512, 0) == pattern(1, MiB)[:512]  # the connection goes on


def test_connects_over_tls(inprocess_server, image, tmp_path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    registry = ExportRegistry([Export("disk", SparseFile(str(image), read_only=True),
                                      read_only=True, tls="required")])
    server = inprocess_server(registry, tls_context=server_context(
        TlsSettings.from_directory(pki.server_dir)))
    context = client_ssl_context(pki.client("alice"))
    with NbdClient.connect("127.0.0.1", server.port, "disk", tls=context) as client:
        assert client.pread(4096, 10 * MiB + 4096) == pattern(2, 3 * MiB)[:4096]
        (info,) = server.connections()
        assert info.tls_names == ("alice",)
    with pytest.raises(NbdClientError, match="ERR_TLS_REQD"):
        NbdClient.connect("127.0.0.1", server.port, "disk")
