"""Each client the engine turns away is reported once, with a kind and a reason an operator
can read; clients that merely look around (LIST, then ABORT) are not refusals."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import wait_until
from nbdclient import NbdClient

from nbdcore.protocol.constants import Opt, Rep
from nbdcore.stats import ConnectionInfo

from .helpers import MiB, Recorder, filled_memory, registry_of


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(inprocess_server, recorder):
    registry = registry_of(
        disk=filled_memory(MiB),
        only=(filled_memory(MiB), {"max_connections": 1}),
        off=(filled_memory(MiB), {"enabled": False}),
    )
    return inprocess_server(registry, observer=recorder, handshake_timeout_s=1.0,
                            max_connections=8)


def refused(recorder: Recorder, count: int = 1) -> list[ConnectionInfo]:
    assert wait_until(lambda: len(recorder.of("refused")) >= count)
    return recorder.of("refused")


def negotiate(port: int) -> NbdClient:
    client = NbdClient.connect(port)
    client.read_greeting()
    client.send_client_flags(0x3)
    return client


def test_go_for_an_unknown_export_then_abort_is_a_refusal(server, recorder) -> None:
    with negotiate(server.port) as client:
        final, _ = client.opt_go("nope")
        assert final.type == Rep.ERR_UNKNOWN
        client.option(Opt.ABORT)
    (info,) = refused(recorder)
    assert info.refusal_kind == "unknown_export"
    assert "nope" in (info.refusal or "")
    assert info.requested_export == "nope"
    assert recorder.for_connection(info.id) == ["opened", "closed", "refused"]


def test_a_disabled_export_is_refused_as_disabled(server, recorder) -> None:
    with negotiate(server.port) as client:
        final, _ = client.opt_go("off")
        assert final.type == Rep.ERR_POLICY
    (info,) = refused(recorder)
    assert info.refusal_kind == "disabled"


def test_list_then_abort_is_not_a_refusal(server, recorder) -> None:
    with negotiate(server.port) as client:
        client.option(Opt.LIST)
        client.option(Opt.ABORT)
    assert wait_until(lambda: len(recorder.of("closed")) == 1)
    assert recorder.of("refused") == []


def test_a_refused_go_followed_by_a_granted_one_is_not_a_refusal(server, recorder) -> None:
    with negotiate(server.port) as client:
        assert client.opt_go("nope")[0].is_error
        assert not client.opt_go("disk")[0].is_error
    assert wait_until(lambda: len(recorder.of("closed")) == 1)
    assert recorder.of("refused") == []


def test_a_silent_client_is_cut_off_at_the_handshake_limit(server, recorder) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        greeting = sock.recv(18)
        assert len(greeting) == 18
        assert sock.recv(1) == b""  # the server closed it
        assert time.monotonic() - started < 4
    (info,) = refused(recorder)
    assert info.refusal_kind == "timeout"
    assert info.refusal == "handshake took too long"


def test_an_oversized_option_is_refused_without_being_read(inprocess_server, recorder) -> None:
    server = inprocess_server(registry_of(disk=filled_memory(MiB)), observer=recorder,
                              max_option_length=1024)
    with negotiate(server.port) as client:
        client.send_option(Opt.GO, b"", length=1025)
        assert client.server_closed()
    (info,) = refused(recorder)
    assert info.refusal_kind == "protocol"
    assert "1025" in (info.refusal or "")
    with NbdClient.connect(server.port) as client:  # the server goes on serving
        assert client.handshake("disk").size == MiB


def test_the_export_connection_limit_refuses_the_second_client(server, recorder) -> None:
    with NbdClient.connect(server.port) as first:
        first.handshake("only")
        with negotiate(server.port) as second:
            final, _ = second.opt_go("only")
            assert final.type == Rep.ERR_POLICY
            assert b"limit of 1" in final.payload
        (info,) = refused(recorder)
        assert info.refusal_kind == "limit"
        assert info.requested_export == "only"
    # once the first client leaves, the place is free again
    assert wait_until(lambda: server.registry.attached("only") == 0)
    with NbdClient.connect(server.port) as third:
        assert third.handshake("only").size == MiB


def test_beyond_the_global_limit_connections_are_closed_and_reported(server, recorder) -> None:
    clients = [negotiate(server.port) for _ in range(8)]
    try:
        assert wait_until(lambda: len(server.connections()) == 8)
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            extra.settimeout(5)
            assert extra.recv(18) == b""
        (info,) = refused(recorder)
        assert info.refusal_kind == "too_many_connections"
        assert "8" in (info.refusal or "")
        assert "opened" not in recorder.for_connection(info.id)
    finally:
        for client in clients:
            client.close()
