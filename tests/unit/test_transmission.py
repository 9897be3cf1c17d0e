"""Transmission rules: request decoding, payload framing, validation (§4.5) and replies."""

from __future__ import annotations

import errno as host_errno
import struct

import pytest

from nbdcore.protocol.constants import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlag,
    NbdErrno,
    TransmissionFlag,
)
from nbdcore.protocol.errors import (
    CommandError,
    InvalidRequest,
    OutOfSpace,
    ReadOnlyExport,
    RemoteProtocolError,
    TooLarge,
)
from nbdcore.protocol.exports import ExportInfo
from nbdcore.protocol.handshake import Negotiated
from nbdcore.protocol.transmission import (
    MAX_DRAIN,
    Extent,
    Transmission,
    command_name,
    nbd_errno,
)
from nbdcore.protocol.wire import Request

SIZE = 1 << 20
MIB32 = 32 << 20
U64_MAX = (1 << 64) - 1
HOLE = 3  # base:allocation HOLE | ZERO
DATA = 0


def make_tx(
    *,
    size: int = SIZE,
    structured: bool = False,
    extended: bool = False,
    contexts: bool = False,
    **export_kwargs: object,
) -> Transmission:
    export = ExportInfo(name="disk", size=size, **export_kwargs)  # type: ignore[arg-type]
    flags = export.transmission_flags(structured=structured, extended=extended, contexts=contexts)
    return Transmission(
        Negotiated(
            export=export,
            flags=flags,
            structured=structured or extended,
            extended=extended,
            contexts={1: BASE_ALLOCATION} if contexts else {},
            no_zeroes=True,
        )
    )


def req(
    cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7, **kw: bool
) -> Request:
    return Request(cmd, flags, cookie, offset, length, **kw)


def xreq(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> Request:
    return Request(cmd, flags, cookie, offset, length, extended=True)


# ------------------------------------------------------------------ decoding and framing


def test_compact_mode_decodes_28_byte_headers() -> None:
    tx = make_tx()
    assert tx.header_size == 28
    raw = bytes.fromhex("25609513 0000 0000 0000000000000007 0000000000001000 00000200")
    assert tx.decode(raw) == Request(Cmd.READ, 0, 7, 4096, 512)


def test_extended_mode_decodes_32_byte_headers() -> None:
    tx = make_tx(extended=True)
    assert tx.header_size == 32
    raw = bytes.fromhex("21e41c71 0020 0001 0000000000000003 0000000000000200 0000000000000400")
    assert tx.decode(raw) == Request(Cmd.WRITE, CmdFlag.PAYLOAD_LEN, 3, 512, 1024, extended=True)


def test_extended_magic_in_compact_mode_is_a_protocol_error() -> None:
    raw = bytes.fromhex("21e41c71 0000 0000 0000000000000007 0000000000001000 00000200")
    with pytest.raises(RemoteProtocolError):
        make_tx(structured=True).decode(raw)


def test_compact_magic_in_extended_mode_is_a_protocol_error() -> None:
    raw = bytes.fromhex("25609513 0000 0000 0000000000000007 0000000000001000 0000000000000200")
    with pytest.raises(RemoteProtocolError):
        make_tx(extended=True).decode(raw)


def test_decode_at_position_in_a_buffer() -> None:
    raw = b"\xff" * 3 + bytes.fromhex(
        "25609513 0000 0003 0000000000000001 0000000000000000 00000000"
    )
    assert make_tx().decode(raw, 3) == Request(Cmd.FLUSH, 0, 1, 0, 0)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        pytest.param(req(Cmd.WRITE, 0, 4096), 4096, id="write"),
        pytest.param(req(Cmd.READ, 0, 4096), 0, id="read"),
        pytest.param(req(Cmd.WRITE_ZEROES, 0, 4096), 0, id="write-zeroes"),
        pytest.param(req(99, 0, 4096), 0, id="unknown-command-has-no-payload"),
        pytest.param(req(Cmd.WRITE, 0, 4096, flags=CmdFlag.PAYLOAD_LEN), 4096, id="write-flag"),
        pytest.param(req(Cmd.WRITE, 0, MAX_DRAIN), MAX_DRAIN, id="write-at-drain-cap"),
    ],
)
def test_payload_length_in_compact_mode(request_: Request, expected: int) -> None:
    assert make_tx().payload_length(request_) == expected


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        pytest.param(xreq(Cmd.WRITE, 0, 4096, CmdFlag.PAYLOAD_LEN), 4096, id="write"),
        pytest.param(xreq(Cmd.WRITE, 0, 4096), 0, id="write-without-payload-len"),
        pytest.param(xreq(Cmd.READ, 0, 4096), 0, id="read"),
        pytest.param(xreq(Cmd.READ, 0, 100, CmdFlag.PAYLOAD_LEN), 100, id="read-payload-len"),
        pytest.param(xreq(99, 0, 24, CmdFlag.PAYLOAD_LEN), 24, id="unknown-command-payload"),
        pytest.param(xreq(99, 0, 24), 0, id="unknown-command"),
        pytest.param(xreq(Cmd.TRIM, 0, 1 << 40), 0, id="huge-effect-length"),
        pytest.param(xreq(Cmd.BLOCK_STATUS, 0, 12, CmdFlag.PAYLOAD_LEN), 12, id="block-status"),
    ],
)
def test_payload_length_in_extended_mode(request_: Request, expected: int) -> None:
    assert make_tx(extended=True, contexts=True).payload_length(request_) == expected


def test_compact_write_beyond_drain_limit_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="beyond any limit"):
        make_tx().payload_length(req(Cmd.WRITE, 0, MAX_DRAIN + 1))


def test_extended_payload_beyond_drain_limit_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        make_tx(extended=True).payload_length(xreq(Cmd.WRITE, 0, 1 << 40, CmdFlag.PAYLOAD_LEN))


# ------------------------------------------------------------------ validation (§4.5)

RO = {"read_only": True}
NO_FUA = {"can_fua": False}
NO_FAST = {"can_fast_zero": False}


@pytest.mark.parametrize(
    ("export", "request_", "error", "errno"),
    [
        # unknown commands
        pytest.param({}, req(9), InvalidRequest, NbdErrno.EINVAL, id="unknown-command-9"),
        pytest.param({}, req(0xFFFF), InvalidRequest, NbdErrno.EINVAL, id="unknown-command-max"),
        pytest.param({}, req(Cmd.RESIZE, 2 * SIZE), InvalidRequest, NbdErrno.EINVAL, id="resize"),
        # unknown flags
        pytest.param(
            {}, req(Cmd.READ, 0, 512, 0x40), InvalidRequest, NbdErrno.EINVAL, id="unknown-flag-0x40"
        ),
        pytest.param(
            {},
            req(Cmd.READ, 0, 512, 0x8000),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="unknown-flag-0x8000",
        ),
        pytest.param(
            {},
            req(Cmd.WRITE, 0, 512, CmdFlag.PAYLOAD_LEN),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="payload-len-in-compact-mode",
        ),
        # flags on the wrong command
        pytest.param(
            {},
            req(Cmd.WRITE, 0, 512, CmdFlag.NO_HOLE),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="no-hole-on-write",
        ),
        pytest.param(
            {},
            req(Cmd.TRIM, 0, 512, CmdFlag.FAST_ZERO),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="fast-zero-on-trim",
        ),
        pytest.param(
            {},
            req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.REQ_ONE),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="req-one-on-write-zeroes",
        ),
        pytest.param(
            {},
            req(Cmd.READ, 0, 512, CmdFlag.REQ_ONE),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="req-one-on-read",
        ),
        pytest.param(
            {},
            req(Cmd.CACHE, 0, 512, CmdFlag.NO_HOLE),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="no-hole-on-cache",
        ),
        # flags not advertised
        pytest.param(
            NO_FUA,
            req(Cmd.WRITE, 0, 512, CmdFlag.FUA),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="fua-not-advertised",
        ),
        pytest.param(
            {},
            req(Cmd.READ, 0, 512, CmdFlag.DF),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="df-without-structured-replies",
        ),
        pytest.param(
            NO_FAST,
            req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="fast-zero-not-advertised",
        ),
        # commands not advertised
        pytest.param(
            {"can_flush": False},
            req(Cmd.FLUSH),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="flush-not-advertised",
        ),
        pytest.param(
            {"can_trim": False},
            req(Cmd.TRIM, 0, 512),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="trim-not-advertised",
        ),
        pytest.param(
            {"can_zero": False},
            req(Cmd.WRITE_ZEROES, 0, 512),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="write-zeroes-not-advertised",
        ),
        pytest.param(
            {"can_cache": False},
            req(Cmd.CACHE, 0, 512),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="cache-not-advertised",
        ),
        # read-only export
        pytest.param(
            RO, req(Cmd.WRITE, 0, 512), ReadOnlyExport, NbdErrno.EPERM, id="write-on-read-only"
        ),
        pytest.param(
            RO, req(Cmd.TRIM, 0, 512), ReadOnlyExport, NbdErrno.EPERM, id="trim-on-read-only"
        ),
        pytest.param(
            RO,
            req(Cmd.WRITE_ZEROES, 0, 512),
            ReadOnlyExport,
            NbdErrno.EPERM,
            id="write-zeroes-on-read-only",
        ),
        pytest.param(
            RO,
            req(Cmd.WRITE, SIZE, 512),
            ReadOnlyExport,
            NbdErrno.EPERM,
            id="out-of-range-write-on-read-only",
        ),
        # ranges
        pytest.param(
            {}, req(Cmd.READ, SIZE - 511, 512), InvalidRequest, NbdErrno.EINVAL, id="read-past-end"
        ),
        pytest.param(
            {},
            req(Cmd.READ, SIZE + 1, 0),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="empty-read-after-end",
        ),
        pytest.param(
            {}, req(Cmd.TRIM, SIZE, 1), InvalidRequest, NbdErrno.EINVAL, id="trim-past-end"
        ),
        pytest.param(
            {}, req(Cmd.CACHE, 0, SIZE + 1), InvalidRequest, NbdErrno.EINVAL, id="cache-past-end"
        ),
        pytest.param(
            {}, req(Cmd.WRITE, SIZE - 511, 512), OutOfSpace, NbdErrno.ENOSPC, id="write-past-end"
        ),
        pytest.param(
            {},
            req(Cmd.WRITE_ZEROES, SIZE, 4096),
            OutOfSpace,
            NbdErrno.ENOSPC,
            id="write-zeroes-past-end",
        ),
        pytest.param(
            {},
            req(Cmd.READ, U64_MAX, 2),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="read-offset-plus-length-overflows-64-bits",
        ),
        pytest.param(
            {},
            req(Cmd.WRITE, U64_MAX - 100, 512),
            OutOfSpace,
            NbdErrno.ENOSPC,
            id="write-offset-plus-length-overflows-64-bits",
        ),
        # sizes
        pytest.param(
            {"size": 1 << 30},
            req(Cmd.READ, 0, MIB32 + 1),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="read-beyond-max-payload",
        ),
        pytest.param(
            {"size": 1 << 30},
            req(Cmd.WRITE, 0, MIB32 + 1),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="write-beyond-max-payload",
        ),
        # FLUSH shape
        pytest.param(
            {}, req(Cmd.FLUSH, 512, 0), InvalidRequest, NbdErrno.EINVAL, id="flush-with-offset"
        ),
        pytest.param(
            {}, req(Cmd.FLUSH, 0, 512), InvalidRequest, NbdErrno.EINVAL, id="flush-with-length"
        ),
        # BLOCK_STATUS without a negotiated context
        pytest.param(
            {},
            req(Cmd.BLOCK_STATUS, 0, 512),
            InvalidRequest,
            NbdErrno.EINVAL,
            id="block-status-without-structured-replies",
        ),
    ],
)
def test_compact_request_fails_validation_with_errno(
    export: dict[str, object], request_: Request, error: type[CommandError], errno: NbdErrno
) -> None:
    tx = make_tx(**export)  # type: ignore[arg-type]
    with pytest.raises(error) as info:
        tx.validate(request_)
    assert info.value.errno == errno
    assert isinstance(info.value, CommandError)
    assert info.value.message


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(req(Cmd.READ, 0, 512), id="read"),
        pytest.param(req(Cmd.READ, SIZE - 512, 512), id="read-up-to-end"),
        pytest.param(req(Cmd.READ, 0, SIZE), id="read-whole-export"),
        pytest.param(req(Cmd.READ, SIZE, 0), id="empty-read-at-end"),
        pytest.param(req(Cmd.READ, 0, 0), id="empty-read"),
        pytest.param(req(Cmd.WRITE, 0, 0), id="empty-write"),
        pytest.param(req(Cmd.WRITE, 4096, 512, CmdFlag.FUA), id="write-fua"),
        pytest.param(req(Cmd.READ, 0, 512, CmdFlag.FUA), id="fua-on-read-is-accepted"),
        pytest.param(req(Cmd.FLUSH, 0, 0, CmdFlag.FUA), id="fua-on-flush-is-accepted"),
        pytest.param(req(Cmd.FLUSH), id="flush"),
        pytest.param(req(Cmd.TRIM, 0, SIZE), id="trim"),
        pytest.param(req(Cmd.CACHE, 0, SIZE), id="cache"),
        pytest.param(req(Cmd.WRITE_ZEROES, 0, SIZE, CmdFlag.NO_HOLE), id="zero-no-hole"),
        pytest.param(req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO), id="zero-fast"),
        pytest.param(req(Cmd.DISC), id="disc"),
    ],
)
def test_valid_compact_request_passes(request_: Request) -> None:
    assert make_tx().validate(request_) is None


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 0), (4096, 0), (0, 512), (SIZE + 1, 0), (U64_MAX, 2)]
)
def test_disc_with_any_offset_and_length_passes_validation(offset: int, length: int) -> None:
    # §4.5: "FLUSH/DISC with nonzero offset/length: NBD_EINVAL for FLUSH; DISC: just
    # disconnect" -- and DISC never gets a reply, so validation has nothing to refuse.
    assert make_tx().validate(req(Cmd.DISC, offset, length)) is None


def test_read_only_export_still_serves_reads_and_flush() -> None:
    tx = make_tx(read_only=True)
    assert tx.flags & TransmissionFlag.READ_ONLY
    tx.validate(req(Cmd.READ, 0, 512))
    tx.validate(req(Cmd.FLUSH))
    tx.validate(req(Cmd.CACHE, 0, 512))


def test_read_of_exactly_max_payload_is_served() -> None:
    make_tx(size=1 << 30).validate(req(Cmd.READ, 0, MIB32))


def test_read_beyond_max_payload_with_df_replies_eoverflow() -> None:
    tx = make_tx(size=1 << 30, structured=True)
    with pytest.raises(TooLarge) as info:
        tx.validate(req(Cmd.READ, 0, MIB32 + 1, CmdFlag.DF))
    assert info.value.errno == NbdErrno.EOVERFLOW


def test_df_read_with_structured_replies_passes() -> None:
    make_tx(structured=True).validate(req(Cmd.READ, 0, 65536, CmdFlag.DF))


def test_df_on_write_with_structured_replies_replies_einval() -> None:
    with pytest.raises(InvalidRequest):
        make_tx(structured=True).validate(req(Cmd.WRITE, 0, 512, CmdFlag.DF))


def test_block_status_without_contexts_replies_einval_even_with_structured_replies() -> None:
    with pytest.raises(InvalidRequest, match="context"):
        make_tx(structured=True).validate(req(Cmd.BLOCK_STATUS, 0, 512))


def test_block_status_with_context_passes() -> None:
    tx = make_tx(structured=True, contexts=True)
    tx.validate(req(Cmd.BLOCK_STATUS, 0, SIZE, CmdFlag.REQ_ONE))


def test_block_status_of_length_0_replies_einval() -> None:
    tx = make_tx(structured=True, contexts=True)
    with pytest.raises(InvalidRequest) as info:
        tx.validate(req(Cmd.BLOCK_STATUS, 4096, 0))
    assert info.value.errno == NbdErrno.EINVAL


def test_block_status_past_end_replies_einval() -> None:
    tx = make_tx(structured=True, contexts=True)
    with pytest.raises(InvalidRequest):
        tx.validate(req(Cmd.BLOCK_STATUS, SIZE - 1, 2))


def test_extended_write_without_payload_len_replies_einval() -> None:
    tx = make_tx(extended=True)
    with pytest.raises(InvalidRequest, match="PAYLOAD_LEN"):
        tx.validate(xreq(Cmd.WRITE, 0, 512))


def test_extended_write_with_payload_len_passes() -> None:
    make_tx(extended=True).validate(xreq(Cmd.WRITE, 0, 512, CmdFlag.PAYLOAD_LEN))


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.TRIM, Cmd.FLUSH, Cmd.CACHE, Cmd.WRITE_ZEROES])
def test_extended_payload_len_on_command_without_payload_form_replies_einval(cmd: Cmd) -> None:
    with pytest.raises(InvalidRequest):
        make_tx(extended=True).validate(xreq(cmd, 0, 8, CmdFlag.PAYLOAD_LEN))


def test_extended_unknown_flag_replies_einval() -> None:
    with pytest.raises(InvalidRequest):
        make_tx(extended=True).validate(xreq(Cmd.READ, 0, 512, 0x40))


def test_extended_effect_length_beyond_4gib_is_accepted_for_trim_and_zero() -> None:
    tx = make_tx(extended=True, size=1 << 40)
    tx.validate(xreq(Cmd.TRIM, 0, 1 << 33))
    tx.validate(xreq(Cmd.WRITE_ZEROES, 0, 1 << 33))
    tx.validate(xreq(Cmd.CACHE, 1 << 20, (1 << 40) - (1 << 20)))


def test_extended_offset_plus_length_overflowing_64_bits_replies_einval() -> None:
    tx = make_tx(extended=True)
    with pytest.raises(InvalidRequest):
        tx.validate(xreq(Cmd.TRIM, 1, U64_MAX))


def test_extended_write_zeroes_overflowing_64_bits_replies_enospc() -> None:
    tx = make_tx(extended=True)
    with pytest.raises(OutOfSpace):
        tx.validate(xreq(Cmd.WRITE_ZEROES, 4096, U64_MAX))


# ------------------------------------------------------------------ block status payload


def test_block_status_payload_selects_effect_length() -> None:
    tx = make_tx(extended=True, contexts=True)
    request_ = xreq(Cmd.BLOCK_STATUS, 4096, 12, CmdFlag.PAYLOAD_LEN)
    payload = struct.pack(">QI", 8192, 1)
    effective = tx.block_status_payload(request_, payload)
    assert effective == xreq(Cmd.BLOCK_STATUS, 4096, 8192, CmdFlag.PAYLOAD_LEN)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00" * 7, id="short"),
        pytest.param(struct.pack(">Q", 4096) + b"\x00\x00", id="ragged"),
        pytest.param(struct.pack(">QI", 4096, 2), id="unknown-id"),
        pytest.param(struct.pack(">QII", 4096, 1, 1), id="repeated-id"),
    ],
)
def test_bad_block_status_payload_replies_einval(payload: bytes) -> None:
    tx = make_tx(extended=True, contexts=True)
    request_ = xreq(Cmd.BLOCK_STATUS, 0, len(payload), CmdFlag.PAYLOAD_LEN)
    with pytest.raises(InvalidRequest):
        tx.block_status_payload(request_, payload)


def test_block_status_payload_without_advertising_it_replies_einval() -> None:
    tx = make_tx(structured=True, contexts=True)
    with pytest.raises(InvalidRequest, match="advertised"):
        tx.block_status_payload(req(Cmd.BLOCK_STATUS, 0, 12), struct.pack(">QI", 4096, 1))


# ------------------------------------------------------------------ reply encoders


def test_reply_ok_without_negotiation_is_a_simple_reply() -> None:
    assert make_tx().reply_ok(req(Cmd.WRITE, 0, 512, cookie=0x1234)) == bytes.fromhex(
        "67446698 00000000 0000000000001234"
    )


def test_reply_ok_with_structured_replies_is_still_simple() -> None:
    assert make_tx(structured=True).reply_ok(req(Cmd.FLUSH, cookie=9)) == bytes.fromhex(
        "67446698 00000000 0000000000000009"
    )


def test_reply_ok_with_extended_headers_is_a_none_chunk_with_done() -> None:
    reply = make_tx(extended=True).reply_ok(xreq(Cmd.TRIM, 8192, 4096, cookie=9))
    assert reply == bytes.fromhex(
        "6e8a278c 0001 0000 0000000000000009 0000000000002000 0000000000000000"
    )


def test_reply_error_without_negotiation_is_a_simple_reply_with_errno() -> None:
    tx = make_tx()
    reply = tx.reply_error(req(Cmd.READ, SIZE, 512, cookie=5), InvalidRequest("past the end"))
    assert reply == bytes.fromhex("67446698 00000016 0000000000000005")


def test_reply_error_with_structured_replies_is_an_error_chunk_with_message() -> None:
    tx = make_tx(structured=True)
    reply = tx.reply_error(req(Cmd.READ, 0, 512, cookie=5), ReadOnlyExport("nope"))
    assert reply == bytes.fromhex(
        "668e33ef 0001 8001 0000000000000005 0000000a 00000001 0004 6e6f7065"
    )


def test_reply_error_with_offset_is_an_error_offset_chunk() -> None:
    tx = make_tx(structured=True)
    error = InvalidRequest("bad", offset=0x2000)
    reply = tx.reply_error(req(Cmd.READ, 0x1000, 0x2000, cookie=5), error)
    assert reply == bytes.fromhex(
        "668e33ef 0001 8002 0000000000000005 00000011 00000016 0003 626164 0000000000002000"
    )


def test_reply_error_on_flush_drops_the_offset() -> None:
    tx = make_tx(structured=True)
    reply = tx.reply_error(req(Cmd.FLUSH, cookie=1), InvalidRequest("x", offset=0))
    assert struct.unpack_from(">IHHQI", reply) == (0x668E33EF, 1, 0x8001, 1, 7)


def test_reply_error_with_extended_headers_is_an_extended_error_chunk() -> None:
    tx = make_tx(extended=True)
    reply = tx.reply_error(xreq(Cmd.WRITE, 4096, 512, cookie=3), OutOfSpace("full"))
    assert reply == bytes.fromhex(
        "6e8a278c 0001 8001 0000000000000003 0000000000001000 000000000000000a"
        "0000001c 0004 66756c6c"
    )


def test_read_simple_header_is_a_success_simple_reply() -> None:
    assert make_tx().read_simple_header(req(Cmd.READ, 0, 512, cookie=2)) == bytes.fromhex(
        "67446698 00000000 0000000000000002"
    )


def test_data_chunk_header_bytes() -> None:
    header = make_tx(structured=True).data_chunk_header(
        req(Cmd.READ, 0, 8192, cookie=4), 4096, 4096, done=False
    )
    assert header == bytes.fromhex("668e33ef 0000 0001 0000000000000004 00001008 0000000000001000")


def test_hole_chunk_bytes() -> None:
    chunk = make_tx(structured=True).hole_chunk(
        req(Cmd.READ, 0, 1 << 21, cookie=4), 1 << 20, 1 << 20, done=True
    )
    assert chunk == bytes.fromhex(
        "668e33ef 0001 0002 0000000000000004 0000000c 0000000000100000 00100000"
    )


def test_extended_data_chunk_header_echoes_request_offset() -> None:
    header = make_tx(extended=True).data_chunk_header(
        xreq(Cmd.READ, 4096, 8192, cookie=4), 8192, 4096, done=True
    )
    assert header == bytes.fromhex(
        "6e8a278c 0001 0001 0000000000000004 0000000000001000 00000000000010080000000000002000"
    )


def test_done_chunk_bytes() -> None:
    assert make_tx(structured=True).done_chunk(req(Cmd.READ, cookie=4)) == bytes.fromhex(
        "668e33ef 0001 0000 0000000000000004 00000000"
    )


# ------------------------------------------------------------------ block status replies


def status_chunk(tx: Transmission, request_: Request, extents: list[Extent]) -> list[tuple]:
    """Parse the compact BLOCK_STATUS chunk (checking its header) into (length, flags)."""
    reply = tx.block_status_reply(request_, extents)
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", reply)
    assert (magic, flags, kind, cookie) == (0x668E33EF, 1, 5, request_.cookie)
    body = reply[20:]
    assert len(body) == length
    assert (length - 4) % 8 == 0
    assert struct.unpack_from(">I", body) == (1,)
    return [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((length - 4) // 8)]


BS_TX = make_tx(structured=True, contexts=True)


def test_block_status_reply_exact_bytes() -> None:
    extents = [Extent(0, 4096, DATA), Extent(4096, 4096, HOLE)]
    reply = BS_TX.block_status_reply(req(Cmd.BLOCK_STATUS, 0, 8192, cookie=6), extents)
    assert reply == bytes.fromhex(
        "668e33ef 0001 0005 0000000000000006 00000014 0000000100001000 00000000 00001000 00000003"
    )


def test_block_status_req_one_gives_exactly_one_extent_clipped_to_request() -> None:
    extents = [Extent(0, 65536, DATA), Extent(65536, 4096, HOLE)]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE), extents)
    assert got == [(4096, DATA)]


def test_block_status_req_one_with_many_extents_reports_only_the_first() -> None:
    extents = [Extent(4096, 4096, HOLE), Extent(8192, 4096, DATA), Extent(12288, 4096, HOLE)]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 4096, 12288, CmdFlag.REQ_ONE), extents)
    assert got == [(4096, HOLE)]


def test_block_status_merges_equal_neighbours() -> None:
    extents = [
        Extent(0, 4096, DATA),
        Extent(4096, 4096, DATA),
        Extent(8192, 512, HOLE),
        Extent(8704, 3584, HOLE),
        Extent(12288, 4096, DATA),
    ]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 0, 16384), extents)
    assert got == [(8192, DATA), (4096, HOLE), (4096, DATA)]


def test_block_status_clips_extents_to_the_request_end() -> None:
    extents = [Extent(0, 4096, DATA), Extent(4096, SIZE - 4096, HOLE)]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 0, 6000), extents)
    assert got == [(4096, DATA), (1904, HOLE)]


def test_block_status_ignores_extents_past_the_request_end() -> None:
    extents = [Extent(512, 512, DATA), Extent(1024, 512, HOLE), Extent(1536, 512, DATA)]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 512, 1024), extents)
    assert got == [(512, DATA), (512, HOLE)]


def test_block_status_with_no_extents_reports_one_data_extent_of_full_length() -> None:
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 4096, 12345), [])
    assert got == [(12345, DATA)]


def test_block_status_with_extents_not_starting_at_offset_reports_data() -> None:
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 4096, 4096), [Extent(0, 8192, HOLE)])
    assert got == [(4096, DATA)]


def test_block_status_stops_at_a_gap_in_the_extents() -> None:
    extents = [Extent(0, 4096, HOLE), Extent(8192, 4096, DATA)]
    got = status_chunk(BS_TX, req(Cmd.BLOCK_STATUS, 0, 12288), extents)
    assert got == [(4096, HOLE)]


def test_block_status_extended_form_exact_bytes() -> None:
    tx = make_tx(extended=True, contexts=True, size=1 << 40)
    extents = [Extent(4096, 1 << 33, HOLE), Extent(4096 + (1 << 33), 4096, DATA)]
    reply = tx.block_status_reply(xreq(Cmd.BLOCK_STATUS, 4096, (1 << 33) + 8192, cookie=2), extents)
    assert reply == bytes.fromhex(
        "6e8a278c 0001 0006 0000000000000002 0000000000001000 0000000000000028"
        "00000001 00000002"
        "0000000200000000 0000000000000003"
        "0000000000001000 0000000000000000"
    )


def test_block_status_extended_with_no_extents_reports_full_length() -> None:
    tx = make_tx(extended=True, contexts=True, size=1 << 40)
    reply = tx.block_status_reply(xreq(Cmd.BLOCK_STATUS, 0, 1 << 35, CmdFlag.REQ_ONE), [])
    assert reply[32:] == struct.pack(">IIQQ", 1, 1, 1 << 35, 0)


# ------------------------------------------------------------------ errno mapping


@pytest.mark.parametrize(
    ("host", "flags", "expected"),
    [
        (host_errno.EROFS, 0, NbdErrno.EPERM),
        (host_errno.EPERM, 0, NbdErrno.EPERM),
        (host_errno.EACCES, 0, NbdErrno.EPERM),
        (host_errno.ENOSPC, 0, NbdErrno.ENOSPC),
        (host_errno.EDQUOT, 0, NbdErrno.ENOSPC),
        (host_errno.EFBIG, 0, NbdErrno.ENOSPC),
        (host_errno.EINVAL, 0, NbdErrno.EINVAL),
        (host_errno.ENOMEM, 0, NbdErrno.ENOMEM),
        (host_errno.EOVERFLOW, 0, NbdErrno.EINVAL),
        (host_errno.EOVERFLOW, CmdFlag.DF, NbdErrno.EOVERFLOW),
        (host_errno.ENOTSUP, 0, NbdErrno.EINVAL),
        (host_errno.EOPNOTSUPP, CmdFlag.FUA, NbdErrno.EINVAL),
        (host_errno.ENOTSUP, CmdFlag.FAST_ZERO, NbdErrno.ENOTSUP),
        (host_errno.ESHUTDOWN, 0, NbdErrno.ESHUTDOWN),
        (host_errno.EIO, 0, NbdErrno.EIO),
        (host_errno.ENXIO, 0, NbdErrno.EIO),
        (host_errno.EBADF, 0, NbdErrno.EIO),
        (None, 0, NbdErrno.EIO),
    ],
)
def test_nbd_errno_maps_host_errors(host: int | None, flags: int, expected: NbdErrno) -> None:
    exc = OSError("no errno") if host is None else OSError(host, "boom")
    assert nbd_errno(exc, flags) is expected


def test_command_name_of_known_and_unknown_commands() -> None:
    assert command_name(Cmd.WRITE_ZEROES) == "WRITE_ZEROES"
    assert command_name(42) == "UNKNOWN_42"


# ------------------------------------------------------------------ the short path of small reads


def _header(cmd: int = Cmd.READ, offset: int = 4096, length: int = 4096, flags: int = 0,
            cookie: int = 9, magic: int = 0x25609513) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


def test_plain_request_takes_a_flagless_read_inside_the_export() -> None:
    buf = b"\xff" * 5 + _header(offset=8192, length=512, cookie=77)
    assert make_tx().plain_request(buf, 5) == (Cmd.READ, 77, 8192, 512)


def test_plain_request_takes_a_flagless_write_to_a_writable_export() -> None:
    header = _header(cmd=Cmd.WRITE, offset=SIZE - 100, length=100)
    assert make_tx().plain_request(header, 0) == (Cmd.WRITE, 9, SIZE - 100, 100)


def test_plain_request_leaves_a_write_to_a_read_only_export_to_the_general_path() -> None:
    assert make_tx(read_only=True).plain_request(_header(cmd=Cmd.WRITE), 0) is None
    assert make_tx(read_only=True).plain_request(_header(), 0) == (Cmd.READ, 9, 4096, 4096)


def test_plain_request_reaching_the_last_byte_is_taken() -> None:
    assert make_tx().plain_request(_header(offset=SIZE - 4096), 0) == (
        Cmd.READ, 9, SIZE - 4096, 4096)


@pytest.mark.parametrize(
    "header",
    [
        _header(cmd=Cmd.FLUSH, length=0),
        _header(cmd=Cmd.TRIM),
        _header(cmd=Cmd.BLOCK_STATUS),
        _header(cmd=Cmd.WRITE, flags=CmdFlag.FUA),
        _header(flags=CmdFlag.DF),
        _header(flags=CmdFlag.FUA),
        _header(flags=0x8000),  # unknown flag: the general path says EINVAL
        _header(length=0),
        _header(offset=SIZE - 4095),  # one byte past the end
        _header(offset=U64_MAX - 100),
        _header(magic=0x12345678),  # the general path calls it a protocol error
    ],
    ids=["flush", "trim", "block-status", "fua-write", "df", "fua", "unknown-flag", "empty",
         "past-end", "huge-offset", "bad-magic"],
)
def test_plain_request_leaves_everything_else_to_the_general_path(header: bytes) -> None:
    assert make_tx(structured=True).plain_request(header, 0) is None


def test_plain_request_takes_reads_and_writes_of_any_length_up_to_the_maximum_payload() -> None:
    """How large a plain request the server answers on its short path is its own choice
    (it splices large WRITE payloads); the core only vouches that the request is valid."""
    tx = make_tx(size=1 << 30)
    assert tx.plain_request(_header(offset=0, length=65536), 0) == (Cmd.READ, 9, 0, 65536)
    assert tx.plain_request(_header(offset=0, length=MIB32), 0) == (Cmd.READ, 9, 0, MIB32)
    assert tx.plain_request(_header(offset=0, length=MIB32 + 1), 0) is None
    assert tx.plain_request(_header(cmd=Cmd.WRITE, offset=0, length=MIB32), 0) == (
        Cmd.WRITE, 9, 0, MIB32)
    assert tx.plain_request(_header(cmd=Cmd.WRITE, offset=0, length=MIB32 + 1), 0) is None


def test_plain_request_never_applies_to_extended_headers() -> None:
    header = struct.pack(">IHHQQQ", 0x21E41C71, 0, Cmd.READ, 9, 0, 4096)
    assert make_tx(extended=True).plain_request(header, 0) is None


def test_plain_request_respects_a_smaller_maximum_payload() -> None:
    tx = make_tx(block_max=1024)
    assert tx.plain_request(_header(length=1024), 0) == (Cmd.READ, 9, 4096, 1024)
    assert tx.plain_request(_header(length=2048), 0) is None


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_whole_read_header_equals_the_general_paths_header(structured: bool) -> None:
    tx = make_tx(structured=structured)
    request = req(Cmd.READ, 8192, 4096, cookie=5)
    general = (tx.data_chunk_header(request, 8192, 4096, done=True) if structured
               else tx.read_simple_header(request))
    assert tx.whole_read_header(5, 8192, 4096) == general


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_plain_write_reply_equals_the_general_reply_ok(structured: bool) -> None:
    tx = make_tx(structured=structured)
    assert tx.plain_write_reply(12) == tx.reply_ok(req(Cmd.WRITE, 0, 512, cookie=12))


def test_whole_read_header_structured_bytes() -> None:
    assert make_tx(structured=True).whole_read_header(4, 4096, 4096) == bytes.fromhex(
        "668e33ef 0001 0001 0000000000000004 00001008 0000000000001000")


def test_plain_status_request_takes_qemu_imgs_one_extent_lookup() -> None:
    header = _header(cmd=Cmd.BLOCK_STATUS, offset=4096, length=SIZE - 4096,
                     flags=CmdFlag.REQ_ONE, cookie=3)
    assert BS_TX.plain_status_request(b"\xff" + header, 1) == (3, 4096, SIZE - 4096, True)
    assert BS_TX.plain_status_request(_header(cmd=Cmd.BLOCK_STATUS, offset=0, length=SIZE),
                                      0) == (9, 0, SIZE, False)


@pytest.mark.parametrize(
    ("tx", "header"),
    [
        (make_tx(structured=True), _header(cmd=Cmd.BLOCK_STATUS)),  # no context negotiated
        (BS_TX, _header(cmd=Cmd.BLOCK_STATUS, length=0)),
        (BS_TX, _header(cmd=Cmd.BLOCK_STATUS, offset=SIZE - 4095)),  # one byte past the end
        (BS_TX, _header(cmd=Cmd.BLOCK_STATUS, offset=U64_MAX - 100)),
        (BS_TX, _header(cmd=Cmd.BLOCK_STATUS, flags=CmdFlag.FUA)),  # the general path: EINVAL
        (BS_TX, _header(cmd=Cmd.BLOCK_STATUS, magic=0x12345678)),
        (BS_TX, _header(cmd=Cmd.READ)),
        (BS_TX, _header(cmd=Cmd.TRIM)),
        (make_tx(extended=True, contexts=True),
         struct.pack(">IHHQQQ", 0x21E41C71, 0, Cmd.BLOCK_STATUS, 9, 0, 4096)),
    ],
    ids=["no-context", "empty", "past-end", "huge-offset", "fua", "bad-magic", "read", "trim",
         "extended"],
)
def test_plain_status_request_leaves_everything_else_to_the_general_path(
        tx: Transmission, header: bytes) -> None:
    assert tx.plain_status_request(header, 0) is None


def test_plain_status_reply_of_one_descriptor_exact_bytes() -> None:
    reply = BS_TX.plain_status_reply(6, 4096, 65536, True, [Extent(4096, 1 << 30, 3)])
    assert reply == bytes.fromhex(
        "668e33ef 0001 0005 0000000000000006 0000000c 00000001 00010000 00000003")
