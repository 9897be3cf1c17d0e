"""STARTTLS and access control in the sans-IO handshake: the three server modes
(NOTLS, SELECTIVETLS, FORCEDTLS), per-export TLS policy, client names and limits."""

from __future__ import annotations

import struct

import pytest
from handshake_client import (
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
from nbdcore.protocol.constants import Opt, Rep
from nbdcore.protocol.errors import RemoteProtocolError
from nbdcore.protocol.handshake import (
    NEED_DATA,
    Closed,
    ExportChosen,
    Handshake,
    HandshakeState,
    StartTls,
)

SIZE = 1 << 20
PEER = "127.0.0.1:40000"


def registry() -> ExportRegistry:
    return ExportRegistry([
        Export("open", MemoryBackend(SIZE)),
        Export("secure", MemoryBackend(SIZE), tls="required"),
        Export("alice-only", MemoryBackend(SIZE), tls="optional", allowed_clients=["alice"]),
        Export("one", MemoryBackend(SIZE), max_connections=1),
    ])


def start(tls_mode: str, catalog: ExportRegistry | None = None) -> Handshake:
    hs = Handshake(catalog or registry(), PEER, tls_mode=tls_mode)
    split_greeting(hs.data_to_send())
    assert drive(hs, struct.pack(">I", 0x3)) == [NEED_DATA]
    return hs


def answer(hs: Handshake, opt: int, data: bytes = b"") -> tuple[list[object], list[int]]:
    """Events of one option and the reply types it got."""
    events = drive(hs, option(opt, data))
    return events, [r.type for r in parse_option_replies(hs.data_to_send())]


def final_reply(hs: Handshake, opt: int, data: bytes = b"") -> int:
    events, types = answer(hs, opt, data)
    assert events == [NEED_DATA]
    return types[-1]


def starttls(hs: Handshake, names: tuple[str, ...] = ()) -> None:
    events, types = answer(hs, Opt.STARTTLS)
    assert events == [StartTls()]
    assert types == [Rep.ACK]
    assert hs.state is HandshakeState.STARTING_TLS
    hs.tls_started(names)
    assert hs.state is HandshakeState.OPTIONS


def listed(hs: Handshake) -> list[str]:
    _, out = drive(hs, option(Opt.LIST)), hs.data_to_send()
    return [r.payload[4:].decode() for r in parse_option_replies(out) if r.type == Rep.SERVER]


def go(hs: Handshake, name: str) -> object:
    events = drive(hs, option(Opt.GO, info_request(name)))
    hs.data_to_send()
    return events[-1]


# ------------------------------------------------------------------ NOTLS


def test_notls_refuses_starttls_with_policy_and_never_says_tls_required() -> None:
    hs = start("off")
    assert final_reply(hs, Opt.STARTTLS) == Rep.ERR_POLICY
    assert final_reply(hs, Opt.GO, info_request("secure")) == Rep.ERR_POLICY
    assert hs.refusal is not None
    assert hs.refusal.kind == "tls_required"
    assert "does not offer" in hs.refusal.reason
    assert isinstance(go(hs, "open"), ExportChosen)


# ------------------------------------------------------------------ SELECTIVETLS


def test_selective_serves_clear_text_and_says_tls_required_for_tls_only_exports() -> None:
    hs = start("optional")
    assert listed(hs) == ["open", "one"]  # TLS-only exports are not listed before TLS
    assert final_reply(hs, Opt.INFO, info_request("secure")) == Rep.ERR_TLS_REQD
    assert final_reply(hs, Opt.GO, info_request("alice-only")) == Rep.ERR_TLS_REQD
    assert hs.refusal is not None
    assert hs.refusal.kind == "tls_required"
    assert hs.refusal.export == "alice-only"
    # ERR_TLS_REQD is only for INFO/GO here: meta contexts get a policy error.
    assert final_reply(hs, Opt.STRUCTURED_REPLY) == Rep.ACK
    assert final_reply(hs, Opt.SET_META_CONTEXT,
                       meta_request("secure", ["base:allocation"])) == Rep.ERR_POLICY
    assert isinstance(go(hs, "open"), ExportChosen)
    assert hs.refusal is None  # the last export asked for was granted
    assert hs.record.tls is False


def test_starttls_resets_what_was_negotiated_before_it() -> None:
    hs = start("optional")
    assert final_reply(hs, Opt.STRUCTURED_REPLY) == Rep.ACK
    assert final_reply(hs, Opt.SET_META_CONTEXT,
                       meta_request("open", ["base:allocation"])) == Rep.ACK
    starttls(hs, ("alice",))
    event = go(hs, "open")
    assert isinstance(event, ExportChosen)
    assert event.negotiated.structured is False
    assert event.negotiated.contexts == {}
    assert hs.record.tls is True
    assert hs.record.tls_names == ["alice"]
    assert [o.name for o in hs.record.options] == [
        "STRUCTURED_REPLY", "SET_META_CONTEXT", "STARTTLS", "GO"]


def test_after_tls_the_tls_only_export_is_listed_and_served() -> None:
    hs = start("optional")
    starttls(hs)
    assert listed(hs) == ["open", "secure", "one"]
    assert isinstance(go(hs, "secure"), ExportChosen)


def test_second_starttls_and_starttls_with_data_are_invalid() -> None:
    hs = start("optional")
    assert final_reply(hs, Opt.STARTTLS, b"x") == Rep.ERR_INVALID
    starttls(hs)
    assert final_reply(hs, Opt.STARTTLS) == Rep.ERR_INVALID


def test_clear_text_bytes_after_starttls_are_a_protocol_error() -> None:
    """Only a man in the middle could put them there: the client waits for the ACK."""
    hs = start("optional")
    events = drive(hs, option(Opt.STARTTLS) + option(Opt.GO, info_request("open")))
    assert events == [StartTls()]
    with pytest.raises(RemoteProtocolError, match="clear-text"):
        hs.tls_started(())
    assert hs.state is HandshakeState.ERROR


def test_options_wait_while_tls_is_being_started() -> None:
    hs = start("optional")
    assert drive(hs, option(Opt.STARTTLS)) == [StartTls()]
    with pytest.raises(RemoteProtocolError, match="TLS handshake"):
        hs.next_event()


def test_client_names_are_checked_over_tls() -> None:
    hs = start("optional")
    starttls(hs, ("bob", "bob.example"))
    assert final_reply(hs, Opt.GO, info_request("alice-only")) == Rep.ERR_POLICY
    assert hs.refusal is not None
    assert hs.refusal.kind == "client_not_allowed"
    assert "bob" in hs.refusal.reason
    hs = start("optional")
    starttls(hs, ("alice",))
    assert isinstance(go(hs, "alice-only"), ExportChosen)


# ------------------------------------------------------------------ FORCEDTLS


@pytest.mark.parametrize(("opt", "data"), [
    (Opt.LIST, b""),
    (Opt.INFO, info_request("open")),
    (Opt.GO, info_request("open")),
    (Opt.STRUCTURED_REPLY, b""),
    (Opt.SET_META_CONTEXT, meta_request("open", ["base:allocation"])),
    (99, b"unknown option data"),
])
def test_forced_answers_tls_required_to_everything_but_starttls(opt: int, data: bytes) -> None:
    hs = start("required")
    assert final_reply(hs, opt, data) == Rep.ERR_TLS_REQD
    # the option's data was consumed: the next option is read correctly
    starttls(hs)
    assert isinstance(go(hs, "open"), ExportChosen)


def test_forced_export_name_before_tls_disconnects() -> None:
    hs = start("required")
    events = drive(hs, option(Opt.EXPORT_NAME, b"open"))
    assert isinstance(events[-1], Closed)
    assert hs.refusal is not None
    assert hs.refusal.kind == "tls_required"


def test_forced_lets_abort_through() -> None:
    hs = start("required")
    events, types = answer(hs, Opt.ABORT)
    assert isinstance(events[-1], Closed)
    assert types == [Rep.ACK]


def test_tls_required_is_never_sent_once_tls_is_up() -> None:
    hs = start("required")
    starttls(hs)
    for opt, data in [(Opt.LIST, b""), (Opt.INFO, info_request("nope")),
                      (Opt.GO, info_request("secure"))]:
        events = drive(hs, option(opt, data))
        replies = parse_option_replies(hs.data_to_send())
        assert all(r.type != Rep.ERR_TLS_REQD for r in replies)
        if isinstance(events[-1], ExportChosen):
            break


def test_clients_without_fixed_newstyle_cannot_start_tls() -> None:
    hs = Handshake(registry(), PEER, tls_mode="optional")
    hs.data_to_send()
    drive(hs, struct.pack(">I", 0x0))
    events = drive(hs, option(Opt.STARTTLS))
    assert events == [NEED_DATA]
    assert [r.type for r in parse_option_replies(hs.data_to_send())] == [Rep.ERR_INVALID]


# ------------------------------------------------------------------ limits


def test_export_connection_limit_refuses_with_policy_and_a_reason() -> None:
    exports = registry()
    one = exports.get("one")
    assert exports.attach(one)
    assert not exports.attach(one)  # the atomic check the server makes after GO
    hs = start("off", exports)
    events = drive(hs, option(Opt.GO, info_request("one")))
    assert events == [NEED_DATA]
    groups = group_replies(parse_option_replies(hs.data_to_send()))
    assert groups[-1][-1].type == Rep.ERR_POLICY
    assert b"limit of 1" in groups[-1][-1].payload
    assert hs.refusal is not None
    assert hs.refusal.kind == "limit"
    exports.detach(one)
    assert isinstance(go(hs, "one"), ExportChosen)


def test_unknown_tls_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="tls_mode"):
        Handshake(registry(), PEER, tls_mode="sometimes")


def test_hidden_exports_are_served_but_not_listed() -> None:
    exports = registry()
    exports.add(Export(".move-1f2e", MemoryBackend(SIZE), read_only=True, hidden=True))
    hs = start("off", exports)
    assert ".move-1f2e" not in listed(hs)
    assert isinstance(go(hs, ".move-1f2e"), ExportChosen)
