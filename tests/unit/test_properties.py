"""Hypothesis properties: hostile input yields events or protocol errors, never a crash,
and everything the engine sends back is well formed."""

from __future__ import annotations

import itertools
import struct

from handshake_client import (
    group_replies,
    info_request,
    meta_request,
    option,
    parse_option_replies,
    split_greeting,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlag,
    Info,
    NbdErrno,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcore.protocol.errors import CommandError, RemoteProtocolError
from nbdcore.protocol.exports import ExportInfo
from nbdcore.protocol.handshake import (
    NEED_DATA,
    Closed,
    ExportChosen,
    Handshake,
    HandshakeState,
    Negotiated,
)
from nbdcore.protocol.transmission import Extent, Transmission
from nbdcore.protocol.wire import Request, encode_request

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)

# ================================================================== handshake


def make_registry() -> ExportRegistry:
    return ExportRegistry(
        [
            Export("", MemoryBackend(8192), description="default"),
            Export("disk", MemoryBackend(1 << 20), description="the disk"),
            Export("ro", MemoryBackend(1 << 20), read_only=True),
            Export("off", MemoryBackend(4096), enabled=False),
        ]
    )


names = st.one_of(
    st.sampled_from(["", "disk", "ro", "off", "nosuch", "\u00e9t\u00e9"]),
    st.text(max_size=20),
)
info_lists = st.lists(st.one_of(st.sampled_from([int(i) for i in Info]), U16), max_size=5)
known_queries = st.sampled_from(
    [BASE_ALLOCATION, BASE_ALLOCATION, "base:", "qemu:dirty-bitmap:x", "nocolon", "x-y:z"]
)
queries = st.lists(st.one_of(known_queries, known_queries, st.text(max_size=20)), max_size=4)
option_numbers = st.one_of(st.sampled_from([int(o) for o in Opt]), U32)


@st.composite
def option_data(draw: st.DrawFn, opt: int) -> bytes:
    """Mostly well-formed payloads for the option, sometimes garbage."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=64))
    if opt in (Opt.INFO, Opt.GO):
        return info_request(draw(names), draw(info_lists))
    if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        return meta_request(draw(names), draw(queries))
    if opt == Opt.EXPORT_NAME:
        return draw(names).encode()
    return b""


@st.composite
def option_streams(draw: st.DrawFn) -> bytes:
    stream = b""
    for _ in range(draw(st.integers(1, 8))):
        opt = draw(option_numbers)
        stream += option(opt, draw(option_data(opt)))
    if stream and draw(st.integers(0, 3)) == 0:  # corrupt one byte somewhere
        at = draw(st.integers(0, len(stream) - 1))
        stream = stream[:at] + bytes([draw(st.integers(0, 255))]) + stream[at + 1 :]
    return stream


# Mostly clients that get past the flags (so the options are exercised), sometimes not.
client_flags = st.one_of(
    st.just(3), st.just(1), st.just(3), st.sampled_from([0, 2]), st.just(3), U32
).map(lambda f: struct.pack(">I", f))
handshake_input = st.tuples(
    st.one_of(client_flags, client_flags, client_flags, st.binary(max_size=4)),
    st.one_of(option_streams(), option_streams(), option_streams(), st.binary(max_size=200)),
)


def run_handshake(data: bytes, chunk: int, eof: bool) -> tuple[Handshake, list[object], bytes]:
    """Feed ``data`` in ``chunk``-sized pieces; return the events until the machine stops."""
    hs = Handshake(make_registry(), "192.0.2.1:1234")
    out = hs.data_to_send()
    events: list[object] = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    if eof:
        pieces.append(b"")
    for piece in pieces:
        hs.receive_data(piece)
        while True:
            try:
                event = hs.next_event()
            except RemoteProtocolError:
                assert hs.state is HandshakeState.ERROR
                events.append(RemoteProtocolError)
                return hs, events, out + hs.data_to_send()
            out += hs.data_to_send()
            events.append(event)
            if event is NEED_DATA:
                break
            assert isinstance(event, ExportChosen | Closed), event
            return hs, events, out
    return hs, events, out


@PROPERTY
@given(parts=handshake_input, chunk=st.integers(1, 64), eof=st.booleans())
def test_handshake_input_yields_only_events_or_remote_protocol_error(
    parts: tuple[bytes, bytes], chunk: int, eof: bool
) -> None:
    hs, events, _ = run_handshake(parts[0] + parts[1], chunk, eof)
    last = events[-1] if events else NEED_DATA
    if last is RemoteProtocolError:
        assert hs.state is HandshakeState.ERROR
    elif isinstance(last, ExportChosen):
        assert hs.state is HandshakeState.TRANSMISSION
    elif isinstance(last, Closed):
        assert hs.state is HandshakeState.CLOSED
    else:
        assert last is NEED_DATA
        assert not eof
        assert hs.state in (HandshakeState.CLIENT_FLAGS, HandshakeState.OPTIONS)


@PROPERTY
@given(parts=handshake_input, chunk=st.integers(1, 64), eof=st.booleans())
def test_handshake_reply_stream_is_well_formed_and_echoes_each_option(
    parts: tuple[bytes, bytes], chunk: int, eof: bool
) -> None:
    hs, events, out = run_handshake(parts[0] + parts[1], chunk, eof)
    flags, rest = split_greeting(out)
    assert flags == 0x3
    last = events[-1] if events else NEED_DATA
    chosen = last.negotiated if isinstance(last, ExportChosen) else None
    if chosen is not None and hs.record.via == "EXPORT_NAME":
        # The EXPORT_NAME answer has no option-reply header: size, flags, maybe 124 zeroes.
        padding = b"" if hs.record.no_zeroes else bytes(124)
        export_reply = struct.pack(">QH", chosen.export.size, chosen.flags) + padding
        assert rest.endswith(export_reply)
        rest = rest[: -len(export_reply)]
    groups = group_replies(parse_option_replies(rest))
    answered = [o for o in hs.record.options if o.reply not in ("CLOSED", "EXPORT")]
    assert [g[0].option for g in groups] == [o.option for o in answered]
    for seen, group in zip(answered, groups, strict=True):
        assert all(r.option == seen.option for r in group)
        assert Rep(group[-1].type).name == seen.reply
        assert all(not r.is_final for r in group[:-1])
        if seen.option in (Opt.INFO, Opt.GO) and group[-1].type == Rep.ACK:
            exports = [r.payload for r in group if r.payload[:2] == b"\x00\x00"]
            assert len(exports) == 1  # NBD_INFO_EXPORT is mandatory, and sent once
            _, size, tflags = struct.unpack(">HQH", exports[0])
            assert tflags & TransmissionFlag.HAS_FLAGS
            if seen.option == Opt.GO:
                assert chosen is not None
                assert (size, tflags) == (chosen.export.size, chosen.flags)
    if chosen is not None:
        assert hs.record.transmission_flags == chosen.flags
        assert bool(chosen.flags & TransmissionFlag.SEND_DF) == chosen.structured
        if chosen.contexts:
            assert chosen.contexts == {1: BASE_ALLOCATION}
            assert chosen.structured


@PROPERTY
@given(data=st.binary(max_size=300))
def test_handshake_after_valid_flags_survives_arbitrary_bytes(data: bytes) -> None:
    _, events, out = run_handshake(struct.pack(">I", 3) + data, 7, eof=True)
    assert events
    assert events[-1] is RemoteProtocolError or isinstance(events[-1], ExportChosen | Closed)
    split_greeting(out)


# ================================================================== transmission


@st.composite
def negotiations(draw: st.DrawFn) -> Negotiated:
    mostly = st.sampled_from([True, True, True, False])  # capabilities are usually there
    extended = draw(st.booleans())
    structured = extended or draw(st.booleans())
    contexts = structured and draw(mostly)
    export = ExportInfo(
        name="disk",
        size=draw(st.sampled_from([1 << 20, 1 << 40, 0, 512, (1 << 63) - 1])),
        read_only=not draw(mostly),
        multi_conn=draw(st.booleans()),
        can_flush=draw(mostly),
        can_fua=draw(mostly),
        can_trim=draw(mostly),
        can_zero=draw(mostly),
        can_fast_zero=draw(mostly),
        can_cache=draw(mostly),
        block_max=draw(st.sampled_from([32 << 20, 4096, 0xFFFFFFFF])),
    )
    flags = export.transmission_flags(structured=structured, extended=extended, contexts=contexts)
    return Negotiated(
        export=export,
        flags=flags,
        structured=structured,
        extended=extended,
        contexts={1: BASE_ALLOCATION} if contexts else {},
        no_zeroes=True,
    )


def near(size: int) -> st.SearchStrategy[int]:
    """Offsets and lengths around the interesting edges of an export."""
    return st.one_of(
        st.sampled_from([0, 1, 511, 512, 4096, 32 << 20, (32 << 20) + 1]),
        st.integers(max(size - 4096, 0), size + 4096),
        U64,
        st.integers(0, 1 << 34),
    )


@st.composite
def headers(draw: st.DrawFn, tx: Transmission) -> bytes:
    """Mostly well-framed headers near the interesting edges; sometimes raw bytes."""
    size = tx.header_size
    # Hypothesis favours the first element of sampled_from: rare choices go last.
    if draw(st.sampled_from(range(8))) == 7:
        return draw(st.binary(min_size=size, max_size=size))
    if draw(st.sampled_from(range(8))) == 7:
        cmd = draw(U16)
    else:
        cmd = draw(st.sampled_from(range(Cmd.BLOCK_STATUS + 1)))
    kind = draw(st.sampled_from(range(8)))
    if kind == 7:
        flags = draw(U16)
    elif kind > 4:
        flags = draw(st.integers(0, 0x3F))
    else:
        flags = draw(st.sampled_from([0, 0, 1, 2, 4, 8, 16, 32, 3, 17, 18, 5, 33]))
    offset = draw(st.one_of(st.integers(0, tx.size), near(tx.size)))
    room = max(min(tx.size - offset, 1 << 26), 0)
    length = draw(st.one_of(st.integers(0, room), st.integers(0, room), near(tx.size)))
    req = Request(
        cmd=cmd,
        flags=flags,
        cookie=draw(U64),
        offset=offset,
        length=length if tx.extended else length & 0xFFFFFFFF,
        extended=tx.extended,
    )
    return encode_request(req)


_ONLY_ON = {
    CmdFlag.NO_HOLE: {Cmd.WRITE_ZEROES},
    CmdFlag.FAST_ZERO: {Cmd.WRITE_ZEROES},
    CmdFlag.DF: {Cmd.READ},
    CmdFlag.REQ_ONE: {Cmd.BLOCK_STATUS},
    CmdFlag.PAYLOAD_LEN: {Cmd.WRITE, Cmd.BLOCK_STATUS},
}
_FLAG_NEEDS = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}
_CMD_NEEDS = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}


def acceptable_errnos(tx: Transmission, req: Request) -> set[NbdErrno]:
    """Every errno §4.5 of the protocol doc allows for this request; empty = it must pass.

    Order-independent on purpose: when a request breaks several rules, any of their
    answers is right.
    """
    cmd, flags, out = req.cmd, req.flags, set()
    if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and tx.flags & TransmissionFlag.READ_ONLY:
        out.add(NbdErrno.EPERM)
    if cmd > Cmd.BLOCK_STATUS:  # unknown, or RESIZE which we never advertise
        return out | {NbdErrno.EINVAL}
    known = 0x3F if tx.extended else 0x1F
    if flags & ~known:
        out.add(NbdErrno.EINVAL)
    for flag, commands in _ONLY_ON.items():
        if flags & flag and cmd not in commands:
            out.add(NbdErrno.EINVAL)
    for flag, needed in _FLAG_NEEDS.items():
        if flags & flag and not tx.flags & needed:
            out.add(NbdErrno.EINVAL)
    if cmd in _CMD_NEEDS and not tx.flags & _CMD_NEEDS[cmd]:
        out.add(NbdErrno.EINVAL)
    if tx.extended and cmd == Cmd.WRITE and not flags & CmdFlag.PAYLOAD_LEN:
        out.add(NbdErrno.EINVAL)
    if cmd == Cmd.BLOCK_STATUS and (not tx.contexts or req.length == 0):
        out.add(NbdErrno.EINVAL)
    if cmd == Cmd.FLUSH and (req.offset or req.length):
        out.add(NbdErrno.EINVAL)
    if cmd in (Cmd.READ, Cmd.WRITE) and req.length > tx.max_payload:
        out.add(NbdErrno.EOVERFLOW if cmd == Cmd.READ and flags & CmdFlag.DF else NbdErrno.EINVAL)
    if cmd not in (Cmd.FLUSH, Cmd.DISC) and req.offset + req.length > tx.size:
        out.add(NbdErrno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NbdErrno.EINVAL)
    return out


def check_error_reply(tx: Transmission, req: Request, reply: bytes, errno: int) -> None:
    """The reply a strict client (libnbd 1.14, qemu 7.2) accepts for a failed request."""
    assert errno != 0
    if not tx.structured:
        assert reply == struct.pack(">IIQ", 0x67446698, errno, req.cookie)
        return
    if tx.extended:
        magic, rflags, kind, cookie, offset, length = struct.unpack_from(">IHHQQQ", reply)
        assert magic == 0x6E8A278C
        assert offset == req.offset
        payload = reply[32:]
    else:
        magic, rflags, kind, cookie, length = struct.unpack_from(">IHHQI", reply)
        assert magic == 0x668E33EF
        payload = reply[20:]
    assert (rflags, kind, cookie) == (1, 0x8001, req.cookie)
    assert length == len(payload)
    got_errno, msg_len = struct.unpack_from(">IH", payload)
    assert got_errno == errno
    assert length == 6 + msg_len  # libnbd 1.14 dies on trailing bytes
    assert length <= 1000  # qemu's limit for non-data chunk payloads
    payload[6:].decode("utf-8")


def check_ok_reply(tx: Transmission, req: Request, reply: bytes) -> None:
    if tx.extended:
        assert reply == struct.pack(">IHHQQQ", 0x6E8A278C, 1, 0, req.cookie, req.offset, 0)
    else:
        assert reply == struct.pack(">IIQ", 0x67446698, 0, req.cookie)


@PROPERTY
@given(data=st.data(), negotiated=negotiations())
def test_any_request_header_gives_a_protocol_error_or_a_well_formed_reply(
    data: st.DataObject, negotiated: Negotiated
) -> None:
    tx = Transmission(negotiated)
    raw = data.draw(headers(tx))
    try:
        req = tx.decode(raw)
        payload = tx.payload_length(req)
    except RemoteProtocolError:
        return  # framing broken: the connection closes, nothing to reply
    assert 0 <= payload <= 128 << 20
    expected = acceptable_errnos(tx, req)
    error: CommandError | None = None
    try:
        tx.validate(req)
    except CommandError as exc:
        error = exc
    if req.cmd == Cmd.DISC:
        # DISC gets no reply at all: the client is leaving, whatever its header says
        # (test_transmission pins down that validation does not refuse it).
        return
    if error is not None:
        assert error.errno in expected, (req, error, expected)
        check_error_reply(tx, req, tx.reply_error(req, error), error.errno)
        return
    assert not expected, (req, expected)
    if req.cmd not in (Cmd.READ, Cmd.BLOCK_STATUS, Cmd.DISC):
        check_ok_reply(tx, req, tx.reply_ok(req))


@PROPERTY
@given(
    negotiated=negotiations(),
    raw=st.binary(min_size=32, max_size=32),
    keep_magic=st.booleans(),
)
def test_arbitrary_header_bytes_raise_only_protocol_or_command_errors(
    negotiated: Negotiated, raw: bytes, keep_magic: bool
) -> None:
    tx = Transmission(negotiated)
    header = raw[: tx.header_size]
    if keep_magic:  # get past the magic check so the rest of the header is exercised
        magic = 0x21E41C71 if tx.extended else 0x25609513
        header = struct.pack(">I", magic) + header[4:]
    outcome: Exception | None = None
    payload = 0
    try:
        req = tx.decode(header)
        payload = tx.payload_length(req)
        tx.validate(req)
    except (RemoteProtocolError, CommandError) as exc:
        outcome = exc
    if isinstance(outcome, CommandError):
        assert outcome.errno in set(NbdErrno)
        assert outcome.message
    elif isinstance(outcome, RemoteProtocolError):
        assert str(outcome)
        assert tx.header_size == len(header)
    else:
        assert req.cmd <= Cmd.BLOCK_STATUS
        assert 0 <= payload <= 128 << 20


# ================================================================== block status


@st.composite
def extent_runs(draw: st.DrawFn, start: int) -> list[Extent]:
    out, pos = [], start
    for _ in range(draw(st.integers(0, 12))):
        length = draw(st.integers(1, 20_000))
        out.append(Extent(pos, length, draw(st.sampled_from([0, 3, 2]))))
        pos += length
    return out


@PROPERTY
@given(
    data=st.data(),
    extended=st.booleans(),
    req_one=st.booleans(),
    offset=st.integers(0, 1 << 20),
    length=st.integers(1, 200_000),
)
def test_block_status_reply_follows_the_descriptor_rules(
    data: st.DataObject, extended: bool, req_one: bool, offset: int, length: int
) -> None:
    size = 1 << 21
    assume(offset + length <= size)
    export = ExportInfo(name="disk", size=size)
    tx = Transmission(
        Negotiated(
            export=export,
            flags=export.transmission_flags(structured=True, extended=extended, contexts=True),
            structured=True,
            extended=extended,
            contexts={1: BASE_ALLOCATION},
            no_zeroes=True,
        )
    )
    aligned = data.draw(st.booleans())
    extents = data.draw(extent_runs(offset if aligned else offset + 1))
    flags = CmdFlag.REQ_ONE if req_one else 0
    req = Request(Cmd.BLOCK_STATUS, flags, 99, offset, length, extended=extended)
    reply = tx.block_status_reply(req, extents)
    if not extended:  # the short path's reply is the same, byte for byte
        assert tx.plain_status_reply(99, offset, length, req_one, extents) == reply

    if extended:
        magic, rflags, kind, cookie, hoff, hlen = struct.unpack_from(">IHHQQQ", reply)
        assert (magic, kind, hoff) == (0x6E8A278C, 6, offset)
        body = reply[32:]
        context_id, count = struct.unpack_from(">II", body)
        assert hlen == len(body) == 8 + 16 * count
        descriptors = [struct.unpack_from(">QQ", body, 8 + 16 * i) for i in range(count)]
    else:
        magic, rflags, kind, cookie, hlen = struct.unpack_from(">IHHQI", reply)
        assert (magic, kind) == (0x668E33EF, 5)
        body = reply[20:]
        assert hlen == len(body)
        assert (hlen - 4) % 8 == 0
        (context_id,) = struct.unpack_from(">I", body)
        count = (hlen - 4) // 8
        descriptors = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range(count)]
    assert (rflags, cookie, context_id) == (1, 99, 1)
    assert count >= 1
    if req_one:
        assert count == 1
    assert all(d_len > 0 for d_len, _ in descriptors)
    assert sum(d_len for d_len, _ in descriptors) <= length
    assert all(a[1] != b[1] for a, b in itertools.pairwise(descriptors))
    # Each descriptor's status is the status the backend reported for those bytes.
    if aligned and extents:
        pos = offset
        for d_len, status in descriptors:
            for extent in extents:
                if extent.offset < pos + d_len and pos < extent.offset + extent.length:
                    assert extent.flags == status
            pos += d_len
        assert pos <= extents[-1].offset + extents[-1].length
    else:
        assert descriptors == [(length, 0)]
