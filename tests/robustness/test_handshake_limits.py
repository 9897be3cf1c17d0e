"""The handshake's protection: the negotiation deadline, connection limits, and many
half-open connections not keeping real clients waiting.

The engine runs as ``python -m nbdcore serve`` with TLS (a test PKI from tests/tlsutil.py),
as an appliance would; raw sockets play the slow and silent clients, and nbdinfo and
qemu-img the real ones. Times are only ever upper bounds used as timeouts (generous, for a
loaded CI machine), apart from "not before the limit" for the deadline itself.
"""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path

import pytest
from conftest import ServerProcess, make_sparse_image, require, wait_until
from nbdclient import NbdClient, ServerClosed
from tlsutil import TestPki, client_ssl_context, make_test_pki

from nbdcore.protocol import wire
from nbdcore.protocol.constants import IHAVEOPT, Opt, Rep

from .helpers import MiB, Recorder, registry_of

SIZE = 16 * MiB
HALF_OPEN = 200
STALLED_TLS = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_sparse_image(tmp_path / "disk.raw", SIZE, {0: b"first block" * 100})


def tls_server(serve, pki: TestPki, image: Path, *options: str) -> ServerProcess:
    return serve(image, "--export", "disk", "--tls-certificates", pki.server_dir, *options)


def nbds(server: ServerProcess, pki: TestPki) -> str:
    return (f"nbds://{server.host}:{server.port}/disk"
            f"?tls-certificates={pki.client('alice')}")


def real_clients_are_served(server: ServerProcess, pki: TestPki) -> None:
    """nbdinfo and qemu-img over TLS, and nbdinfo in clear text, all complete."""
    require("nbdinfo", "qemu-img")
    for cmd in (
        ["nbdinfo", "--size", nbds(server, pki)],
        ["nbdinfo", "--size", server.uri("disk")],
        ["qemu-img", "info", "--object",
         f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.client('alice')}", "--image-opts",
         f"driver=nbd,host={server.host},port={server.port},export=disk,tls-creds=tls0"],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{cmd[0]} failed: {result.stderr}"
        assert str(SIZE) in result.stdout, result.stdout


def greeted(server: ServerProcess) -> socket.socket:
    """A raw connection that has read the greeting and sent its flags."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.recv(wire.GREETING.size, socket.MSG_WAITALL)
    sock.sendall(wire.CLIENT_FLAGS.pack(3))
    return sock


def started_tls(server: ServerProcess) -> socket.socket:
    """A raw connection whose STARTTLS was acknowledged: the next bytes are TLS."""
    sock = greeted(server)
    sock.sendall(wire.OPTION_HEADER.pack(IHAVEOPT, Opt.STARTTLS, 0))
    reply = sock.recv(wire.OPTION_REPLY.size, socket.MSG_WAITALL)
    _, option, reply_type, length = wire.OPTION_REPLY.unpack(reply)
    assert (option, reply_type, length) == (Opt.STARTTLS, Rep.ACK, 0)
    return sock


def client_hello(pki: TestPki) -> bytes:
    """The bytes of a real TLS ClientHello (from Python's ssl, without a socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ssl_context(pki.client("alice")).wrap_bio(incoming, outgoing,
                                                           server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed this connection (anything it sent is read and dropped)."""
    while True:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True


def trickle_until_closed(sock: socket.socket, data: bytes, *, interval: float = 0.3,
                         give_up: float = 20.0) -> float:
    """Send ``data`` one byte every ``interval`` s (again and again) until the server
    closes; the seconds it took. The server must not answer anything meanwhile."""
    t0 = time.monotonic()
    for byte in cycle(data):
        if time.monotonic() - t0 > give_up:
            raise AssertionError(f"still open after {give_up} s of trickling")
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                answer = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - t0
            if not answer:
                return time.monotonic() - t0
            raise AssertionError(f"the server answered a half-sent message: {answer!r}")
        try:
            sock.send(bytes([byte]))
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
    raise AssertionError("unreachable")


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


# ------------------------------------------------------------------ the deadline


def test_silent_client_is_cut_off_at_the_handshake_timeout(serve, pki: TestPki,
                                                           image: Path) -> None:
    server = tls_server(serve, pki, image, "--handshake-timeout", "1")
    t0 = time.monotonic()
    with NbdClient.connect(server.port) as client:
        received = client.read_until_closed(timeout=20)  # TimeoutError if never closed
    elapsed = time.monotonic() - t0
    assert len(received) == wire.GREETING.size  # the greeting, then nothing but the close
    assert elapsed >= 0.9, f"closed after {elapsed:.2f} s, before the 1 s limit"
    real_clients_are_served(server, pki)


@pytest.mark.parametrize("stage", ["options", "tls"])
def test_trickling_client_is_cut_off_at_the_handshake_timeout(serve, pki: TestPki,
                                                              image: Path, stage: str) -> None:
    """A byte every 0.3 s keeps every single read short: only a deadline for the whole
    negotiation stops it. "options": an INFO option trickled in clear text; "tls": a
    ClientHello trickled after STARTTLS."""
    server = tls_server(serve, pki, image, "--handshake-timeout", "1")
    t0 = time.monotonic()
    if stage == "options":
        sock = greeted(server)
        payload = NbdClient.info_request("disk" * 200)
        data = wire.OPTION_HEADER.pack(IHAVEOPT, Opt.INFO, len(payload)) + payload
    else:
        sock = started_tls(server)
        data = client_hello(pki)
    with sock:
        trickle_until_closed(sock, data)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.9, f"closed after {elapsed:.2f} s, before the 1 s limit"
    real_clients_are_served(server, pki)


def test_a_handshake_timeout_is_recorded_as_a_refusal(inprocess_server,
                                                      pki: TestPki) -> None:
    """The observer hears why: connection_refused with refusal_kind "timeout"."""

    class Refusals(Recorder):
        def connection_refused(self, conn) -> None:  # type: ignore[no-untyped-def]
            self._add("refused", conn)

    from nbdcore.backends import MemoryBackend
    from nbdcore.tls import TlsSettings, server_context

    recorder = Refusals()
    context = server_context(TlsSettings.from_directory(pki.server_dir))
    server = inprocess_server(registry_of(disk=MemoryBackend(SIZE)), observer=recorder,
                              handshake_timeout_s=0.5, tls_context=context,
                              tls_mode="optional")
    with NbdClient.connect(server.port) as client:
        client.read_until_closed(timeout=20)
    assert wait_until(lambda: recorder.of("refused"), timeout=10)
    [refused] = recorder.of("refused")
    assert refused.refusal_kind == "timeout"
    assert refused.refusal


# ------------------------------------------------------------------ half-open connections


def test_half_open_connections_do_not_stop_real_clients(serve, pki: TestPki, image: Path,
                                                        sockets: list[socket.socket]) -> None:
    """200 connections that never say anything and 20 that start TLS and stall, all held
    open while nbdinfo and qemu-img connect: the real clients are served all the same."""
    server = tls_server(serve, pki, image, "--handshake-timeout", "120")
    for _ in range(HALF_OPEN):
        sockets.append(socket.create_connection((server.host, server.port), timeout=10))
    hello = client_hello(pki)
    for _ in range(STALLED_TLS):
        sock = started_tls(server)
        sock.sendall(hello[: len(hello) // 2])  # half a ClientHello, then silence
        sockets.append(sock)

    real_clients_are_served(server, pki)

    # They were served while the stalled ones were still there, not after a purge.
    still_open = [sock for sock in sockets if not is_closed(sock)]
    assert len(still_open) == HALF_OPEN + STALLED_TLS


# ------------------------------------------------------------------ connection limits


def test_global_connection_limit_closes_new_sockets(serve, pki: TestPki, image: Path,
                                                    sockets: list[socket.socket]) -> None:
    require("nbdinfo")
    server = tls_server(serve, pki, image, "--max-connections", "4")
    for _ in range(4):
        sockets.append(greeted(server))
    with NbdClient.connect(server.port) as extra:
        assert extra.read_until_closed(timeout=20) == b""  # closed without a greeting
    for sock in sockets:
        sock.close()
    # Once the server has seen them go, there is room again.
    assert wait_until(lambda: subprocess.run(["nbdinfo", "--size", nbds(server, pki)],
                                             capture_output=True).returncode == 0, timeout=20)


def test_export_connection_limit_answers_policy(serve, pki: TestPki, image: Path) -> None:
    require("nbdinfo")
    server = tls_server(serve, pki, image, "--export-max-connections", "1")
    with NbdClient.connect(server.port) as first:
        first.handshake("disk")
        assert first.read(0, 512).ok
        with NbdClient.connect(server.port) as second:
            second.read_greeting()
            second.send_client_flags()
            final, _ = second.opt_go("disk")
            assert final.type == Rep.ERR_POLICY, final
            assert b"limit" in final.payload
        refused = subprocess.run(["nbdinfo", "--size", nbds(server, pki)],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert "policy" in refused.stderr, refused.stderr
        first.disconnect()
        with pytest.raises(ServerClosed):
            first.recv_exact(1)
    assert wait_until(lambda: subprocess.run(["nbdinfo", "--size", nbds(server, pki)],
                                             capture_output=True).returncode == 0, timeout=20)
