"""Byte layouts of nbdcore.protocol.wire, checked against hex fixtures from the protocol doc."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcore.protocol import wire
from nbdcore.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REP_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Info,
    NbdErrno,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbdcore.protocol.errors import RemoteProtocolError
from nbdcore.protocol.wire import Request

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


# ------------------------------------------------------------------ magic numbers


def test_magic_numbers_match_the_spec_table() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert hx("0003e889045565a9") == REP_MAGIC.to_bytes(8, "big")
    assert REQUEST_MAGIC == 0x25609513
    assert EXTENDED_REQUEST_MAGIC == 0x21E41C71
    assert SIMPLE_REPLY_MAGIC == 0x67446698
    assert STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert EXTENDED_REPLY_MAGIC == 0x6E8A278C


def test_struct_sizes_match_appendix_a() -> None:
    sizes = {
        wire.GREETING: 18,
        wire.CLIENT_FLAGS: 4,
        wire.OPTION_HEADER: 16,
        wire.OPTION_REPLY: 20,
        wire.EXPORT_NAME_REPLY: 10,
        wire.INFO_EXPORT: 12,
        wire.INFO_BLOCK_SIZE: 14,
        wire.REQUEST: 28,
        wire.EXTENDED_REQUEST: 32,
        wire.SIMPLE_REPLY: 16,
        wire.CHUNK: 20,
        wire.EXTENDED_CHUNK: 32,
        wire.HOLE: 12,
        wire.ERROR_HEAD: 6,
        wire.EXTENT: 8,
        wire.EXTENT_EXT: 16,
    }
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}
    assert len(wire.EXPORT_NAME_PADDING) == 124
    assert set(wire.EXPORT_NAME_PADDING) == {0}


# ------------------------------------------------------------------ greeting


def test_greeting_is_nbdmagic_ihaveopt_and_flags() -> None:
    assert wire.greeting(0x3) == hx("4e42444d41474943 49484156454f5054 0003")
    assert wire.greeting(0x1) == b"NBDMAGICIHAVEOPT\x00\x01"


# ------------------------------------------------------------------ requests


def test_decode_compact_read_request_from_spec_hex() -> None:
    req = wire.decode_request(hx("25609513 0000 0000 0000000000000007 0000000000001000 00000200"))
    assert req == Request(Cmd.READ, CmdFlag(0), cookie=7, offset=4096, length=512)
    assert req.extended is False


def test_decode_compact_write_request_with_fua() -> None:
    req = wire.decode_request(hx("25609513 0001 0001 deadbeefcafef00d 0000000000200000 00010000"))
    assert req == Request(Cmd.WRITE, CmdFlag.FUA, 0xDEADBEEFCAFEF00D, 2 << 20, 65536)


def test_decode_request_keeps_unknown_command_raw() -> None:
    req = wire.decode_request(hx("25609513 0040 00ff 0000000000000001 0000000000000000 00000000"))
    assert req.cmd == 0xFF
    assert req.flags == 0x40


def test_decode_request_at_offset_inside_a_buffer() -> None:
    buf = b"junk" + hx("25609513 0000 0003 0000000000000009 0000000000000000 00000000")
    assert wire.decode_request(buf, 4) == Request(Cmd.FLUSH, 0, 9, 0, 0)


def test_decode_extended_block_status_request_from_hex() -> None:
    req = wire.decode_extended_request(
        hx("21e41c71 0008 0007 0000000000000002 0000000000100000 0000000100000000")
    )
    assert req == Request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 2, 1 << 20, 1 << 32, extended=True)


@pytest.mark.parametrize(
    "header",
    [
        # extended magic in compact mode, reserved/legacy magics, byte-swapped magic
        "21e41c71 0000 0000 0000000000000007 0000000000001000 00000200",
        "25609514 0000 0000 0000000000000007 0000000000001000 00000200",
        "12560953 0000 0000 0000000000000007 0000000000001000 00000200",
        "13956025 0000 0000 0000000000000007 0000000000001000 00000200",
    ],
)
def test_decode_request_with_bad_magic_raises_remote_protocol_error(header: str) -> None:
    with pytest.raises(RemoteProtocolError, match="magic"):
        wire.decode_request(hx(header))


def test_decode_extended_request_rejects_compact_magic() -> None:
    header = hx("25609513 0000 0000 0000000000000007 0000000000001000 0000000000000200")
    with pytest.raises(RemoteProtocolError, match="magic"):
        wire.decode_extended_request(header)


def test_encode_request_compact_bytes() -> None:
    req = Request(Cmd.READ, 0, 7, 4096, 512)
    assert wire.encode_request(req) == hx(
        "25609513 0000 0000 0000000000000007 0000000000001000 00000200"
    )


def test_encode_request_extended_bytes() -> None:
    req = Request(Cmd.WRITE, CmdFlag.PAYLOAD_LEN, 1, 0, 512, extended=True)
    assert wire.encode_request(req) == hx(
        "21e41c71 0020 0001 0000000000000001 0000000000000000 0000000000000200"
    )


@settings(max_examples=300, deadline=None)
@given(cmd=U16, flags=U16, cookie=U64, offset=U64, length=U32)
def test_compact_request_round_trips(
    cmd: int, flags: int, cookie: int, offset: int, length: int
) -> None:
    req = Request(cmd, flags, cookie, offset, length)
    raw = wire.encode_request(req)
    assert len(raw) == wire.REQUEST_SIZE
    assert wire.decode_request(raw) == req


@settings(max_examples=300, deadline=None)
@given(cmd=U16, flags=U16, cookie=U64, offset=U64, length=U64)
def test_extended_request_round_trips(
    cmd: int, flags: int, cookie: int, offset: int, length: int
) -> None:
    req = Request(cmd, flags, cookie, offset, length, extended=True)
    raw = wire.encode_request(req)
    assert len(raw) == wire.EXTENDED_REQUEST_SIZE
    assert wire.decode_extended_request(raw) == req


# ------------------------------------------------------------------ option replies


def test_option_reply_ack_bytes() -> None:
    assert wire.option_reply(Opt.LIST, Rep.ACK) == hx("0003e889045565a9 00000003 00000001 00000000")


def test_option_reply_error_carries_message_and_length() -> None:
    assert wire.option_reply(Opt.GO, Rep.ERR_UNKNOWN, b"nope") == hx(
        "0003e889045565a9 00000007 80000006 00000004 6e6f7065"
    )


def test_rep_server_payload_is_length_name_description() -> None:
    assert wire.rep_server("disk", "my disk") == hx("00000004") + b"disk" + b"my disk"
    assert wire.rep_server("") == hx("00000000")


def test_rep_server_name_length_counts_utf8_bytes() -> None:
    payload = wire.rep_server("d\u00e9")
    assert payload == hx("00000003 64c3a9")


def test_info_export_payload_bytes() -> None:
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    assert wire.info_export(1 << 20, flags) == hx("0000 0000000000100000 0005")


def test_info_block_size_payload_bytes() -> None:
    assert wire.info_block_size(1, 4096, 32 << 20) == hx("0003 00000001 00001000 02000000")


def test_info_text_payloads() -> None:
    assert wire.info_text(Info.NAME, "disk") == hx("0001") + b"disk"
    assert wire.info_text(Info.DESCRIPTION, "") == hx("0002")


def test_meta_context_payload_bytes() -> None:
    assert wire.meta_context(1, "base:allocation") == hx("00000001") + b"base:allocation"


def test_export_name_reply_layout() -> None:
    assert wire.EXPORT_NAME_REPLY.pack(1 << 30, 0x0DED) == hx("0000000040000000 0ded")


# ------------------------------------------------------------------ transmission replies


def test_simple_reply_success_bytes() -> None:
    assert wire.simple_reply(7) == hx("67446698 00000000 0000000000000007")


def test_simple_reply_error_bytes() -> None:
    assert wire.simple_reply(0xFFFFFFFFFFFFFFFF, NbdErrno.EINVAL) == hx(
        "67446698 00000016 ffffffffffffffff"
    )


def test_chunk_header_offset_data_not_done() -> None:
    header = wire.chunk_header(7, ReplyType.OFFSET_DATA, 8 + 4096, done=False)
    assert header == hx("668e33ef 0000 0001 0000000000000007 00001008")


def test_chunk_header_none_done() -> None:
    assert wire.chunk_header(7, ReplyType.NONE, 0, done=True) == hx(
        "668e33ef 0001 0000 0000000000000007 00000000"
    )


def test_chunk_header_extended_echoes_request_offset() -> None:
    header = wire.chunk_header(
        3, ReplyType.BLOCK_STATUS_EXT, 24, done=True, extended=True, request_offset=1 << 20
    )
    assert header == hx("6e8a278c 0001 0006 0000000000000003 0000000000100000 0000000000000018")


def test_spec_example_structured_read_of_4k_in_two_chunks() -> None:
    cookie = 0x1122334455667788
    data = bytes(range(256)) * 16
    stream = (
        wire.chunk_header(cookie, ReplyType.OFFSET_DATA, 8 + 4096, done=False)
        + wire.U64.pack(0)
        + data
        + wire.chunk_header(cookie, ReplyType.NONE, 0, done=True)
    )
    expected = (
        struct.pack(">IHHQI", 0x668E33EF, 0, 1, cookie, 8 + 4096)
        + struct.pack(">Q", 0)
        + data
        + struct.pack(">IHHQI", 0x668E33EF, 1, 0, cookie, 0)
    )
    assert stream == expected


def test_spec_example_hole_chunk_of_1mib_at_1mib() -> None:
    chunk = wire.chunk_header(5, ReplyType.OFFSET_HOLE, 12, done=False) + wire.HOLE.pack(
        1 << 20, 1 << 20
    )
    assert chunk == struct.pack(">IHHQI", 0x668E33EF, 0, 2, 5, 12) + struct.pack(
        ">QI", 1 << 20, 1 << 20
    )


def test_error_payload_without_offset_is_error_length_message() -> None:
    assert wire.error_payload(NbdErrno.EINVAL, "bad") == hx("00000016 0003 626164")
    assert wire.error_type(None) is ReplyType.ERROR


def test_error_payload_with_offset_puts_offset_after_message() -> None:
    payload = wire.error_payload(NbdErrno.EIO, "io", 4096)
    assert payload == hx("00000005 0002 696f 0000000000001000")
    assert wire.error_type(4096) is ReplyType.ERROR_OFFSET
    assert wire.error_type(0) is ReplyType.ERROR_OFFSET


def test_error_payload_caps_long_ascii_message_at_900_bytes() -> None:
    payload = wire.error_payload(NbdErrno.EIO, "x" * 5000)
    errno, msg_len = wire.ERROR_HEAD.unpack_from(payload)
    assert (errno, msg_len) == (NbdErrno.EIO, 900)
    assert len(payload) == 6 + 900


def test_error_payload_truncation_keeps_message_valid_utf8() -> None:
    # "a" + 500 two-byte characters = 1001 bytes; a cut at 900 bytes lands inside a character.
    payload = wire.error_payload(NbdErrno.EIO, "a" + "\u00e9" * 500)
    _, msg_len = wire.ERROR_HEAD.unpack_from(payload)
    assert msg_len <= 900
    assert len(payload) == 6 + msg_len
    payload[6 : 6 + msg_len].decode("utf-8")  # raises if the cut split a character


@settings(max_examples=300, deadline=None)
@given(errno=st.integers(1, 0xFFFFFFFF), message=st.text(max_size=300), offset=st.none() | U64)
def test_error_payload_round_trips(errno: int, message: str, offset: int | None) -> None:
    payload = wire.error_payload(errno, message, offset)
    got_errno, msg_len = wire.ERROR_HEAD.unpack_from(payload)
    raw = message.encode()
    assert got_errno == errno
    assert msg_len <= 900
    assert raw.startswith(payload[6 : 6 + msg_len])
    if len(raw) <= 900:
        assert msg_len == len(raw)
    tail = payload[6 + msg_len :]
    if offset is None:
        assert tail == b""
    else:
        assert wire.U64.unpack(tail) == (offset,)


@settings(max_examples=300, deadline=None)
@given(
    cookie=U64,
    reply_type=U16,
    length=U32,
    done=st.booleans(),
    offset=U64,
)
def test_chunk_headers_round_trip(
    cookie: int, reply_type: int, length: int, done: bool, offset: int
) -> None:
    compact = wire.chunk_header(cookie, reply_type, length, done=done)
    assert wire.CHUNK.unpack(compact) == (
        STRUCTURED_REPLY_MAGIC,
        int(done),
        reply_type,
        cookie,
        length,
    )
    extended = wire.chunk_header(
        cookie, reply_type, length, done=done, extended=True, request_offset=offset
    )
    assert wire.EXTENDED_CHUNK.unpack(extended) == (
        EXTENDED_REPLY_MAGIC,
        int(done),
        reply_type,
        cookie,
        offset,
        length,
    )
