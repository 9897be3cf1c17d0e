"""The fixed-newstyle handshake, driven byte for byte by a tiny test-side client."""

from __future__ import annotations

import struct

import pytest
from handshake_client import (
    MalformedReply,
    OptionReply,
    drive,
    group_replies,
    info_request,
    meta_request,
    option,
    parse_option_replies,
    split_greeting,
)

from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import BASE_ALLOCATION, Info, Opt, Rep, TransmissionFlag
from nbdcore.protocol.errors import RemoteProtocolError
from nbdcore.protocol.exports import Client, ExportInfo, ExportRefused, ExportUnknown
from nbdcore.protocol.handshake import (
    MAX_OPTION_LENGTH,
    NEED_DATA,
    Closed,
    ExportChosen,
    Handshake,
    HandshakeState,
    Negotiated,
)

SIZE = 1 << 20
RO_SIZE = 2 << 20
MIB32 = 32 << 20
PEER = "127.0.0.1:40000"

# Transmission flags of a writable MemoryBackend export (flush, fua, trim, zero, fast zero,
# cache, multi-conn) and of a read-only one, before DF / BLOCK_STATUS_PAYLOAD are added.
RW_FLAGS = 0x0D6D
RO_FLAGS = 0x050F
DF = int(TransmissionFlag.SEND_DF)
BS_PAYLOAD = int(TransmissionFlag.BLOCK_STATUS_PAYLOAD)


def rep(opt: int, kind: int, payload: bytes = b"") -> bytes:
    """An option reply, packed independently of nbdcore.protocol.wire."""
    return struct.pack(">QIII", 0x0003E889045565A9, opt, kind, len(payload)) + payload


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", 0, size, flags)


BLOCK_SIZE_INFO = struct.pack(">HIII", 3, 1, 4096, MIB32)


def info_replies(opt: int, size: int, flags: int, *extra: bytes) -> bytes:
    """What INFO/GO answer on success: block sizes, export, extra infos, ACK."""
    out = rep(opt, Rep.INFO, BLOCK_SIZE_INFO) + rep(opt, Rep.INFO, info_export(size, flags))
    for payload in extra:
        out += rep(opt, Rep.INFO, payload)
    return out + rep(opt, Rep.ACK)


def make_registry() -> ExportRegistry:
    return ExportRegistry(
        [
            Export("disk", MemoryBackend(SIZE), description="the main disk"),
            Export("ro", MemoryBackend(RO_SIZE), description="read only", read_only=True),
            Export("off", MemoryBackend(SIZE), description="disabled", enabled=False),
        ]
    )


class AliasCatalog:
    """Default export "" is an alias of "disk"; "secret" exists but is always refused."""

    def list_exports(self, client: Client) -> list[tuple[str, str]]:
        return [("disk", "aliased")]

    def lookup(self, name: str, client: Client) -> ExportInfo:
        if name in ("", "disk"):
            return ExportInfo(name="disk", size=SIZE, description="aliased")
        if name == "secret":
            raise ExportRefused("not from your address")
        raise ExportUnknown(f"no export named {name!r}")


def start(catalog: object = None, flags: int = 0x3) -> Handshake:
    """A handshake past the greeting and the client flags, waiting for options."""
    hs = Handshake(catalog if catalog is not None else make_registry(), PEER)  # type: ignore[arg-type]
    split_greeting(hs.data_to_send())
    assert drive(hs, struct.pack(">I", flags)) == [NEED_DATA]
    assert hs.state is HandshakeState.OPTIONS
    return hs


def ask(hs: Handshake, opt: int, data: bytes = b"") -> tuple[list[object], bytes]:
    """Send one option; return the events it caused and the raw reply bytes."""
    events = drive(hs, option(opt, data))
    return events, hs.data_to_send()


def replies(hs: Handshake, opt: int, data: bytes = b"") -> list[OptionReply]:
    events, out = ask(hs, opt, data)
    assert events == [NEED_DATA]
    return parse_option_replies(out)


def go(hs: Handshake, name: str = "disk", infos: tuple[int, ...] = ()) -> Negotiated:
    events, out = ask(hs, Opt.GO, info_request(name, infos))
    assert len(events) == 1
    assert isinstance(events[0], ExportChosen), (events, out)
    assert hs.state is HandshakeState.TRANSMISSION
    groups = group_replies(parse_option_replies(out))
    assert len(groups) == 1
    assert groups[0][-1].type == Rep.ACK
    return events[0].negotiated


# ------------------------------------------------------------------ greeting and flags


def test_greeting_is_18_bytes_with_fixed_newstyle_and_no_zeroes() -> None:
    hs = Handshake(make_registry(), PEER)
    assert hs.data_to_send() == bytes.fromhex("4e42444d41474943 49484156454f5054 0003")
    assert hs.data_to_send() == b""
    assert hs.state is HandshakeState.CLIENT_FLAGS
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize("flags", [0x4, 0x7, 0x80000000, 0xFFFFFFFF])
def test_client_flags_with_unknown_bits_raise_and_leave_error_state(flags: int) -> None:
    hs = Handshake(make_registry(), PEER)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", flags))
    with pytest.raises(RemoteProtocolError, match="client flags"):
        hs.next_event()
    assert hs.state is HandshakeState.ERROR
    assert hs.record.client_flags == flags
    with pytest.raises(RemoteProtocolError):
        hs.next_event()
    assert hs.data_to_send() == b""


@pytest.mark.parametrize(
    ("flags", "fixed", "no_zeroes"),
    [(0x0, False, False), (0x1, True, False), (0x2, False, True), (0x3, True, True)],
)
def test_client_flags_are_recorded(flags: int, fixed: bool, no_zeroes: bool) -> None:
    hs = start(flags=flags)
    assert hs.record.client_flags == flags
    assert hs.record.fixed_newstyle is fixed
    assert hs.record.no_zeroes is no_zeroes


@pytest.mark.parametrize("opt", [Opt.LIST, Opt.GO, Opt.INFO, Opt.STRUCTURED_REPLY, 0x1234])
def test_non_fixed_client_gets_err_invalid_for_anything_but_export_name(opt: int) -> None:
    hs = start(flags=0)
    data = info_request("disk") if opt in (Opt.GO, Opt.INFO) else b""
    (reply,) = replies(hs, opt, data)
    assert reply.option == opt
    assert reply.type == Rep.ERR_INVALID
    assert hs.state is HandshakeState.OPTIONS


def test_non_fixed_client_can_use_export_name_with_padding() -> None:
    hs = start(flags=0)
    events, out = ask(hs, Opt.EXPORT_NAME, b"disk")
    assert isinstance(events[0], ExportChosen)
    assert out == struct.pack(">QH", SIZE, RW_FLAGS) + bytes(124)


# ------------------------------------------------------------------ EXPORT_NAME


def test_export_name_replies_134_bytes_without_no_zeroes() -> None:
    hs = start(flags=0x1)
    events, out = ask(hs, Opt.EXPORT_NAME, b"disk")
    assert len(out) == 134
    assert out == bytes.fromhex("0000000000100000 0d6d") + bytes(124)
    (event,) = events
    assert isinstance(event, ExportChosen)
    assert event.negotiated.export.name == "disk"
    assert event.negotiated.no_zeroes is False
    assert hs.state is HandshakeState.TRANSMISSION


def test_export_name_replies_10_bytes_with_no_zeroes() -> None:
    hs = start(flags=0x3)
    events, out = ask(hs, Opt.EXPORT_NAME, b"disk")
    assert out == bytes.fromhex("0000000000100000 0d6d")
    assert isinstance(events[0], ExportChosen)
    assert events[0].negotiated.no_zeroes is True


def test_export_name_after_structured_reply_advertises_df() -> None:
    hs = start()
    assert [r.type for r in replies(hs, Opt.STRUCTURED_REPLY)] == [Rep.ACK]
    events, out = ask(hs, Opt.EXPORT_NAME, b"ro")
    assert out == struct.pack(">QH", RO_SIZE, RO_FLAGS | DF)
    assert events[0].negotiated.structured is True


@pytest.mark.parametrize("name", [b"nosuch", b"off", b"bad\0name", b"\xff\xfe", b"x" * 4097])
def test_export_name_refused_closes_without_reply(name: bytes) -> None:
    hs = start()
    events, out = ask(hs, Opt.EXPORT_NAME, name)
    assert out == b""
    (event,) = events
    assert isinstance(event, Closed)
    assert hs.state is HandshakeState.CLOSED
    assert hs.record.options[-1].reply == "CLOSED"


def test_export_name_empty_selects_the_default_export() -> None:
    registry = make_registry()
    registry.add(Export("", MemoryBackend(4096)))
    hs = start(registry)
    events, out = ask(hs, Opt.EXPORT_NAME, b"")
    assert out == struct.pack(">QH", 4096, RW_FLAGS)
    assert events[0].negotiated.export.name == ""


def test_export_name_empty_without_default_export_closes() -> None:
    hs = start()
    events, _ = ask(hs, Opt.EXPORT_NAME, b"")
    assert isinstance(events[0], Closed)


def test_export_name_after_extended_headers_closes() -> None:
    hs = start()
    assert [r.type for r in replies(hs, Opt.EXTENDED_HEADERS)] == [Rep.ACK]
    events, out = ask(hs, Opt.EXPORT_NAME, b"disk")
    assert out == b""
    assert isinstance(events[0], Closed)
    assert hs.state is HandshakeState.CLOSED


def test_next_event_after_export_chosen_raises() -> None:
    hs = start()
    go(hs)
    with pytest.raises(RemoteProtocolError, match="over"):
        hs.next_event()


# ------------------------------------------------------------------ ABORT


def test_abort_acks_and_closes() -> None:
    hs = start()
    events, out = ask(hs, Opt.ABORT)
    assert out == bytes.fromhex("0003e889045565a9 00000002 00000001 00000000")
    (event,) = events
    assert isinstance(event, Closed)
    assert hs.state is HandshakeState.CLOSED


def test_abort_with_data_still_acks() -> None:
    hs = start()
    events, out = ask(hs, Opt.ABORT, b"ignored")
    assert out == rep(Opt.ABORT, Rep.ACK)
    assert isinstance(events[0], Closed)


# ------------------------------------------------------------------ LIST


def test_list_replies_one_server_per_visible_export_then_ack() -> None:
    hs = start()
    events, out = ask(hs, Opt.LIST)
    assert events == [NEED_DATA]
    assert out == (
        rep(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04disk" + b"the main disk")
        + rep(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x02ro" + b"read only")
        + rep(Opt.LIST, Rep.ACK)
    )


def test_list_with_data_replies_err_invalid_and_negotiation_continues() -> None:
    hs = start()
    (reply,) = replies(hs, Opt.LIST, b"xx")
    assert (reply.option, reply.type) == (Opt.LIST, Rep.ERR_INVALID)
    assert reply.payload  # a human-readable message
    assert [r.type for r in replies(hs, Opt.LIST)] == [Rep.SERVER, Rep.SERVER, Rep.ACK]


def test_list_of_empty_catalog_is_just_ack() -> None:
    hs = start(ExportRegistry())
    _, out = ask(hs, Opt.LIST)
    assert out == rep(Opt.LIST, Rep.ACK)


# ------------------------------------------------------------------ unknown options


@pytest.mark.parametrize("opt", [0x1234, 0xFFFFFFFF, 0, int(Opt.PEEK_EXPORT)])
def test_unknown_option_replies_err_unsup_consumes_data_and_continues(opt: int) -> None:
    hs = start()
    # The unknown option and a LIST arrive together: the LIST must be read in sync.
    events = drive(hs, option(opt, b"\xaa" * 37) + option(Opt.LIST))
    assert events == [NEED_DATA]
    groups = group_replies(parse_option_replies(hs.data_to_send()))
    assert [[(r.option, r.type) for r in g] for g in groups] == [
        [(opt, Rep.ERR_UNSUP)],
        [(Opt.LIST, Rep.SERVER), (Opt.LIST, Rep.SERVER), (Opt.LIST, Rep.ACK)],
    ]
    assert hs.record.options[0].reply == "ERR_UNSUP"
    assert hs.record.options[0].length == 37


def test_unknown_option_is_recorded_with_its_number() -> None:
    hs = start()
    replies(hs, 0x1234)
    assert hs.record.options[0].name == "UNKNOWN_4660"


def test_starttls_without_tls_replies_err_policy() -> None:
    hs = start()
    (reply,) = replies(hs, Opt.STARTTLS)
    assert reply.type == Rep.ERR_POLICY


def test_starttls_with_data_replies_err_invalid() -> None:
    hs = start()
    (reply,) = replies(hs, Opt.STARTTLS, b"x")
    assert reply.type == Rep.ERR_INVALID


# ------------------------------------------------------------------ INFO and GO


def test_info_sends_block_size_and_export_even_when_not_requested() -> None:
    hs = start()
    events, out = ask(hs, Opt.INFO, info_request("disk"))
    assert events == [NEED_DATA]
    assert out == info_replies(Opt.INFO, SIZE, RW_FLAGS)
    assert hs.state is HandshakeState.OPTIONS


def test_info_with_name_and_description_requested() -> None:
    hs = start()
    _, out = ask(hs, Opt.INFO, info_request("disk", (Info.NAME, Info.DESCRIPTION)))
    assert out == info_replies(
        Opt.INFO,
        SIZE,
        RW_FLAGS,
        b"\x00\x01disk",
        b"\x00\x02the main disk",
    )


def test_info_with_block_size_requested_sends_it_once() -> None:
    hs = start()
    got = replies(hs, Opt.INFO, info_request("disk", (Info.BLOCK_SIZE,)))
    block = [r for r in got if r.type == Rep.INFO and r.payload[:2] == b"\x00\x03"]
    assert [r.payload for r in block] == [BLOCK_SIZE_INFO]


def test_info_ignores_unknown_info_types() -> None:
    hs = start()
    _, out = ask(hs, Opt.INFO, info_request("disk", (0x7777, Info.EXPORT)))
    assert out == info_replies(Opt.INFO, SIZE, RW_FLAGS)


def test_info_for_default_export_names_the_canonical_export() -> None:
    hs = start(AliasCatalog())
    _, out = ask(hs, Opt.INFO, info_request("", (Info.NAME,)))
    assert out == info_replies(Opt.INFO, SIZE, RW_FLAGS, b"\x00\x01disk")


def test_info_then_go_return_the_same_information() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, info_out = ask(hs, Opt.INFO, info_request("disk", (Info.BLOCK_SIZE,)))
    events, go_out = ask(hs, Opt.GO, info_request("disk", (Info.BLOCK_SIZE,)))
    assert isinstance(events[0], ExportChosen)
    info_payloads = [(r.type, r.payload) for r in parse_option_replies(info_out)]
    go_payloads = [(r.type, r.payload) for r in parse_option_replies(go_out)]
    assert sorted(info_payloads) == sorted(go_payloads)


def test_go_chooses_export_with_no_padding_even_without_no_zeroes() -> None:
    hs = start(flags=0x1)
    events, out = ask(hs, Opt.GO, info_request("disk"))
    assert out == info_replies(Opt.GO, SIZE, RW_FLAGS)
    (event,) = events
    assert isinstance(event, ExportChosen)
    assert event.negotiated == Negotiated(
        export=make_registry().lookup("disk", Client(PEER)),
        flags=RW_FLAGS,
        structured=False,
        extended=False,
        contexts={},
        no_zeroes=False,
    )


def test_go_leaves_pipelined_transmission_bytes_buffered() -> None:
    hs = start()
    request = bytes.fromhex("25609513 0000 0000 0000000000000007 0000000000001000 00000200")
    hs.receive_data(option(Opt.GO, info_request("disk")) + request)
    assert isinstance(hs.next_event(), ExportChosen)
    assert hs.take_buffered() == request
    assert hs.take_buffered() == b""


def test_go_on_default_export_when_configured() -> None:
    registry = make_registry()
    registry.add(Export("", MemoryBackend(8192), description="default"))
    hs = start(registry)
    negotiated = go(hs, "")
    assert negotiated.export.name == ""
    assert negotiated.export.size == 8192
    assert hs.record.export_name == ""


def test_go_unknown_export_replies_err_unknown_and_state_is_unchanged() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    got = replies(hs, Opt.GO, info_request("nosuch"))
    assert [(r.option, r.type) for r in got] == [(Opt.GO, Rep.ERR_UNKNOWN)]
    assert hs.state is HandshakeState.OPTIONS
    assert go(hs).structured is True  # the structured-reply ACK survived the failed GO


def test_go_on_default_export_without_one_replies_err_unknown() -> None:
    hs = start()
    got = replies(hs, Opt.GO, info_request(""))
    assert [r.type for r in got] == [Rep.ERR_UNKNOWN]


def test_go_on_refused_export_replies_err_policy() -> None:
    hs = start(AliasCatalog())
    got = replies(hs, Opt.GO, info_request("secret"))
    assert [r.type for r in got] == [Rep.ERR_POLICY]
    assert got[0].payload == b"not from your address"


def test_go_on_disabled_export_replies_err_policy() -> None:
    hs = start()
    got = replies(hs, Opt.GO, info_request("off"))
    assert [r.type for r in got] == [Rep.ERR_POLICY]


def test_info_on_refused_export_replies_err_policy() -> None:
    hs = start(AliasCatalog())
    got = replies(hs, Opt.INFO, info_request("secret"))
    assert [r.type for r in got] == [Rep.ERR_POLICY]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00", id="truncated-name-length"),
        pytest.param(b"\x00\x00\x00\x04disk", id="no-info-count"),
        pytest.param(b"\x00\x00\x00\x04disk\x00", id="half-info-count"),
        pytest.param(b"\x00\x00\x00\x0adisk\x00\x00", id="name-past-end"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x01", id="missing-info-item"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00", id="trailing-byte"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x01\x00\x00\x00\x01", id="extra-info-item"),
        pytest.param(b"\x00\x00\x00\x04di\x00k\x00\x00", id="nul-in-name"),
        pytest.param(b"\x00\x00\x00\x02\xff\xfe\x00\x00", id="name-not-utf8"),
        pytest.param(struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00", id="name-too-long"),
    ],
)
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_and_go_with_bad_lengths_reply_err_invalid(opt: int, data: bytes) -> None:
    hs = start()
    got = replies(hs, opt, data)
    assert [(r.option, r.type) for r in got] == [(opt, Rep.ERR_INVALID)]
    assert hs.state is HandshakeState.OPTIONS
    go(hs)  # still in sync


def test_err_unknown_message_for_long_non_ascii_name_is_valid_utf8() -> None:
    # A legal 4096-byte name of two-byte characters: the error message quoting it must be
    # cut to <= 4096 bytes on a character boundary (strings on the wire are UTF-8).
    hs = start()
    _, out = ask(hs, Opt.GO, info_request("\u00e9" * 2048))
    (reply,) = parse_option_replies(out)  # MalformedReply if the message is not UTF-8
    assert reply.type == Rep.ERR_UNKNOWN


def test_parse_option_replies_rejects_broken_utf8_message() -> None:
    # The client checker itself must catch what the previous test looks for.
    with pytest.raises(MalformedReply, match="UTF-8"):
        parse_option_replies(rep(Opt.GO, Rep.ERR_UNKNOWN, b"abc\xc3"))


# ------------------------------------------------------------------ STRUCTURED / EXTENDED


def test_structured_reply_acks() -> None:
    hs = start()
    _, out = ask(hs, Opt.STRUCTURED_REPLY)
    assert out == rep(Opt.STRUCTURED_REPLY, Rep.ACK)
    assert go(hs).structured is True


def test_structured_reply_with_data_replies_err_invalid_and_is_not_negotiated() -> None:
    hs = start()
    got = replies(hs, Opt.STRUCTURED_REPLY, b"\x00")
    assert [r.type for r in got] == [Rep.ERR_INVALID]
    negotiated = go(hs)
    assert negotiated.structured is False
    assert not negotiated.flags & DF


def test_structured_reply_after_extended_headers_replies_ext_header_reqd() -> None:
    hs = start()
    replies(hs, Opt.EXTENDED_HEADERS)
    got = replies(hs, Opt.STRUCTURED_REPLY)
    assert [(r.option, r.type) for r in got] == [(Opt.STRUCTURED_REPLY, Rep.ERR_EXT_HEADER_REQD)]
    negotiated = go(hs)
    assert (negotiated.structured, negotiated.extended) == (True, True)


def test_extended_headers_after_structured_reply_acks() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, out = ask(hs, Opt.EXTENDED_HEADERS)
    assert out == rep(Opt.EXTENDED_HEADERS, Rep.ACK)
    negotiated = go(hs)
    assert (negotiated.structured, negotiated.extended) == (True, True)


def test_extended_headers_with_data_replies_err_invalid() -> None:
    hs = start()
    got = replies(hs, Opt.EXTENDED_HEADERS, b"\x01")
    assert [r.type for r in got] == [Rep.ERR_INVALID]
    assert go(hs).extended is False


# ------------------------------------------------------------------ meta contexts


@pytest.mark.parametrize(
    "queries",
    [pytest.param((), id="no-queries"), ("base:",), ("base:allocation",)],
)
def test_list_meta_context_reports_base_allocation_with_id_0(queries: tuple[str, ...]) -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, out = ask(hs, Opt.LIST_META_CONTEXT, meta_request("disk", queries))
    assert out == (
        rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x00base:allocation")
        + rep(Opt.LIST_META_CONTEXT, Rep.ACK)
    )


@pytest.mark.parametrize(
    "queries", [("qemu:dirty-bitmap:",), ("x-foo:bar",), ("base:nosuchleaf",), ("qemu:",)]
)
def test_list_meta_context_ignores_unknown_queries(queries: tuple[str, ...]) -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, out = ask(hs, Opt.LIST_META_CONTEXT, meta_request("disk", queries))
    assert out == rep(Opt.LIST_META_CONTEXT, Rep.ACK)


def test_list_meta_context_is_allowed_before_structured_reply() -> None:
    hs = start()
    got = replies(hs, Opt.LIST_META_CONTEXT, meta_request("disk"))
    assert [r.type for r in got] == [Rep.META_CONTEXT, Rep.ACK]


def test_list_meta_context_unknown_export_replies_err_unknown() -> None:
    hs = start()
    got = replies(hs, Opt.LIST_META_CONTEXT, meta_request("nosuch"))
    assert [r.type for r in got] == [Rep.ERR_UNKNOWN]


def test_list_meta_context_query_without_namespace_replies_err_invalid() -> None:
    hs = start()
    got = replies(hs, Opt.LIST_META_CONTEXT, meta_request("disk", ("allocation",)))
    assert [r.type for r in got] == [Rep.ERR_INVALID]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x00\x00\x04disk", id="no-query-count"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00\x01", id="missing-query"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00\x01\x00\x00\x00\x09base:", id="past-end"),
        pytest.param(b"\x00\x00\x00\x04disk\x00\x00\x00\x00\x00", id="trailing-byte"),
    ],
)
@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_with_bad_lengths_replies_err_invalid(opt: int, data: bytes) -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    got = replies(hs, opt, data)
    assert [(r.option, r.type) for r in got] == [(opt, Rep.ERR_INVALID)]


def test_set_meta_context_before_structured_reply_replies_err_invalid() -> None:
    hs = start()
    got = replies(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    assert [r.type for r in got] == [Rep.ERR_INVALID]
    assert go(hs).contexts == {}


def test_set_meta_context_selects_base_allocation_with_id_1() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, out = ask(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    assert out == (
        rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x01base:allocation")
        + rep(Opt.SET_META_CONTEXT, Rep.ACK)
    )
    negotiated = go(hs)
    assert negotiated.contexts == {1: BASE_ALLOCATION}
    assert hs.record.meta_contexts == [BASE_ALLOCATION]


def test_set_meta_context_with_base_namespace_only_selects_nothing() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    _, out = ask(hs, Opt.SET_META_CONTEXT, meta_request("disk", ("base:", "qemu:x")))
    assert out == rep(Opt.SET_META_CONTEXT, Rep.ACK)
    assert go(hs).contexts == {}


def test_set_meta_context_then_go_on_another_export_drops_contexts() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    replies(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    negotiated = go(hs, "ro")
    assert negotiated.contexts == {}
    assert hs.record.meta_contexts == []


def test_set_meta_context_on_default_alias_counts_for_canonical_export() -> None:
    hs = start(AliasCatalog())
    replies(hs, Opt.STRUCTURED_REPLY)
    replies(hs, Opt.SET_META_CONTEXT, meta_request("", (BASE_ALLOCATION,)))
    assert go(hs, "disk").contexts == {1: BASE_ALLOCATION}


def test_second_set_meta_context_replaces_the_selection() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    replies(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    got = replies(hs, Opt.SET_META_CONTEXT, meta_request("disk"))
    assert [r.type for r in got] == [Rep.ACK]
    assert go(hs).contexts == {}


def test_failed_set_meta_context_clears_the_selection() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    replies(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    got = replies(hs, Opt.SET_META_CONTEXT, meta_request("nosuch", (BASE_ALLOCATION,)))
    assert [r.type for r in got] == [Rep.ERR_UNKNOWN]
    assert go(hs).contexts == {}


def test_set_meta_context_on_refused_export_replies_err_policy() -> None:
    hs = start(AliasCatalog())
    replies(hs, Opt.STRUCTURED_REPLY)
    got = replies(hs, Opt.SET_META_CONTEXT, meta_request("secret", (BASE_ALLOCATION,)))
    assert [r.type for r in got] == [Rep.ERR_POLICY]


# ------------------------------------------------------------------ transmission flags


def test_transmission_flags_without_structured_replies_have_no_df() -> None:
    assert go(start()).flags == RW_FLAGS


def test_transmission_flags_with_structured_replies_add_df() -> None:
    hs = start()
    replies(hs, Opt.STRUCTURED_REPLY)
    assert go(hs).flags == RW_FLAGS | DF == 0x0DED


def test_transmission_flags_of_read_only_export() -> None:
    negotiated = go(start(), "ro")
    assert negotiated.flags == RO_FLAGS
    assert negotiated.flags & TransmissionFlag.READ_ONLY
    assert not negotiated.flags & (
        TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
        | TransmissionFlag.SEND_FAST_ZERO
    )


def test_block_status_payload_flag_needs_extended_headers_and_contexts() -> None:
    select = meta_request("disk", (BASE_ALLOCATION,))
    structured_with_contexts = start()
    replies(structured_with_contexts, Opt.STRUCTURED_REPLY)
    replies(structured_with_contexts, Opt.SET_META_CONTEXT, select)
    assert go(structured_with_contexts).flags == RW_FLAGS | DF

    extended_without_contexts = start()
    replies(extended_without_contexts, Opt.EXTENDED_HEADERS)
    assert go(extended_without_contexts).flags == RW_FLAGS | DF

    extended_with_contexts = start()
    replies(extended_with_contexts, Opt.EXTENDED_HEADERS)
    replies(extended_with_contexts, Opt.SET_META_CONTEXT, select)
    negotiated = go(extended_with_contexts)
    assert negotiated.flags == RW_FLAGS | DF | BS_PAYLOAD == 0x1DED
    assert negotiated.contexts == {1: BASE_ALLOCATION}


def test_fast_zero_is_never_advertised_without_write_zeroes() -> None:
    export = ExportInfo(name="x", size=SIZE, can_zero=False, can_fast_zero=True)
    flags = export.transmission_flags(structured=True, extended=False, contexts=False)
    assert not flags & TransmissionFlag.SEND_WRITE_ZEROES
    assert not flags & TransmissionFlag.SEND_FAST_ZERO


def test_multi_conn_follows_the_export_but_read_only_always_has_it() -> None:
    def flags(**kw: bool) -> int:
        export = ExportInfo(name="x", size=SIZE, **kw)
        return export.transmission_flags(structured=False, extended=False, contexts=False)

    assert flags(multi_conn=True) & TransmissionFlag.CAN_MULTI_CONN
    assert not flags(multi_conn=False) & TransmissionFlag.CAN_MULTI_CONN
    assert flags(multi_conn=False, read_only=True) & TransmissionFlag.CAN_MULTI_CONN


def test_transmission_flags_always_have_has_flags_and_never_resize() -> None:
    export = ExportInfo(
        name="x",
        size=SIZE,
        can_flush=False,
        can_fua=False,
        can_trim=False,
        can_zero=False,
        can_cache=False,
        multi_conn=False,
    )
    assert export.transmission_flags(structured=False, extended=False, contexts=False) == 0x1
    every = ExportInfo(name="x", size=SIZE)
    assert not every.transmission_flags(structured=True, extended=True, contexts=True) & (
        TransmissionFlag.SEND_RESIZE | TransmissionFlag.ROTATIONAL
    )


def test_info_export_flags_match_the_go_flags() -> None:
    hs = start()
    replies(hs, Opt.EXTENDED_HEADERS)
    replies(hs, Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    got = replies(hs, Opt.INFO, info_request("disk"))
    export_info = next(r.payload for r in got if r.payload[:2] == b"\x00\x00")
    assert export_info == info_export(SIZE, RW_FLAGS | DF | BS_PAYLOAD)


# ------------------------------------------------------------------ framing violations


def test_option_longer_than_64k_raises_without_waiting_for_its_data() -> None:
    hs = start()
    hs.receive_data(struct.pack(">QII", 0x49484156454F5054, Opt.LIST, MAX_OPTION_LENGTH + 1))
    with pytest.raises(RemoteProtocolError, match="bytes of data"):
        hs.next_event()
    assert hs.state is HandshakeState.ERROR
    assert hs.data_to_send() == b""


def test_option_of_exactly_64k_is_read_and_answered() -> None:
    hs = start()
    assert MAX_OPTION_LENGTH == 64 * 1024
    hs.receive_data(struct.pack(">QII", 0x49484156454F5054, 0x99, MAX_OPTION_LENGTH))
    assert hs.next_event() is NEED_DATA
    events = drive(hs, bytes(MAX_OPTION_LENGTH))
    assert events == [NEED_DATA]
    assert [r.type for r in parse_option_replies(hs.data_to_send())] == [Rep.ERR_UNSUP]


@pytest.mark.parametrize("magic", [0, 0x49484156454F5055, 0x0003E889045565A9])
def test_bad_option_magic_raises(magic: int) -> None:
    hs = start()
    hs.receive_data(option(Opt.LIST, magic=magic))
    with pytest.raises(RemoteProtocolError, match="magic"):
        hs.next_event()
    assert hs.state is HandshakeState.ERROR


def test_too_many_options_raise() -> None:
    hs = Handshake(make_registry(), PEER, max_options=3)
    hs.receive_data(struct.pack(">I", 3) + option(0x99) * 3)
    assert hs.next_event() is NEED_DATA
    hs.receive_data(option(0x99))
    with pytest.raises(RemoteProtocolError, match="options"):
        hs.next_event()
    assert hs.state is HandshakeState.ERROR


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"", id="before-flags"),
        pytest.param(b"\x00\x00", id="mid-flags"),
        pytest.param(b"\x00\x00\x00\x03", id="after-flags"),
        pytest.param(b"\x00\x00\x00\x03IHAVE", id="mid-option-header"),
        pytest.param(b"\x00\x00\x00\x03" + option(0x99, b"abcdef")[:-2], id="mid-option-data"),
    ],
)
def test_eof_mid_handshake_is_closed(prefix: bytes) -> None:
    hs = Handshake(make_registry(), PEER)
    hs.data_to_send()
    events = drive(hs, prefix, eof=True)
    assert len(events) == 1
    assert isinstance(events[0], Closed)
    assert hs.state is HandshakeState.CLOSED
    assert hs.data_to_send() == b""


def test_shutting_down_replies_err_shutdown_but_abort_still_acks() -> None:
    hs = start()
    hs.shutting_down = True
    got = replies(hs, Opt.GO, info_request("disk"))
    assert [r.type for r in got] == [Rep.ERR_SHUTDOWN]
    events, out = ask(hs, Opt.ABORT)
    assert out == rep(Opt.ABORT, Rep.ACK)
    assert isinstance(events[0], Closed)


def test_shutting_down_export_name_closes() -> None:
    hs = start()
    hs.shutting_down = True
    events, out = ask(hs, Opt.EXPORT_NAME, b"disk")
    assert out == b""
    assert isinstance(events[0], Closed)


# ------------------------------------------------------------------ feeding and the record

SESSION = (
    struct.pack(">I", 3)
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.LIST)
    + option(0x4242, b"junk")
    + option(Opt.LIST_META_CONTEXT, meta_request("disk"))
    + option(Opt.SET_META_CONTEXT, meta_request("disk", (BASE_ALLOCATION,)))
    + option(Opt.INFO, info_request("nosuch"))
    + option(Opt.INFO, info_request("disk", (Info.NAME,)))
    + option(Opt.GO, info_request("disk", (Info.BLOCK_SIZE, Info.DESCRIPTION)))
    + bytes.fromhex("25609513 0000 0003 0000000000000001 0000000000000000 00000000")
)


def _run_session(chunks: list[bytes]) -> tuple[list[object], bytes, Handshake]:
    hs = Handshake(make_registry(), PEER)
    out = hs.data_to_send()
    events: list[object] = []
    for chunk in chunks:
        hs.receive_data(chunk)
        while True:
            event = hs.next_event()
            events.append(event)
            out += hs.data_to_send()
            if event is NEED_DATA or isinstance(event, ExportChosen | Closed):
                break
        if isinstance(events[-1], ExportChosen):
            break
    return events, out, hs


def test_byte_at_a_time_feeding_gives_the_same_result_as_one_feed() -> None:
    whole_events, whole_out, whole = _run_session([SESSION])
    split_events, split_out, split = _run_session([SESSION[i : i + 1] for i in range(len(SESSION))])
    assert isinstance(whole_events[-1], ExportChosen)
    assert [e for e in split_events if e is not NEED_DATA] == whole_events
    assert split_out == whole_out
    assert split.record == whole.record
    assert whole.take_buffered() == SESSION[-28:]
    # Byte at a time stops at the ExportChosen: nothing past the GO was fed.
    assert split.take_buffered() == b""


def test_session_reply_stream_is_well_formed_and_in_option_order() -> None:
    events, out, hs = _run_session([SESSION])
    flags, rest = split_greeting(out)
    assert flags == 0x3
    groups = group_replies(parse_option_replies(rest))
    assert [g[0].option for g in groups] == [o.option for o in hs.record.options]
    assert [[r.type for r in g] for g in groups] == [
        [Rep.ACK],
        [Rep.SERVER, Rep.SERVER, Rep.ACK],
        [Rep.ERR_UNSUP],
        [Rep.META_CONTEXT, Rep.ACK],
        [Rep.META_CONTEXT, Rep.ACK],
        [Rep.ERR_UNKNOWN],
        [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK],
        [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK],
    ]
    assert isinstance(events[-1], ExportChosen)


def test_negotiation_record_after_go() -> None:
    _, _, hs = _run_session([SESSION])
    record = hs.record
    assert [(o.name, o.reply, o.export) for o in record.options] == [
        ("STRUCTURED_REPLY", "ACK", None),
        ("LIST", "ACK", None),
        ("UNKNOWN_16962", "ERR_UNSUP", None),
        ("LIST_META_CONTEXT", "ACK", "disk"),
        ("SET_META_CONTEXT", "ACK", "disk"),
        ("INFO", "ERR_UNKNOWN", "nosuch"),
        ("INFO", "ACK", "disk"),
        ("GO", "ACK", "disk"),
    ]
    assert [o.option for o in record.options] == [8, 3, 0x4242, 9, 10, 6, 6, 7]
    assert record.peer == PEER
    assert record.client_flags == 3
    assert record.fixed_newstyle is True
    assert record.no_zeroes is True
    assert record.structured_replies is True
    assert record.extended_headers is False
    assert record.meta_contexts == [BASE_ALLOCATION]
    assert record.export_name == "disk"
    assert record.via == "GO"
    assert record.info_requests == [Info.BLOCK_SIZE, Info.DESCRIPTION]
    assert record.block_size_requested is True
    assert record.block_size == (1, 4096, MIB32)
    assert record.transmission_flags == RW_FLAGS | DF
    assert record.tls is False
    as_dict = record.to_dict()
    assert as_dict["export_name"] == "disk"
    assert as_dict["options"][0] == {
        "option": 8,
        "name": "STRUCTURED_REPLY",
        "length": 0,
        "reply": "ACK",
        "export": None,
    }


def test_negotiation_record_after_export_name() -> None:
    hs = start(flags=0x1)
    ask(hs, Opt.EXPORT_NAME, b"ro")
    record = hs.record
    assert record.via == "EXPORT_NAME"
    assert record.export_name == "ro"
    assert [(o.name, o.reply, o.export) for o in record.options] == [
        ("EXPORT_NAME", "EXPORT", "ro")
    ]
    assert record.structured_replies is False
    assert record.meta_contexts == []
    assert record.block_size_requested is False
    assert record.block_size == (1, 4096, MIB32)
    assert record.transmission_flags == RO_FLAGS


def test_negotiation_record_of_go_without_block_size_request() -> None:
    hs = start()
    go(hs, "disk", (Info.NAME,))
    assert hs.record.block_size_requested is False
    assert hs.record.info_requests == [Info.NAME]


# ------------------------------------------------------------------ string limits on the wire


def _long_description_registry() -> ExportRegistry:
    # 3000 two-byte characters: 6000 bytes, over the 4096-byte MUST of the standard.
    return ExportRegistry([Export("disk", MemoryBackend(SIZE), description="\u00e9" * 3000)])


def test_list_never_sends_a_description_over_4096_bytes() -> None:
    hs = start(_long_description_registry())
    _, out = ask(hs, Opt.LIST)
    got = parse_option_replies(out)  # MalformedReply on a string over 4096 bytes
    assert [r.type for r in got] == [Rep.SERVER, Rep.ACK]
    assert got[0].payload[:8] == b"\x00\x00\x00\x04disk"


def test_info_never_sends_a_description_over_4096_bytes() -> None:
    hs = start(_long_description_registry())
    _, out = ask(hs, Opt.INFO, info_request("disk", (Info.DESCRIPTION,)))
    got = parse_option_replies(out)  # MalformedReply on a string over 4096 bytes
    assert [r.type for r in got] == [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK]
