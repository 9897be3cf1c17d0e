"""Extended headers (protocol doc §7) over real sockets, with our own client.

No client installed here speaks them, so this is the only coverage of the 32-byte
request / reply path. Once negotiated, every reply must be an extended chunk echoing its
request's offset: success of a command without payload is NONE|DONE, errors are ERROR /
ERROR_OFFSET chunks, block status is BLOCK_STATUS_EXT.
"""

from __future__ import annotations

import pytest
from nbdclient import Chunk, NbdClient, Reply, pattern

from nbdcore.backends import SparseFile
from nbdcore.protocol import wire
from nbdcore.protocol.constants import (
    BASE_ALLOCATION,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    NbdErrno,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    State,
    TransmissionFlag,
)

from .helpers import MiB, connected, filled_memory, registry_of

SIZE = 8 * MiB
DATA = MiB  # the first MiB holds pattern(0, MiB), the rest is a hole
HOLE = int(State.HOLE | State.ZERO)


@pytest.fixture
def backend():
    return filled_memory(SIZE, data_bytes=DATA)


@pytest.fixture
def port(inprocess_server, backend) -> int:
    return int(inprocess_server(registry_of(disk=backend)).port)


@pytest.fixture
def client(port):
    with connected(port, extended=True) as c:
        yield c


def assert_extended(reply: Reply) -> None:
    """Every chunk is extended, echoes the request offset, and only the last is DONE."""
    assert reply.chunks
    for chunk in reply.chunks:
        assert chunk.kind == "extended", reply.chunks
        assert chunk.offset == reply.offset, chunk
    assert [c.done for c in reply.chunks] == [False] * (len(reply.chunks) - 1) + [True]


def assert_none_done(reply: Reply) -> None:
    assert_extended(reply)
    (chunk,) = reply.chunks
    assert chunk.type == ReplyType.NONE
    assert chunk.flags == ReplyFlag.DONE
    assert chunk.payload == b""


def assert_error(reply: Reply, errno: int) -> Chunk:
    assert_extended(reply)
    (chunk,) = reply.chunks
    assert chunk.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET), chunk
    assert chunk.error == errno, chunk
    assert chunk.message
    if chunk.type == ReplyType.ERROR_OFFSET:
        assert reply.offset <= chunk.error_offset < reply.offset + max(reply.length, 1)
    return chunk


# ------------------------------------------------------------------ negotiation


def test_negotiation(port):
    with NbdClient.connect(port) as c:
        c.read_greeting()
        c.send_client_flags()
        assert c.opt_extended_headers().type == Rep.ACK
        # Extended headers imply structured replies and cannot be downgraded.
        assert c.opt_structured_reply().type == Rep.ERR_EXT_HEADER_REQD
        assert c.opt_set_meta_context("disk", [BASE_ALLOCATION]) == {1: BASE_ALLOCATION}
        final, details = c.opt_go("disk")
        assert final.type == Rep.ACK
        assert details is not None
        assert details.size == SIZE
        assert details.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
        assert details.flags & TransmissionFlag.SEND_DF
        assert_none_done(c.flush())


def test_structured_reply_first_then_extended_headers(port):
    """Either order is accepted; the result is extended headers."""
    with NbdClient.connect(port) as c:
        c.read_greeting()
        c.send_client_flags()
        assert c.opt_structured_reply().type == Rep.ACK
        assert c.opt_extended_headers().type == Rep.ACK
        final, _ = c.opt_go("disk")
        assert final.type == Rep.ACK
        reply = c.read(0, 4096)
        assert_extended(reply)
        assert reply.data() == pattern(0, 4096)


def test_no_block_status_payload_flag_without_contexts(port):
    with NbdClient.connect(port) as c:
        details = c.handshake("disk", extended=True, meta_contexts=())
        assert not details.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
        assert_error(c.block_status(0, 4096), NbdErrno.EINVAL)  # nothing was selected


def test_export_name_after_extended_headers_closes(port):
    with NbdClient.connect(port) as c:
        c.read_greeting()
        c.send_client_flags()
        assert c.opt_extended_headers().type == Rep.ACK
        c.send_option(Opt.EXPORT_NAME, b"disk")
        assert c.read_until_closed(timeout=5) == b""


def test_compact_request_after_extended_headers_closes(client):
    assert client.read(0, 512).ok
    client.send_raw(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 512) + b"\0" * 4)
    assert client.read_until_closed(timeout=5) == b""


# ------------------------------------------------------------------ commands


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 4096), (12_345, 100_000), (DATA - 5000, 300_000), (2 * MiB, 64 * 1024), (0, 4 * MiB)],
)
def test_read(client, offset, length):
    reply = client.read(offset, length)
    assert_extended(reply)
    assert reply.ok
    expected = bytearray(length)
    if offset < DATA:
        good = min(length, DATA - offset)
        expected[:good] = pattern(offset, good)
    assert reply.data() == bytes(expected)
    for chunk in reply.chunks:
        assert chunk.type in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE)
        if chunk.type == ReplyType.OFFSET_HOLE:
            assert chunk.data_offset >= DATA  # holes only where nothing was written
    if offset + length > DATA:
        assert any(c.type == ReplyType.OFFSET_HOLE for c in reply.chunks)


def test_zero_length_read(client):
    assert_none_done(client.read(4096, 0))


def test_write_with_payload_len(client, backend):
    data = pattern(31, 100_000)
    reply = client.request(Cmd.WRITE, 3 * MiB + 7, flags=CmdFlag.PAYLOAD_LEN, payload=data)
    assert_none_done(reply)
    assert backend.pread(3 * MiB + 7, len(data)) == data
    back = client.read(3 * MiB + 7, len(data))
    assert_extended(back)
    assert back.data() == data
    assert_none_done(client.write(0, b"fua", flags=CmdFlag.FUA))


def test_write_without_payload_len_is_einval(client, backend):
    # Without PAYLOAD_LEN the length is an effect length and no payload follows, so the
    # READ right behind the header must be parsed as the next request.
    write = client.send(Cmd.WRITE, 0, 4096)
    read = client.send(Cmd.READ, 0, 4096)
    assert_error(client.wait(write), NbdErrno.EINVAL)
    reply = client.wait(read)
    assert_extended(reply)
    assert reply.data() == pattern(0, 4096)
    assert backend.pread(0, 4096) == pattern(0, 4096)


def test_block_status(client):
    for offset, length, expected in [
        (0, SIZE, [(DATA, 0), (SIZE - DATA, HOLE)]),
        (4096, 8192, [(8192, 0)]),
        (DATA - 100, 200, [(100, 0), (100, HOLE)]),
        (3 * MiB, MiB, [(MiB, HOLE)]),
    ]:
        reply = client.block_status(offset, length)
        assert_extended(reply)
        (chunk,) = reply.chunks
        assert chunk.type == ReplyType.BLOCK_STATUS_EXT
        assert chunk.context_id == 1
        assert chunk.declared_count == len(chunk.extents) == (len(chunk.payload) - 8) // 16
        assert chunk.extents == expected
        assert all(flags >> 32 == 0 for _, flags in chunk.extents)


def test_block_status_req_one(client):
    reply = client.block_status(DATA - 4096, 2 * MiB, flags=CmdFlag.REQ_ONE)
    assert_extended(reply)
    (chunk,) = reply.chunks
    assert chunk.declared_count == 1
    assert chunk.extents == [(4096, 0)]


def test_block_status_with_payload(client):
    payload = wire.U64.pack(2 * MiB) + wire.U32.pack(1)  # effect length, context id 1
    reply = client.request(Cmd.BLOCK_STATUS, 0, flags=CmdFlag.PAYLOAD_LEN, payload=payload)
    assert_extended(reply)
    (chunk,) = reply.chunks
    assert chunk.type == ReplyType.BLOCK_STATUS_EXT
    assert chunk.extents == [(DATA, 0), (MiB, HOLE)]
    # Unknown or repeated context ids: the payload is consumed, the answer is EINVAL.
    for ids in ([7], [1, 1]):
        bad = wire.U64.pack(MiB) + b"".join(wire.U32.pack(i) for i in ids)
        cookie = client.send(Cmd.BLOCK_STATUS, 0, flags=CmdFlag.PAYLOAD_LEN, payload=bad)
        follow = client.send(Cmd.READ, 0, 512)
        assert_error(client.wait(cookie), NbdErrno.EINVAL)
        assert client.wait(follow).data() == pattern(0, 512)


def test_flush_trim_write_zeroes(client, backend):
    assert_none_done(client.flush())
    assert_none_done(client.flush(flags=CmdFlag.FUA))
    assert_none_done(client.write_zeroes(4096, 8192))
    assert_none_done(client.write_zeroes(65536, 4096, flags=CmdFlag.NO_HOLE | CmdFlag.FUA))
    assert_none_done(client.write_zeroes(SIZE - 4096, 4096, flags=CmdFlag.FAST_ZERO))
    assert backend.pread(4096, 8192) == bytes(8192)
    assert backend.pread(65536, 4096) == bytes(4096)
    assert backend.pread(0, 4096) == pattern(0, 4096)
    assert_none_done(client.trim(DATA - 65536, 65536))
    assert_none_done(client.trim(0, 100))  # too small to punch: a no-op, still a success
    assert_none_done(client.request(Cmd.CACHE, 0, MiB))
    reply = client.read(0, 16384)
    assert_extended(reply)
    assert reply.data() == pattern(0, 4096) + bytes(8192) + pattern(12288, 4096)


# ------------------------------------------------------------------ errors


def test_errors_are_extended_error_chunks(client, backend):
    assert_error(client.read(SIZE - 10, 20), NbdErrno.EINVAL)
    assert_error(client.read((1 << 64) - 512, 1024), NbdErrno.EINVAL)
    assert_error(client.read(0, 1 << 33), NbdErrno.EINVAL)  # a 64-bit length, too big
    assert_error(client.write(SIZE - 10, b"x" * 4096), NbdErrno.ENOSPC)
    assert_error(client.write_zeroes(SIZE, 1 << 40), NbdErrno.ENOSPC)
    assert_error(client.trim(0, SIZE + 1), NbdErrno.EINVAL)
    assert_error(client.request(Cmd.FLUSH, 0, 1), NbdErrno.EINVAL)
    assert_error(client.request(42, 0, 0), NbdErrno.EINVAL)
    assert_error(client.read(0, 512, flags=0x80), NbdErrno.EINVAL)
    assert_error(client.block_status(0, 0), NbdErrno.EINVAL)
    # Commands that take no payload but carry one anyway: consumed, then EINVAL.
    for cmd in (Cmd.FLUSH, Cmd.READ, Cmd.TRIM, 42):
        cookie = client.send(cmd, 0, flags=CmdFlag.PAYLOAD_LEN, payload=b"\xff" * 1000)
        follow = client.send(Cmd.READ, 0, 512)
        assert_error(client.wait(cookie), NbdErrno.EINVAL)
        follow_reply = client.wait(follow)
        assert_extended(follow_reply)
        assert follow_reply.data() == pattern(0, 512)
    assert backend.pread(0, DATA) == pattern(0, DATA)  # nothing was written by any of it


def test_pipelined_cookies_are_echoed(client):
    cookies = {}
    for i in range(200):
        cookie = (0xFFFF_FFFF_0000_0000 | i) if i % 2 else i  # use all 64 bits
        offset = i * 4096
        cmd = (Cmd.READ, Cmd.BLOCK_STATUS, Cmd.FLUSH, Cmd.CACHE)[i % 4]
        length = 0 if cmd == Cmd.FLUSH else 4096
        client.send(cmd, 0 if cmd == Cmd.FLUSH else offset, length, cookie=cookie)
        cookies[cookie] = cmd
    replies = client.recv_replies()
    assert sorted(r.cookie for r in replies) == sorted(cookies)
    for reply in replies:
        assert_extended(reply)
        assert reply.ok
        if reply.cmd == Cmd.READ:
            assert reply.data() == pattern(reply.offset, 4096)


# ------------------------------------------------------------------ DF


@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize("length", [512, 64 * 1024, 300 * 1024, 2 * MiB])
def test_df_read_is_a_single_content_chunk(port, extended, length):
    """NBD_CMD_FLAG_DF: at most one content chunk (spec §5.4). The export is in memory,
    so the engine cannot use sendfile here; it may refuse with EOVERFLOW above 64 KiB, but
    must not split the data."""
    offset = DATA - length // 2  # data then hole: still one OFFSET_DATA with zeroes
    with connected(port, extended=extended) as c:
        reply = c.read(offset, length, flags=CmdFlag.DF)
        if not reply.ok:
            assert length > 64 * 1024, "DF reads up to 64 KiB must succeed"
            assert reply.error == NbdErrno.EOVERFLOW
            assert all(c.is_error or c.type == ReplyType.NONE for c in reply.chunks)
            return
        content = [c for c in reply.chunks if c.type in (1, 2)]
        assert len(content) == 1, reply.chunks
        assert content[0].type == ReplyType.OFFSET_DATA
        assert reply.data() == pattern(offset, length // 2) + bytes(length - length // 2)


# ------------------------------------------------------------------ beyond 32 bits


def test_effect_lengths_beyond_4_gib(inprocess_server, tmp_path):
    """TRIM, WRITE_ZEROES and BLOCK_STATUS take 64-bit lengths with extended headers."""
    size = 6 << 30
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(pattern(0, 8192))
        f.seek(5 << 30)
        f.write(pattern(5, 4096))
    backend = SparseFile(path)
    server = inprocess_server(registry_of(big=backend))
    with connected(server.port, "big", extended=True) as c:
        reply = c.block_status(8192, size - 8192)
        assert_extended(reply)
        (chunk,) = reply.chunks
        assert chunk.extents[0] == ((5 << 30) - 8192, HOLE)  # one extent longer than 2^32
        assert_none_done(c.write_zeroes(4096, 5 << 30))  # covers the island at 5 GiB
        assert_none_done(c.trim(0, 5 << 30))
        assert backend.pread(0, 4096) in (pattern(0, 4096), bytes(4096))  # TRIM is a hint
        assert backend.pread(4096, 4096) == bytes(4096)
        assert backend.pread(5 << 30, 4096) == bytes(4096)
        assert_error(c.write_zeroes(4096, size), NbdErrno.ENOSPC)
