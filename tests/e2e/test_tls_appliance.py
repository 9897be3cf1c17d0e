"""TLS managed by the appliance, end to end: the run command's engine serves STARTTLS with
the certificates the appliance created; a client certificate issued through the API lets
real clients in; refusals are recorded with their reason; revoking a certificate shuts
its client out (also a connected one); rotating the server certificate keeps connected
clients."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SYSTEM_PYTHON, require, require_libnbd_python, wait_until
from nbdclient import NbdClient, pattern
from tlsutil import start_tls

from .stack import Stack, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.interop]
MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require("redis-server", "nbdinfo", "qemu-img")
    running = start_stack(tmp_path_factory.mktemp("tls-appliance"))
    yield running
    assert running.stop() == 0, running.log("worker")[-2000:]


def nbd_port(stack: Stack) -> int:
    return int(stack.demo_uri.rsplit(":", 1)[1].split("/")[0])


def issue(stack: Stack, name: str, directory: Path) -> dict:
    """A client certificate from the API, written where qemu and libnbd look for it."""
    status, body = stack.request("POST", "/tls/client-certificates/", {"name": name})
    assert status == 201, body
    directory.mkdir(parents=True)
    (directory / "ca-cert.pem").write_text(body["ca_pem"])
    (directory / "client-cert.pem").write_text(body["cert_pem"])
    (directory / "client-key.pem").write_text(body["key_pem"])
    (directory / "client-key.pem").chmod(0o600)
    return body


def create_export(stack: Stack, name: str, **policy: object) -> dict:
    status, image = stack.request("POST", "/images/", {"name": name, "size": 16 * MiB})
    assert status == 201, image
    status, export = stack.request("POST", "/exports/", {"name": name, "image": image["id"],
                                                          **policy})
    assert status == 201, export
    return export


def nbdinfo(stack: Stack, export: str,
            certificates: Path | None = None) -> subprocess.CompletedProcess[str]:
    port = nbd_port(stack)
    uri = (f"nbds://localhost:{port}/{export}?tls-certificates={certificates}"
           if certificates else f"nbd://localhost:{port}/{export}")
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                          timeout=30)


def refusals(stack: Stack, export: str) -> list[dict]:
    status, body = stack.request("GET", f"/refusals/?export_name={export}")
    assert status == 200, body
    return body["results"]


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def normalized(text: str) -> str:
    return text.replace(":", "").lower()


def test_the_appliance_serves_tls_with_its_own_ca(stack: Stack, tmp_path: Path) -> None:
    status, tls = stack.request("GET", "/tls/status")
    assert status == 200, tls
    assert tls["mode"] == "optional"
    status, ca_pem = stack.request("GET", "/tls/ca")
    assert status == 200
    assert "BEGIN CERTIFICATE" in ca_pem
    create_export(stack, "secure", tls_policy="required", allowed_clients=["alice"])
    issue(stack, "alice", tmp_path / "alice")
    issue(stack, "bob", tmp_path / "bob")
    assert wait_until(lambda: nbdinfo(stack, "secure", tmp_path / "alice").returncode == 0,
                      timeout=20)
    assert nbdinfo(stack, "secure", tmp_path / "alice").stdout.strip() == str(16 * MiB)
    # qemu-img too, with the same directory
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "--object",
         f"tls-creds-x509,id=tls0,endpoint=client,dir={tmp_path / 'alice'}", "--image-opts",
         f"driver=nbd,host=localhost,port={nbd_port(stack)},export=secure,tls-creds=tls0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '"virtual-size": 16777216' in result.stdout
    # clear text and the wrong client are refused, and the refusals say why
    assert nbdinfo(stack, "secure").returncode != 0
    assert nbdinfo(stack, "secure", tmp_path / "bob").returncode != 0
    assert wait_until(lambda: {"tls_required", "client_not_allowed"}
                      <= {r["kind"] for r in refusals(stack, "secure")}, timeout=20)
    bob = next(r for r in refusals(stack, "secure") if r["kind"] == "client_not_allowed")
    assert "bob" in bob["reason"]
    # the session of a TLS client says so
    status, sessions = stack.request("GET", "/sessions/?export_name=secure")
    assert status == 200
    tls_sessions = [s for s in sessions["results"] if s["features"]["tls"]]
    assert tls_sessions
    assert tls_sessions[0]["negotiated"]["tls_names"] == ["alice"]


def test_revoking_a_certificate_drops_and_refuses_its_client(stack: Stack, tmp_path: Path) -> None:
    require_libnbd_python()
    create_export(stack, "carol-disk", tls_policy="required")
    carol = issue(stack, "carol", tmp_path / "carol")
    uri = (f"nbds://localhost:{nbd_port(stack)}/carol-disk"
           f"?tls-certificates={tmp_path / 'carol'}")
    assert wait_until(lambda: nbdinfo(stack, "carol-disk", tmp_path / "carol").returncode == 0,
                      timeout=20)
    program = (
        "import sys, nbd\n"
        "h = nbd.NBD()\n"
        "h.set_uri_allow_local_file(True)\n"
        f"h.connect_uri({uri!r})\n"
        "h.pread(4096, 0)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n"
        "    h.pread(4096, 0)\n"
        "    print('still connected')\n"
        "except nbd.Error as e:\n"
        "    print('dropped', e)\n"
    )
    held = subprocess.Popen([SYSTEM_PYTHON, "-c", program], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert held.stdout is not None
        assert held.stdout.readline().strip() == "ready"
        status, body = stack.request("POST", f"/tls/client-certificates/{carol['id']}/revoke",
                                     {"reason": "key_compromise"})
        assert status == 200, body
        assert body["revoked"] is True
        assert wait_until(lambda: nbdinfo(stack, "carol-disk", tmp_path / "carol").returncode
                          != 0, timeout=20)
        out, _ = held.communicate("\n", timeout=30)
        assert out.startswith("dropped"), out
    finally:
        if held.poll() is None:
            held.kill()
    # A new connection now fails the TLS handshake, before any export is named. (The
    # attempt that saw the revocation first may have been dropped by serial instead.)
    assert nbdinfo(stack, "carol-disk", tmp_path / "carol").returncode != 0
    assert wait_until(lambda: tls_failures(stack), timeout=20)
    assert "revoked" in tls_failures(stack)[0]["reason"]


def tls_failures(stack: Stack) -> list[dict]:
    status, body = stack.request("GET", "/refusals/?kind=tls_handshake")
    assert status == 200, body
    return body["results"]


def test_rotating_the_server_certificate_keeps_connected_clients(stack: Stack,
                                                                 tmp_path: Path) -> None:
    create_export(stack, "rotating", tls_policy="optional")
    issue(stack, "dave", tmp_path / "dave")
    assert wait_until(lambda: nbdinfo(stack, "rotating", tmp_path / "dave").returncode == 0,
                      timeout=20)

    def connect() -> NbdClient:
        client = NbdClient.connect(nbd_port(stack))
        client.read_greeting()
        client.send_client_flags()
        start_tls(client, tmp_path / "dave")
        return client

    with connect() as before:
        before.opt_go("rotating")
        assert before.write(0, pattern(1, 65536)).ok
        old = fingerprint(before.sock.getpeercert(binary_form=True))
        status, body = stack.request("POST", "/tls/server-certificate/rotate")
        assert status in (200, 201), body
        new = normalized(body["fingerprint"])
        assert new != old

        def served_fingerprint() -> str:
            with connect() as probe:
                return fingerprint(probe.sock.getpeercert(binary_form=True))

        assert wait_until(lambda: served_fingerprint() == new, timeout=20)
        # the client connected before the rotation was not dropped
        assert before.read(0, 65536).data() == pattern(1, 65536)
