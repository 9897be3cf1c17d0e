"""Every way a READ of a file can be answered, healthy and with the file cut short.

Reads take different paths by size (small: one pread; 64 KiB+: a view of the file's
mapping for structured replies, or sendfile while the connection is the server's only
one, else the connection's buffer; 512 KiB..1 MiB unmapped: read in the pool; larger:
streamed in pieces), by backend option (``map_reads``) and by server option
(``use_sendfile``, ``sendfile_alone``), each with simple and structured replies. Data
must always be the file's, and a missing tail must never come back as a successful read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nbdclient import NbdClient, ServerClosed, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import NbdErrno, ReplyType

MiB = 1 << 20
SIZE = 8 * MiB
CUT_AT = 5 * MiB + 1000  # where the file ends after truncation
LENGTHS = [4096, 256 * 1024, 768 * 1024, MiB, 3 * MiB]


@pytest.fixture(params=["mapped", "buffered", "sendfile", "alone"])
def file_server(request, inprocess_server, tmp_path):
    """``alone``: the default server, whose lone connection sends resident large reads
    with sendfile; ``mapped`` sends them from the mapping whatever the connections."""
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    backend = SparseFile(path, map_reads=request.param in ("mapped", "alone"))
    server = inprocess_server(ExportRegistry([Export("disk", backend)]),
                              use_sendfile=request.param == "sendfile",
                              sendfile_alone=request.param == "alone")
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


@pytest.mark.parametrize("length", LENGTHS[1:])
def test_file_cut_under_a_live_mapping(file_server, length):
    """The engine mapped the file while it was whole; then it was cut short under it.

    Whatever path the read takes, it must never come back as a success: an error reply,
    or (when the pages were found resident, so the data chunk already carried DONE) the
    end of the connection. The exact error chunk of the EFAULT path is checked below."""
    path, port = file_server
    offset = CUT_AT - length // 2
    with NbdClient.connect(port) as client:
        client.handshake("disk", structured=True)
        assert client.read(offset, length).data() == pattern(offset, length)
        os.truncate(path, CUT_AT)
        try:
            reply = client.read(offset, length)
        except (ServerClosed, ConnectionError):
            return
        assert not reply.ok
        assert reply.error == NbdErrno.EIO


@pytest.mark.parametrize("length", LENGTHS[1:])
def test_efault_while_sending_from_the_mapping(tmp_path, inprocess_server, length):
    """Without cachestat the engine cannot know the pages are resident and sends from
    the mapping with a separate DONE chunk. Cut the file under it: the pages past the end
    can no longer be read (EFAULT in the send), and the reply must still end with an
    error at or before the first missing page, the connection going on."""
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    backend = SparseFile(path)
    backend._can_cachestat = False  # as on kernels before 6.5
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    offset = CUT_AT - length // 2
    page_after_cut = -(-CUT_AT // 4096) * 4096  # bytes up to here read as zeroes, no fault
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        assert client.read(offset, length).data() == pattern(offset, length)
        os.truncate(path, CUT_AT)
        reply = client.read(offset, length)
        assert not reply.ok
        (error,) = reply.errors
        assert error.error == NbdErrno.EIO
        assert offset <= error.error_offset <= page_after_cut
        for chunk in reply.chunks:
            if chunk.type == ReplyType.OFFSET_DATA:
                good = max(0, min(len(chunk.data), error.error_offset - chunk.data_offset,
                                  CUT_AT - chunk.data_offset))
                assert chunk.data[:good] == pattern(chunk.data_offset, good)
        assert reply.chunks[-1].flags & 1  # DONE ends the reply
        assert client.read(0, length).data() == pattern(0, length)


def test_mapped_reads_release_their_pages(tmp_path, inprocess_server, monkeypatch):
    """Reading a whole image through the mapping must not leave it all resident in the
    engine: the mapping's pages are dropped once more than MAP_RESIDENT_BYTES of distinct
    data was handed out (16 MiB here, against an image four times that)."""
    from nbdcore.backends import sparse_file

    monkeypatch.setattr(sparse_file, "MAP_RESIDENT_BYTES", 16 * MiB)
    path = tmp_path / "big.raw"
    size = 64 * MiB
    path.write_bytes(pattern(0, size))
    backend = SparseFile(path)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]), sendfile_alone=False)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        for offset in range(0, size, MiB):
            assert client.read(offset, MiB).ok
    chunk = 1 << sparse_file.MAP_CHUNK_SHIFT
    assert _resident_kib(path) * 1024 <= 16 * MiB + chunk


def test_a_working_set_within_the_bound_stays_mapped(tmp_path, inprocess_server,
                                                     monkeypatch):
    """Re-reading data within MAP_RESIDENT_BYTES neither faults it in again nor drops
    it: it stays mapped (and counted in the engine's resident size) between reads."""
    from nbdcore.backends import sparse_file

    monkeypatch.setattr(sparse_file, "MAP_RESIDENT_BYTES", 16 * MiB)
    path = tmp_path / "hot.raw"
    path.write_bytes(pattern(0, 12 * MiB))
    server = inprocess_server(ExportRegistry([Export("disk", SparseFile(path))]),
                              sendfile_alone=False)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        for _ in range(3):
            for offset in range(0, 12 * MiB, MiB):
                assert client.read(offset, MiB).data() == pattern(offset, MiB)
    assert _resident_kib(path) * 1024 >= 12 * MiB - MiB


def test_a_lone_connection_sends_large_reads_with_sendfile(tmp_path, inprocess_server,
                                                            monkeypatch):
    """While a connection is the server's only one, a large read of resident data goes
    out with sendfile as one DONE chunk; once a second client connects, the same read
    comes from the file's mapping. The data is the file's either way."""
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    server = inprocess_server(ExportRegistry([Export("disk", SparseFile(path))]))
    sent_with_sendfile: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd, in_fd, offset, count):
        sent_with_sendfile.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        assert client.read(0, MiB).data() == pattern(0, MiB)  # learns the data run
        sent_with_sendfile.clear()
        reply = client.read(MiB, MiB)
        assert reply.data() == pattern(MiB, MiB)
        assert sum(sent_with_sendfile) == MiB
        (chunk,) = reply.chunks
        assert chunk.type == ReplyType.OFFSET_DATA
        assert chunk.flags & 1  # DONE
        with NbdClient.connect(int(server.port)) as other:
            other.handshake("disk", structured=True)
            sent_with_sendfile.clear()
            assert client.read(2 * MiB, MiB).data() == pattern(2 * MiB, MiB)
            assert other.read(3 * MiB, MiB).data() == pattern(3 * MiB, MiB)
            assert sent_with_sendfile == []


def test_file_cut_after_the_residency_test_ends_a_lone_read(tmp_path, inprocess_server,
                                                            monkeypatch):
    """The file is cut between the residency test and sendfile (made certain here by a
    test that always says resident): the chunk header already said DONE, so the engine
    ends the connection rather than let the read pass as a success."""
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, SIZE))
    backend = SparseFile(path)
    monkeypatch.setattr(backend, "resident", lambda offset, length: True)
    monkeypatch.setattr(backend, "known_data", lambda offset, length: True)
    server = inprocess_server(ExportRegistry([Export("disk", backend)]))
    os.truncate(path, CUT_AT)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        with pytest.raises((ServerClosed, ConnectionError)):
            client.read(CUT_AT - MiB // 2, MiB)
    with NbdClient.connect(int(server.port)) as client:  # the engine goes on serving
        client.handshake("disk", structured=True)
        assert client.read(0, 4096).data() == pattern(0, 4096)


def _resident_kib(path) -> int:
    """Resident size of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            ours = fields[-1] == str(path)
        elif ours and fields[0] == "Rss:":
            total += int(fields[1])
    return total
