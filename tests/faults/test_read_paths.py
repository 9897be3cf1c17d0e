"""Every way a READ of a file can be answered, healthy and with the file cut short.

Reads take different paths by size (small: one pread; 64 KiB+: the connection's buffer;
512 KiB..1 MiB: read in the pool; larger: streamed in pieces) and by server option
(``use_sendfile``), each with simple and structured replies. Data must always be the
file's, and a missing tail must never come back as a successful read.
"""

from __future__ import annotations

import os

import pytest
from nbdclient import NbdClient, ServerClosed, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import NbdErrno, ReplyType

MiB = 1 << 20
SIZE = 8 * MiB
CUT_AT = 5 * MiB + 1000  # where the file ends after truncation
LENGTHS = [4096, 256 * 1024, 768 * 1024, MiB, 3 * MiB]


@pytest.fixture(params=[False, True], ids=["buffered", "sendfile"])
def file_server(request, inprocess_server, tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    server = inprocess_server(ExportRegistry([Export("disk", SparseFile(path))]),
                              use_sendfile=request.param)
    return path, int(server.port)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("length", LENGTHS)
def test_healthy_file_reads_back_exactly(file_server, structured, length):
    _, port = file_server
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=structured)
        for offset in (0, 4 * MiB + 512, SIZE - length):
            reply = client.read(offset, length)
            assert reply.ok
            assert reply.data() == pattern(offset, length)


@pytest.mark.parametrize("length", LENGTHS[1:])
def test_cut_file_structured_read_reports_where_data_ends(file_server, length):
    path, port = file_server
    os.truncate(path, CUT_AT)
    offset = CUT_AT - length // 2  # half real data, half missing
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=True)
        reply = client.read(offset, length)
        assert not reply.ok
        (error,) = reply.errors
        assert error.type == ReplyType.ERROR_OFFSET
        assert error.error == NbdErrno.EIO
        assert offset <= error.error_offset <= CUT_AT
        for chunk in reply.chunks:
            if chunk.type == ReplyType.OFFSET_DATA:
                real = max(0, min(len(chunk.data), CUT_AT - chunk.data_offset))
                assert chunk.data[:real] == pattern(chunk.data_offset, real)
                # bytes past the cut may only be the padding of a chunk already announced,
                # and then an error chunk at or before them says they are not data
                assert error.error_offset <= chunk.data_offset + real
        assert client.read(0, 4096).data() == pattern(0, 4096)


@pytest.mark.parametrize("length", LENGTHS[1:])
def test_cut_file_simple_read_is_never_a_success(file_server, length):
    path, port = file_server
    os.truncate(path, CUT_AT)
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=False)
        cookie = client.send(0, CUT_AT - length // 2, length)  # NBD_CMD_READ
        try:
            reply = client.wait(cookie)
        except (ServerClosed, ConnectionError):
            return  # cut off mid-data: a client cannot take that as good
        assert reply.error == NbdErrno.EIO
