"""What hostile and heavy clients do to the engine (shared/docs/robustness-notes.md).

Real sockets on 127.0.0.1 against an in-process server, so the tests can look at the
server's connections, threads and file descriptors directly. Most tests end by checking
that the server still serves a well-behaved client.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import threading
import time

import pytest
from conftest import engine_threads, require, wait_until
from nbdclient import NbdClient, OptionReply, pattern

from nbdcore.backends import SparseFile
from nbdcore.backends.memory import PAGE
from nbdcore.protocol import wire
from nbdcore.protocol.constants import (
    IHAVEOPT,
    REP_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    NbdErrno,
    Opt,
    Rep,
    ReplyType,
)

from .helpers import (
    MiB,
    Recorder,
    SlowSync,
    check_serves,
    connected,
    filled_memory,
    open_fds,
    registry_of,
    reset_close,
)

SIZE = 16 * MiB


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def disk():
    return filled_memory(SIZE)


@pytest.fixture
def server(inprocess_server, recorder, disk):
    """Export "disk" (pattern-filled memory) and "blank" (64 MiB, never written)."""
    registry = registry_of(disk=disk, blank=filled_memory(64 * MiB, data_bytes=0))
    return inprocess_server(registry, observer=recorder, handshake_timeout_s=30)


def all_closed(server) -> bool:
    return not server.connections()


def assert_no_crash(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    """No connection ended in the engine's catch-all, and nothing was logged as an error."""
    assert "internal error" not in recorder.close_reasons()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ------------------------------------------------------------------ vanishing clients


HANDSHAKE_CUTS = {
    "nothing": b"",
    "half_client_flags": b"\0\0",
    "half_option_header": wire.CLIENT_FLAGS.pack(3) + wire.OPTION_HEADER.pack(IHAVEOPT, 7, 40)[:9],
    "half_option_data": wire.CLIENT_FLAGS.pack(3)
    + wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 100)
    + b"\0" * 50,
    "after_an_option": wire.CLIENT_FLAGS.pack(3) + wire.OPTION_HEADER.pack(IHAVEOPT, 8, 0),
}


@pytest.mark.parametrize("cut", sorted(HANDSHAKE_CUTS))
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_disconnect_mid_handshake(server, recorder, caplog, cut, how):
    with connected(server.port) as other:  # a client already being served
        client = NbdClient.connect(server.port)
        client.read_greeting()
        client.send_raw(HANDSHAKE_CUTS[cut])
        time.sleep(0.05)
        if how == "rst":
            reset_close(client.sock)
        else:
            client.close()
        assert wait_until(lambda: len(server.connections()) == 1)
        reply = other.read(4096, 4096)
        assert reply.ok
        assert reply.data() == pattern(4096, 4096)
    check_serves(server.port)
    assert wait_until(lambda: all_closed(server))
    # The vanished client got its open and close notifications, and no handshake one.
    vanished = recorder.of("opened")[1]
    assert recorder.for_connection(vanished.id) == ["opened", "closed"]
    assert_no_crash(recorder, caplog)


def test_disconnect_mid_request_header(server, recorder, caplog):
    with connected(server.port) as other:
        client = connected(server.port)
        header = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 4096)
        client.send_raw(header[:13])
        time.sleep(0.05)
        client.close()
        assert wait_until(lambda: len(server.connections()) == 1)
        assert other.read(0, 4096).ok
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


def test_disconnect_mid_write_payload(server, recorder, caplog):
    """A WRITE claiming 32 MiB, 1 MiB of it sent, then gone: nothing past that MiB lands."""
    blank = server.registry.get("blank").backend
    with connected(server.port) as other:
        client = connected(server.port, "blank")
        client.send(Cmd.WRITE, 0, 32 * MiB)  # header only: the payload follows in pieces
        for _ in range(16):
            client.send_raw(b"\xab" * 65536)
        time.sleep(0.1)
        client.close()
        assert wait_until(lambda: len(server.connections()) == 1)
        assert other.read(0, 4096).ok
    # What arrived may or may not have been stored (the WRITE failed), but nothing else.
    beyond = [page for page in blank.pages if page >= MiB // PAGE]
    assert not beyond, f"pages {beyond[:5]} written beyond the bytes that arrived"
    assert set(blank.pread(0, MiB)) <= {0, 0xAB}
    assert blank.pread(MiB, 31 * MiB) == bytes(31 * MiB)
    assert_no_crash(recorder, caplog)
    assert wait_until(lambda: all_closed(server))


# ------------------------------------------------------------------ framing violations


def _request(magic: int, cmd: int = Cmd.READ, length: int = 4096) -> bytes:
    return wire.REQUEST.pack(magic, 0, cmd, 77, 0, length)


@pytest.mark.parametrize(
    "garbage",
    [
        _request(0xDEADBEEF),
        _request(0x25609514),  # nbd-server's log magic, one off the real one
        wire.EXTENDED_REQUEST.pack(0x21E41C71, 0, Cmd.READ, 77, 0, 4096),  # not negotiated
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["deadbeef", "near_miss", "extended_magic", "http"],
)
def test_bad_request_magic_closes_cleanly(server, recorder, caplog, garbage):
    with connected(server.port) as client:
        assert client.read(0, 512).data() == pattern(0, 512)
        client.send_raw(garbage + _request(REQUEST_MAGIC))
        # Closed, with no reply to the garbage or to the good request that followed it.
        assert client.read_until_closed(timeout=5) == b""
    assert wait_until(lambda: all_closed(server))
    assert any(r.startswith("protocol error") for r in recorder.close_reasons())
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


@pytest.mark.parametrize("claimed", [0xFFFFFFFF, 0x80000000, 64 * 1024 + 1])
def test_huge_option_is_refused_unread(server, recorder, caplog, claimed):
    client = NbdClient.connect(server.port)
    client.read_greeting()
    client.send_client_flags()
    started = time.monotonic()
    client.send_option(Opt.GO, b"", length=claimed)  # the header only; we never send the data
    # Closed at once (the handshake limit is 30 s here), without waiting for the payload.
    assert client.read_until_closed(timeout=5) == b""
    assert time.monotonic() - started < 2
    client.close()
    assert wait_until(lambda: all_closed(server))
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


def test_option_at_the_cap_is_still_answered(server):
    with NbdClient.connect(server.port) as client:
        client.read_greeting()
        client.send_client_flags()
        (reply,) = client.option(0x4242, b"\x5a" * 65536)  # unknown option, 64 KiB of data
        assert reply.type == Rep.ERR_UNSUP
        final, details = client.opt_go("disk")
        assert final.type == Rep.ACK
        assert details is not None
        assert details.size == SIZE


def _parse_option_replies(data: bytes) -> list[OptionReply]:
    replies = []
    while data:
        assert len(data) >= wire.OPTION_REPLY.size, f"truncated option reply {data!r}"
        magic, option, reply_type, length = wire.OPTION_REPLY.unpack_from(data)
        assert magic == REP_MAGIC, f"not an option reply: {data[:32]!r}"
        end = wire.OPTION_REPLY.size + length
        assert len(data) >= end, "truncated option reply payload"
        replies.append(OptionReply(option, reply_type, data[wire.OPTION_REPLY.size : end]))
        data = data[end:]
    return replies


def test_random_bytes_after_greeting(server, recorder, caplog):
    rng = random.Random(1234)
    for _ in range(60):
        with NbdClient.connect(server.port) as client:
            client.read_greeting()
            client.send_raw(rng.randbytes(rng.choice([1, 3, 4, 20, 100, 1000, 20_000])))
            client.sock.shutdown(socket.SHUT_WR)
            received = client.read_until_closed(timeout=5)
        # Whatever came back is well-formed option replies (most likely nothing at all).
        for reply in _parse_option_replies(received):
            assert reply.is_error
    assert wait_until(lambda: all_closed(server))
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


def test_fuzzed_options_get_errors(server, recorder, caplog):
    """Well-framed options with random numbers and payloads: an answer to each, in order."""
    rng = random.Random(99)
    choices = [o for o in range(0, 16) if o not in (Opt.EXPORT_NAME, Opt.GO, Opt.ABORT)]
    for _ in range(40):
        options = []
        stream = wire.CLIENT_FLAGS.pack(rng.choice([1, 3]))
        for _ in range(rng.randint(1, 12)):
            option = rng.choice([*choices, rng.getrandbits(32)])
            if option in (Opt.EXPORT_NAME, Opt.GO, Opt.ABORT):
                option = Opt.INFO
            data = rng.randbytes(rng.choice([0, 1, 4, 6, 9, 40, 300]))
            if rng.random() < 0.3:  # make length fields look plausible sometimes
                data = wire.U32.pack(rng.randint(0, 12)) + data
            options.append(option)
            stream += wire.OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data
        with NbdClient.connect(server.port) as client:
            client.read_greeting()
            client.send_raw(stream)
            client.sock.shutdown(socket.SHUT_WR)
            replies = _parse_option_replies(client.read_until_closed(timeout=5))
        # Every option got replies echoing it, the last one final (ACK or error).
        finals = [r for r in replies if r.is_final]
        assert [r.option for r in finals] == options
        for reply in replies:
            assert reply.type in set(Rep)
    assert wait_until(lambda: all_closed(server))
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


# ------------------------------------------------------------------ invalid requests

U64 = 1 << 64

# (command, offset, length, flags, expected errno), all sent on one connection.
INVALID = [
    (Cmd.READ, U64 - 512, 1024, 0, NbdErrno.EINVAL),  # offset + length wraps around 2^64
    (Cmd.READ, U64 - 1, 1, 0, NbdErrno.EINVAL),
    (Cmd.READ, SIZE - 100, 200, 0, NbdErrno.EINVAL),
    (Cmd.READ, SIZE + 1, 0, 0, NbdErrno.EINVAL),
    (Cmd.READ, 0, 33 * MiB, 0, NbdErrno.EINVAL),  # above the advertised maximum
    (Cmd.TRIM, 1 << 63, 0xFFFFFFFF, 0, NbdErrno.EINVAL),
    (Cmd.CACHE, U64 - 4096, 8192, 0, NbdErrno.EINVAL),
    (Cmd.WRITE_ZEROES, U64 - 4096, 8192, 0, NbdErrno.ENOSPC),
    (Cmd.WRITE_ZEROES, SIZE, 1, 0, NbdErrno.ENOSPC),
    (Cmd.BLOCK_STATUS, 0, 0, 0, NbdErrno.EINVAL),
    (Cmd.RESIZE, 1 << 30, 0, 0, NbdErrno.EINVAL),  # not advertised
    (9, 0, 4096, 0, NbdErrno.EINVAL),
    (0xFFFF, 0, 4096, 0, NbdErrno.EINVAL),
    (Cmd.READ, 0, 4096, 0x40, NbdErrno.EINVAL),  # unknown flag bits
    (Cmd.READ, 0, 4096, 0x8000, NbdErrno.EINVAL),
    (Cmd.READ, 0, 4096, CmdFlag.PAYLOAD_LEN, NbdErrno.EINVAL),  # extended-only flag
    (Cmd.READ, 0, 4096, CmdFlag.NO_HOLE, NbdErrno.EINVAL),  # flag on the wrong command
    (Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.REQ_ONE, NbdErrno.EINVAL),
    (Cmd.TRIM, 0, 4096, CmdFlag.DF, NbdErrno.EINVAL),
    (Cmd.FLUSH, 1, 0, 0, NbdErrno.EINVAL),
    (Cmd.FLUSH, 0, 4096, 0, NbdErrno.EINVAL),
    (Cmd.FLUSH, 0, 0, CmdFlag.NO_HOLE, NbdErrno.EINVAL),
]
# Zero lengths are legal; the engine answers them with success and does no I/O.
ZERO_LENGTH = [
    (Cmd.READ, 4096, 0, 0, 0),
    (Cmd.READ, SIZE, 0, 0, 0),
    (Cmd.TRIM, 0, 0, 0, 0),
    (Cmd.WRITE_ZEROES, 0, 0, 0, 0),
    (Cmd.CACHE, 0, 0, 0, 0),
]


@pytest.mark.parametrize("structured", [True, False])
def test_invalid_requests_get_errors_and_connection_stays_usable(
    server, disk, recorder, caplog, structured
):
    cases = INVALID + ZERO_LENGTH
    if not structured:  # DF needs structured replies: without them it was never advertised
        cases = [*cases, (Cmd.READ, 0, 512, CmdFlag.DF, NbdErrno.EINVAL)]
    with connected(server.port, structured=structured) as client:
        # One at a time, each followed by a good read ...
        for cmd, offset, length, flags, expected in cases:
            reply = client.request(cmd, offset, length, flags=flags)
            assert reply.error == expected, (cmd, offset, length, flags, reply.chunks)
            assert reply.chunks[-1].done
            if structured and cmd == Cmd.READ:
                assert all(c.kind == "structured" for c in reply.chunks), reply.chunks
            if cmd == Cmd.READ and length == 0:
                assert reply.data() == b""
            check = client.read(offset % SIZE & ~4095, 4096)
            assert check.ok, (cmd, offset, length, flags)
            assert check.data() == pattern(offset % SIZE & ~4095, 4096)
        # ... then all of them pipelined, interleaved with good reads.
        cookies = []
        for cmd, offset, length, flags, expected in cases:
            cookies.append((client.send(cmd, offset, length, flags=flags), expected))
            cookies.append((client.send(Cmd.READ, 8192, 100), 0))
        for cookie, expected in cookies:
            reply = client.wait(cookie)
            assert reply.error == expected
            if expected == 0 and reply.length:
                assert reply.data() == pattern(8192, 100)
    assert disk.pread(0, 16384) == pattern(0, 16384)  # the zero-length requests did nothing
    assert_no_crash(recorder, caplog)


def _fake_headers(size: int) -> bytes:
    """A payload made of valid READ headers: parsed as requests, it would earn replies
    for cookies the client never used."""
    header = wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 0xBAD_C00C1E, 0, 512)
    return (header * (size // len(header) + 1))[:size]


@pytest.mark.parametrize(
    ("export", "offset", "size", "flags", "expected"),
    [
        ("disk", SIZE - 100, 65536, 0, NbdErrno.ENOSPC),  # runs past the end
        ("disk", U64 - 10, 4096, 0, NbdErrno.ENOSPC),  # offset + length wraps
        ("disk", 0, 4096, 0x40, NbdErrno.EINVAL),  # unknown flag
        ("disk", 0, 4096, CmdFlag.REQ_ONE, NbdErrno.EINVAL),  # flag of another command
        ("disk", 0, 33 * MiB, 0, NbdErrno.EINVAL),  # beyond the maximum payload
        ("ro", 0, 70_000, 0, NbdErrno.EPERM),  # read-only export
    ],
    ids=["past_end", "wraps", "unknown_flag", "wrong_flag", "too_big", "read_only"],
)
def test_rejected_write_payload_is_drained(
    inprocess_server, recorder, caplog, export, offset, size, flags, expected
):
    disk = filled_memory(SIZE)
    read_only = filled_memory(SIZE)
    registry = registry_of(disk=disk, ro=(read_only, {"read_only": True}))
    server = inprocess_server(registry, observer=recorder)
    with connected(server.port, export) as client:
        write = client.send(Cmd.WRITE, offset, size, flags=flags, payload=_fake_headers(size))
        read = client.send(Cmd.READ, 4096, 4096)
        # Exactly two replies: the error, then the read that followed the payload.
        assert client.wait(write).error == expected
        reply = client.wait(read)
        assert reply.ok
        assert reply.data() == pattern(4096, 4096)
        assert client.flush().ok if export == "disk" else True
        client.disconnect()
        assert client.server_closed()
    assert disk.pread(0, SIZE) == pattern(0, SIZE)  # nothing of the payload was written
    assert read_only.pread(0, SIZE) == pattern(0, SIZE)
    assert_no_crash(recorder, caplog)


# ------------------------------------------------------------------ load


def test_connect_disconnect_cycles_leak_nothing(inprocess_server, recorder, caplog):
    server = inprocess_server(registry_of(disk=filled_memory(MiB)), observer=recorder)
    port = server.port

    def cycle(kind: int) -> None:
        if kind == 0:  # connect and go
            socket.create_connection(("127.0.0.1", port)).close()
        elif kind == 1:  # read the greeting, then reset
            client = NbdClient.connect(port)
            client.read_greeting()
            reset_close(client.sock)
        elif kind == 2:  # a whole session: read, DISC
            client = connected(port)
            assert client.read(0, 512).ok
            client.disconnect()
            assert client.server_closed()
            client.close()
        elif kind == 3:  # a FLUSH (goes through the pool and the eventfd), then vanish
            client = connected(port)
            assert client.flush().ok
            client.close()
        else:  # mid-option
            client = NbdClient.connect(port)
            client.read_greeting()
            client.send_client_flags()
            client.send_option(Opt.GO, b"\0\0")
            client.close()

    for kind in range(5):  # warm up: the pool's threads exist from here on
        cycle(kind)
    assert wait_until(lambda: all_closed(server))
    fds_before, threads_before = open_fds(), len(engine_threads())

    for i in range(2000):
        cycle(i % 5)

    assert wait_until(lambda: all_closed(server), timeout=10)
    assert wait_until(lambda: len(engine_threads()) <= threads_before, timeout=10), [
        t.name for t in engine_threads()
    ]
    assert wait_until(lambda: open_fds() <= fds_before + 2, timeout=10), (
        open_fds(),
        fds_before,
    )
    assert len(recorder.of("closed")) == len(recorder.of("opened")) == 2005
    assert_no_crash(recorder, caplog)
    check_serves(port, length=512)


def test_pipelined_reads_backpressure(server, recorder, caplog):
    """2,000 reads of 64 KiB (125 MiB of replies) sent while the replies go unread: the
    server stops taking requests once its queue and the socket buffers are full, and
    everything completes once the client reads."""
    count, size = 2000, 65536
    offsets = [(i * 7919 * 4096) % (SIZE - size) for i in range(count)]
    client = NbdClient.connect(server.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    client.handshake("disk")
    conn = server.connections()[0]
    sender = threading.Thread(
        target=lambda: [client.send(Cmd.READ, off, size, cookie=i) for i, off in enumerate(offsets)]
    )
    sender.start()

    def settled() -> bool:
        before = conn.stats.ops[Cmd.READ]
        time.sleep(0.3)
        return conn.stats.ops[Cmd.READ] == before

    assert wait_until(settled, timeout=10)
    processed = conn.stats.ops[Cmd.READ]
    # Bounded: at most the reply queue (1 MiB) plus what the kernel buffers hold.
    assert 0 < processed < count
    assert processed * size < 32 * MiB, f"{processed} reads answered with nobody reading"

    for i, offset in enumerate(offsets):  # now read everything, in order
        reply = client.wait(i)
        assert reply.ok
        assert reply.data() == pattern(offset, size)
    sender.join(10)
    assert not sender.is_alive()
    assert conn.stats.ops[Cmd.READ] == count
    # The connection is still in sync.
    assert client.read(0, 4096).data() == pattern(0, 4096)
    client.disconnect()
    assert client.server_closed()
    client.close()
    assert_no_crash(recorder, caplog)


# ------------------------------------------------------------------ slow and idle clients


def test_stalled_handshake_is_cut_off(inprocess_server, recorder):
    server = inprocess_server(
        registry_of(disk=filled_memory(MiB)), observer=recorder, handshake_timeout_s=1
    )
    silent = NbdClient.connect(server.port)
    trickler = NbdClient.connect(server.port)
    started = time.monotonic()
    trickler.read_greeting()
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.2 s: each recv succeeds, the whole never ends
        stream = wire.CLIENT_FLAGS.pack(3) + wire.OPTION_HEADER.pack(IHAVEOPT, 8, 0) * 10
        for byte in stream:
            if stop.wait(0.2):
                return
            try:
                trickler.send_raw(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        # Meanwhile a real client is served at once.
        time.sleep(0.2)
        t0 = time.monotonic()
        check_serves(server.port, length=4096)
        assert time.monotonic() - t0 < 0.5
        # Both stallers are dropped at the limit (1 s), not before and not much after.
        for staller in (silent, trickler):
            staller.read_until_closed(timeout=5)
            elapsed = time.monotonic() - started
            assert 0.8 < elapsed < 3, elapsed
    finally:
        stop.set()
        thread.join()
        silent.close()
        trickler.close()
    assert wait_until(lambda: all_closed(server))
    assert recorder.close_reasons().count("handshake took too long") == 2


def test_half_open_connections_do_not_block_a_real_client(server, recorder):
    require("nbdinfo")
    idle = []
    try:
        for i in range(100):
            client = NbdClient.connect(server.port)
            if i % 3:
                client.read_greeting()
            if i % 3 == 2:
                client.send_client_flags()
                client.send_option(Opt.GO, b"\0\0\0")  # and never the rest
            idle.append(client)
        assert wait_until(lambda: len(server.connections()) == 100)
        started = time.monotonic()
        result = subprocess.run(
            ["nbdinfo", "--json", f"nbd://127.0.0.1:{server.port}/disk"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5
        info = json.loads(result.stdout)
        assert info["exports"][0]["export-size"] == SIZE
        check_serves(server.port)
        # The idle ones are all still there (only the served clients went away).
        assert wait_until(lambda: len(server.connections()) == 100)
    finally:
        for client in idle:
            client.close()
    assert wait_until(lambda: all_closed(server))


# ------------------------------------------------------------------ ordering


@pytest.fixture
def slow_flush_server(inprocess_server, recorder):
    backend = SlowSync(filled_memory(SIZE), delay=0.5)
    server = inprocess_server(registry_of(disk=backend), observer=recorder)
    return server, backend


def test_disc_with_requests_in_flight(slow_flush_server):
    server, backend = slow_flush_server
    client = connected(server.port)
    sent = [
        client.send(Cmd.WRITE, MiB, payload=b"\x11" * 65536),
        client.send(Cmd.READ, 0, 100_000),
        client.send(Cmd.FLUSH),  # still in the pool when DISC arrives
        client.send(Cmd.WRITE, 2 * MiB, flags=CmdFlag.FUA, payload=b"\x22" * 4096),
        client.send(Cmd.READ, MiB, 65536),
    ]
    client.disconnect()  # right behind them, before any reply was read
    replies = {reply.cookie: reply for reply in client.recv_replies()}
    assert set(replies) == set(sent)
    assert all(reply.ok for reply in replies.values())
    assert replies[sent[1]].data() == pattern(0, 100_000)
    assert replies[sent[4]].data() == b"\x11" * 65536
    assert client.read_until_closed(timeout=5) == b""  # then the server closed
    client.close()
    assert backend.syncs == 2
    assert backend.pread(2 * MiB, 4096) == b"\x22" * 4096
    assert wait_until(lambda: all_closed(server))


def test_offloaded_flush_does_not_stall_later_requests(slow_flush_server):
    server, _ = slow_flush_server
    with connected(server.port) as client:
        flush = client.send(Cmd.FLUSH)
        fua = client.send(Cmd.WRITE, 0, flags=CmdFlag.FUA, payload=pattern(0, 4096))
        reads = [client.send(Cmd.READ, i * 65536, 65536) for i in range(20)]
        started = time.monotonic()
        replies = client.recv_replies()  # in arrival order
        assert {r.cookie for r in replies} == {flush, fua, *reads}
        assert all(r.ok for r in replies)
        order = [r.cookie for r in replies]
        # The reads did not wait behind the slow FLUSH / FUA sync (0.5 s each).
        assert set(order[:20]) == set(reads), order
        for reply in replies[:20]:
            assert reply.data() == pattern(reply.offset, 65536)
        assert time.monotonic() - started >= 0.45
        assert client.read(0, 4096).data() == pattern(0, 4096)


def test_structured_reply_chunks_carry_right_cookies(server):
    """Pipelined reads mixing data and holes: every chunk has its request's cookie and
    the chunks of one reply reassemble exactly (checked by Reply.data)."""
    blank = server.registry.get("blank").backend
    blank.pwrite(pattern(0, 8192), MiB)
    with connected(server.port, "blank") as client:
        cookies = {client.send(Cmd.READ, MiB - 4096 + i * 512, 16384): i for i in range(50)}
        for reply in client.recv_replies():
            start = MiB - 4096 + cookies[reply.cookie] * 512
            expected = bytearray(16384)
            for at in range(16384):
                if MiB <= start + at < MiB + 8192:
                    expected[at] = pattern(start + at - MiB, 1)[0]
            assert reply.data() == bytes(expected)
            types = {c.type for c in reply.chunks}
            assert types <= {ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE}


# ------------------------------------------------------------------ heavy clients


@pytest.mark.parametrize("backend_kind", ["memory", "file"])
def test_clients_vanishing_with_large_reads_queued(
    inprocess_server, recorder, caplog, tmp_path, backend_kind
):
    """Eight clients each ask for 20 reads of 16 MiB and reset the connection without
    reading: every connection is dropped promptly (no thread stays stuck sending) and the
    server serves the next client."""
    if backend_kind == "file":
        path = tmp_path / "big.raw"
        path.write_bytes(pattern(0, 32 * MiB))  # real data, so reads go out with sendfile
        backend = SparseFile(path)
    else:
        backend = filled_memory(32 * MiB)
    server = inprocess_server(registry_of(disk=backend), observer=recorder)
    check_serves(server.port)
    assert wait_until(lambda: all_closed(server))
    threads_before = len(engine_threads())
    clients = [connected(server.port) for _ in range(8)]
    for client in clients:
        for i in range(20):
            client.send(Cmd.READ, (i % 2) * 16 * MiB, 16 * MiB)
    time.sleep(0.3)  # let the server fill the socket buffers and block in send
    for client in clients:
        reset_close(client.sock)
    assert wait_until(lambda: all_closed(server), timeout=10), server.connections()
    assert wait_until(lambda: len(engine_threads()) <= threads_before, timeout=10)
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


def test_connection_limit(inprocess_server, recorder):
    server = inprocess_server(
        registry_of(disk=filled_memory(MiB)), observer=recorder, max_connections=5
    )
    idle = [NbdClient.connect(server.port) for _ in range(5)]
    try:
        assert wait_until(lambda: len(server.connections()) == 5)
        extra = NbdClient.connect(server.port)
        assert extra.read_until_closed(timeout=5) == b""  # refused: not even a greeting
        extra.close()
        idle.pop().close()
        assert wait_until(lambda: len(server.connections()) == 4)
        check_serves(server.port, length=4096)  # a slot is free again
    finally:
        for client in idle:
            client.close()


def test_many_clients_verified_random_io(inprocess_server, recorder, caplog):
    """32 clients, each owning a slice of the disk, write and read back at random:
    no mismatch, no cross-talk between connections."""
    backend = filled_memory(32 * MiB, data_bytes=0)
    server = inprocess_server(registry_of(disk=backend), observer=recorder)
    failures: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        base, span = n * MiB, MiB
        shadow = bytearray(span)
        try:
            with connected(server.port, structured=n % 2 == 0) as client:
                for _ in range(60):
                    offset = rng.randrange(0, span - 16384)
                    length = rng.randrange(1, 16384)
                    if rng.random() < 0.5:
                        data = rng.randbytes(length)
                        assert client.write(base + offset, data).ok
                        shadow[offset : offset + length] = data
                    else:
                        reply = client.read(base + offset, length)
                        if reply.data() != shadow[offset : offset + length]:
                            failures.append(f"client {n}: mismatch at {offset}+{length}")
                client.disconnect()
        except Exception as exc:
            failures.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]
    assert wait_until(lambda: all_closed(server))
    assert_no_crash(recorder, caplog)


@pytest.mark.parametrize("via", ["GO", "EXPORT_NAME"])
def test_first_requests_in_the_same_packet_as_the_handshake(server, via):
    """An eager client sends its whole negotiation and first requests in one go; the bytes
    after the final option belong to transmission and must not be lost."""
    with NbdClient.connect(server.port) as client:
        client.read_greeting()
        stream = wire.CLIENT_FLAGS.pack(1)  # fixed newstyle, with the 124 zero bytes
        if via == "GO":
            stream += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
            go = NbdClient.info_request("disk")
            stream += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, len(go)) + go
        else:
            stream += wire.OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, 4) + b"disk"
        for i in range(3):
            stream += wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 100 + i, i * 4096, 4096)
        client.send_raw(stream)
        if via == "GO":
            for option in (Opt.STRUCTURED_REPLY, Opt.GO):
                while not (reply := client.recv_option_reply()).is_final:
                    assert reply.option == option
                assert reply.type == Rep.ACK
            client.structured = True
        else:
            size, _ = wire.EXPORT_NAME_REPLY.unpack(client.recv_exact(wire.EXPORT_NAME_REPLY.size))
            assert size == SIZE
            client.recv_exact(len(wire.EXPORT_NAME_PADDING))  # we did not ask for NO_ZEROES
        for i in range(3):
            client.track(100 + i, Cmd.READ, i * 4096, 4096)
        for i in range(3):
            reply = client.wait(100 + i)
            assert reply.data() == pattern(i * 4096, 4096)


@pytest.mark.parametrize("backend_kind", ["memory", "file"])
def test_queued_requests_of_a_vanished_client_are_dropped(
    inprocess_server, recorder, tmp_path, backend_kind
):
    """Once sending to a client fails, the connection is over: the requests still in its
    receive buffer are not executed (robustness notes: drop queued work of a closed
    connection), and a client going away is not a disk error."""
    if backend_kind == "file":
        path = tmp_path / "big.raw"
        path.write_bytes(pattern(0, 32 * MiB))
        backend = SparseFile(path)
    else:
        backend = filled_memory(32 * MiB)
    server = inprocess_server(registry_of(disk=backend), observer=recorder)
    client = connected(server.port)
    for _ in range(20):
        client.send(Cmd.READ, 0, 16 * MiB)  # 320 MiB of replies; the buffers hold a few MiB
    time.sleep(0.3)
    reset_close(client.sock)
    assert wait_until(lambda: recorder.of("closed"))
    (info,) = recorder.of("closed")
    assert info.close_reason.startswith("connection lost"), info.close_reason
    snapshot = info.stats.snapshot()
    assert snapshot["errors"] == {}, "the client's disconnect was counted as a backend error"
    # At most the reads in progress when the reset came (one or two of 16 MiB) were run.
    assert snapshot["ops"]["READ"] <= 3, snapshot["ops"]


@pytest.mark.parametrize("length", [0xFFFFFFFF, 200 * MiB])
def test_absurd_write_length_is_a_hard_disconnect(server, recorder, caplog, length):
    """Draining a payload that large is not worth it (protocol doc §4.5): close instead,
    without writing anything and without waiting for the payload."""
    blank = server.registry.get("blank").backend
    with connected(server.port, "blank") as client:
        client.send(Cmd.WRITE, 0, length)
        client.send_raw(b"\x77" * 65536)
        assert client.read_until_closed(timeout=5) == b""
    assert not blank.pages
    assert wait_until(lambda: all_closed(server))
    check_serves(server.port)
    assert_no_crash(recorder, caplog)


def test_running_out_of_file_descriptors_pauses_accepting(tmp_path):
    """A server process at its fd limit stops accepting (the extra clients wait in the
    backlog) and recovers as soon as descriptors are free again."""
    import resource
    import sys

    from conftest import ROOT

    image = tmp_path / "small.raw"
    image.write_bytes(pattern(0, MiB))

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbdcore",
            "serve",
            str(image),
            "-x",
            "disk",
            "--port",
            "0",
            "--handshake-timeout",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=limit_fds,
    )
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        last = idle[-1]
        last.settimeout(1)
        with pytest.raises(TimeoutError):
            last.recv(18)  # not accepted: the server has no descriptor left
        for sock in idle[:30]:
            sock.close()
        last.settimeout(5)
        assert last.recv(8) == b"NBDMAGIC"  # accepted once descriptors were free
        check_serves(port)
        assert proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(10)
