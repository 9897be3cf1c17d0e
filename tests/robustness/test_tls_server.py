"""The TLS data path and TLS life cycle of the in-process server, with Python's ssl as the
client: the batch loop over an SSLSocket, certificate rotation without dropping clients,
client identities, and TLS failures reported as refusals."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import wait_until
from nbdclient import NbdClient, pattern
from tlsutil import TestPki, make_test_pki, start_tls, write_server_dir

from nbdcore.protocol.constants import BASE_ALLOCATION, Cmd, CmdFlag, Opt, Rep
from nbdcore.tls import TlsSettings, server_context

from .helpers import MiB, Recorder, filled_memory, registry_of


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def context(server_dir: Path):
    return server_context(TlsSettings.from_directory(server_dir))


@pytest.fixture
def server(inprocess_server, recorder, pki):
    registry = registry_of(
        disk=(filled_memory(8 * MiB, data_bytes=2 * MiB), {"tls": "required"}),
        alice=(filled_memory(MiB), {"tls": "optional", "allowed_clients": ["alice"]}),
    )
    return inprocess_server(registry, observer=recorder, tls_context=context(pki.server_dir),
                            handshake_timeout_s=2.0)


def tls_client(port: int, client_dir: Path) -> NbdClient:
    client = NbdClient.connect(port)
    client.read_greeting()
    client.send_client_flags()
    start_tls(client, client_dir)
    return client


def tls_failure(port: int, client_dir: Path) -> Exception | None:
    """Try TLS and a GO with this client's certificate; the error the client saw."""
    client = NbdClient.connect(port)
    try:
        client.read_greeting()
        client.send_client_flags()
        start_tls(client, client_dir)
        client.opt_go("disk")  # TLS 1.3: a refused certificate shows on the next read
    except (OSError, AssertionError) as exc:
        return exc
    finally:
        client.close()
    return None


def only_refusal(recorder: Recorder):
    assert wait_until(lambda: recorder.of("refused"), 5)
    (info,) = recorder.of("refused")
    return info


def go_structured(client: NbdClient, export: str) -> None:
    assert client.opt_structured_reply().type == Rep.ACK
    assert client.opt_set_meta_context(export, [BASE_ALLOCATION])
    final, _ = client.opt_go(export)
    assert final.type == Rep.ACK, final


def test_data_path_over_tls_holes_pipelining_and_large_writes(server, pki) -> None:
    with tls_client(server.port, pki.client("alice")) as client:
        go_structured(client, "disk")
        # a read across data and hole: the hole comes back as a hole, not zeroes
        reply = client.read(MiB, 4 * MiB)
        assert reply.ok
        kinds = [c.type for c in reply.chunks]
        assert 2 in kinds  # NBD_REPLY_TYPE_OFFSET_HOLE
        assert reply.data() == pattern(0, 2 * MiB)[MiB:] + bytes(3 * MiB)
        # a large write in one request, read back in one
        blob = pattern(7, 3 * MiB)
        assert client.write(4 * MiB, blob).ok
        assert client.read(4 * MiB, 3 * MiB).data() == blob
        # many small requests pipelined behind a FLUSH (which runs in the pool): every
        # reply arrives although TLS may hold decrypted requests the socket poll cannot see
        cookies = [client.send(Cmd.FLUSH, 0, 0)]
        cookies += [client.send(Cmd.READ, i * 4096, 4096) for i in range(200)]
        cookies.append(client.send(Cmd.WRITE, 0, payload=pattern(3, 4096), flags=CmdFlag.FUA))
        replies = {r.cookie: r for r in client.recv_replies()}
        assert sorted(replies) == sorted(cookies)
        assert all(r.ok for r in replies.values())
        assert replies[cookies[5]].data() == pattern(0, 2 * MiB)[4 * 4096:5 * 4096]
        client.disconnect()


def test_client_names_and_serial_reach_the_observer(server, recorder, pki) -> None:
    with tls_client(server.port, pki.client("alice")) as client:
        go_structured(client, "alice")
        assert client.read(0, 4096).ok
        (info,) = server.connections()
        assert info.tls
        assert info.tls_names == ("alice",)
        assert info.tls_serial == pki.serials["alice"]
        assert info.record.tls_names == ["alice"]


def test_bob_is_refused_the_export_listing_only_alice(server, recorder, pki) -> None:
    with tls_client(server.port, pki.client("bob")) as client:
        final, _ = client.opt_go("alice")
        assert final.type == Rep.ERR_POLICY
        assert b"bob" in final.payload
    assert only_refusal(recorder).refusal_kind == "client_not_allowed"


def test_certificate_from_another_ca_fails_the_tls_handshake(server, recorder, pki) -> None:
    assert tls_failure(server.port, pki.client("stranger")) is not None
    info = only_refusal(recorder)
    assert info.refusal_kind == "tls_handshake"
    assert "certificate" in (info.refusal or "")


def test_revoked_certificate_fails_the_tls_handshake(server, recorder, pki) -> None:
    assert tls_failure(server.port, pki.client("revoked")) is not None
    info = only_refusal(recorder)
    assert info.refusal_kind == "tls_handshake"
    assert "revoked" in (info.refusal or "")


def test_garbage_instead_of_a_client_hello_is_a_tls_refusal(server, recorder) -> None:
    with NbdClient.connect(server.port) as client:
        client.read_greeting()
        client.send_client_flags()
        assert client.option(Opt.STARTTLS)[-1].type == Rep.ACK
        client.send_raw(b"this is not TLS at all" * 20)
        assert client.server_closed()
    assert only_refusal(recorder).refusal_kind == "tls_handshake"


def test_rotating_the_certificate_keeps_connected_clients(server, pki, tmp_path) -> None:
    new_cert, new_key = pki.ca.issue_server()
    rotated = write_server_dir(tmp_path / "rotated", pki.ca, new_cert, new_key)
    with tls_client(server.port, pki.client("alice")) as before:
        go_structured(before, "disk")
        old_der = before.sock.getpeercert(binary_form=True)
        server.set_tls(context(rotated), "optional")
        assert before.read(0, 65536).data() == pattern(0, 65536)  # still served
        with tls_client(server.port, pki.client("alice")) as after:
            new_der = after.sock.getpeercert(binary_form=True)
            go_structured(after, "disk")
            assert after.read(0, 4096).ok
        assert new_der != old_der
        assert int.from_bytes(new_der, "big") != 0
        assert before.write(0, pattern(0, 4096)).ok


def test_turning_tls_off_refuses_starttls_for_new_clients(server) -> None:
    server.set_tls(None, "off")
    with NbdClient.connect(server.port) as client:
        client.read_greeting()
        client.send_client_flags()
        assert client.option(Opt.STARTTLS)[-1].type == Rep.ERR_POLICY
    with pytest.raises(ValueError, match="needs a TLS context"):
        server.set_tls(None, "required")


def test_half_open_tls_handshakes_are_cut_off(server, recorder) -> None:
    """STARTTLS acknowledged, then silence: the handshake deadline still applies."""
    socks = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port))
        client = NbdClient(sock)
        client.read_greeting()
        client.send_client_flags()
        assert client.option(Opt.STARTTLS)[-1].type == Rep.ACK
        socks.append(sock)
    assert wait_until(lambda: len(recorder.of("refused")) == 5, timeout=8)
    assert {i.refusal_kind for i in recorder.of("refused")} == {"timeout"}
    for sock in socks:
        sock.close()
