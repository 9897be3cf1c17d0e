"""The appliance's PKI: CA, server and client certificates, the CRL, PSK identities and the
files the engine reads, checked with ``cryptography``, Python's ssl and real GnuTLS clients."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import stat
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path

import pytest
from conftest import free_port, require, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.exceptions import ValidationError
from django.core.management import call_command

from appliance.errors import (
    CertificateAlreadyRevoked,
    ClientNameTaken,
    PskIdentityNameTaken,
    PskUnsupported,
)
from appliance.pki import services
from appliance.pki.models import (
    CertificateAuthority,
    ClientCertificate,
    PskIdentity,
    ServerCertificate,
)
from appliance.pki.services import (
    ca_certificate_pem,
    client_certificate_issue,
    client_certificate_revoke,
    engine_tls_spec,
    pki_ensure,
    psk_identity_create,
    psk_identity_delete,
    psk_supported,
    server_certificate_rotate,
)

pytestmark = pytest.mark.django_db

FILES = ["ca-cert.pem", "ca-crl.pem", "psk.keys", "server-cert.pem", "server-key.pem"]


@pytest.fixture
def psk_on(monkeypatch):
    """Pretend the engine's Python can do TLS-PSK (3.13+), whatever runs the tests."""
    monkeypatch.setattr(services.nbd_tls, "PSK_SUPPORTED", True)


def ca_cert() -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca_certificate_pem().encode())


def active_server() -> ServerCertificate:
    return ServerCertificate.objects.get(active=True)


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def sans(cert: x509.Certificate) -> list[str]:
    return [str(n.value) for n in ext(cert, x509.SubjectAlternativeName).value]


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# ------------------------------------------------------------------ CA and server certificate


def test_ca_and_server_certificate_are_made_once() -> None:
    pki_ensure()
    pki_ensure()
    assert CertificateAuthority.objects.count() == 1
    assert ServerCertificate.objects.count() == 1
    ca = CertificateAuthority.objects.get()
    server = active_server()
    engine_tls_spec()
    assert CertificateAuthority.objects.get().cert_pem == ca.cert_pem
    assert active_server().serial == server.serial


def test_the_ca_is_a_ca() -> None:
    cert = ca_cert()
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=3000)
    assert "node1" in common_name(cert)
    stored = CertificateAuthority.objects.get()
    assert stored.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def test_server_certificate_names_the_host_clients_use(settings) -> None:
    settings.NBD_PUBLIC_HOST = "nbd.example.net"
    settings.NBD_BIND = "0.0.0.0"  # a wildcard: not a name anyone connects to
    settings.APPLIANCE_TLS_SERVER_NAMES = ["192.0.2.10", "*.example.org", "2001:db8::7"]
    pki_ensure()
    server = active_server()
    cert = load(server.cert_pem)
    cert.verify_directly_issued_by(ca_cert())
    assert sans(cert) == ["node1", "localhost", "127.0.0.1", "::1", "nbd.example.net",
                          "192.0.2.10", "*.example.org", "2001:db8::7"]
    assert server.names == sans(cert)
    assert common_name(cert) == "node1"
    ips = ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert [str(ip) for ip in ips] == ["127.0.0.1", "::1", "192.0.2.10", "2001:db8::7"]
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert not ext(cert, x509.BasicConstraints).value.ca
    # the conventional server profile (qemu 7.2 also accepts digitalSignature alone)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment
    assert str(cert.serial_number) == server.serial
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)  # backdated
    key = serialization.load_pem_private_key(server.key_pem.encode(), password=None)
    assert key.public_key() == cert.public_key()


def test_bind_address_is_named_when_it_is_one(settings) -> None:
    settings.NBD_BIND = "127.0.0.2"
    settings.NBD_PUBLIC_HOST = "[::1]"
    pki_ensure()
    assert active_server().names == ["node1", "localhost", "127.0.0.1", "::1", "127.0.0.2"]


def test_a_new_configured_name_renews_the_server_certificate(settings) -> None:
    pki_ensure()
    first = active_server()
    pki_ensure()
    assert active_server().pk == first.pk  # nothing changed: nothing made
    settings.APPLIANCE_TLS_SERVER_NAMES = ["nbd2.example.net"]
    pki_ensure()
    second = active_server()
    assert second.pk != first.pk
    assert "nbd2.example.net" in second.names
    # A process configured without that name does not take it away again: no ping-pong.
    settings.APPLIANCE_TLS_SERVER_NAMES = []
    pki_ensure()
    assert active_server().pk == second.pk


def test_a_server_certificate_near_its_end_is_renewed() -> None:
    pki_ensure()
    first = active_server()
    ServerCertificate.objects.filter(pk=first.pk).update(
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3))
    spec = engine_tls_spec()
    renewed = active_server()
    assert renewed.pk != first.pk
    assert renewed.not_after > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=300)
    assert Path(spec["cert_file"]).read_text() == renewed.cert_pem


def test_rotation_makes_a_new_active_certificate_and_rewrites_the_files() -> None:
    spec = engine_tls_spec()
    old = active_server()
    old_files = {n: (Path(spec["ca_file"]).parent / n).read_bytes() for n in FILES}
    new = server_certificate_rotate()
    assert new.active
    assert new.serial != old.serial
    assert new.key_pem != old.key_pem
    old.refresh_from_db()
    assert not old.active
    assert ServerCertificate.objects.filter(active=True).count() == 1
    rotated = engine_tls_spec()
    assert rotated["version"] != spec["version"]
    assert Path(rotated["cert_file"]).read_text() == new.cert_pem
    assert Path(rotated["key_file"]).read_text() == new.key_pem
    changed = {n for n in FILES
               if (Path(rotated["ca_file"]).parent / n).read_bytes() != old_files[n]}
    assert changed == {"server-cert.pem", "server-key.pem"}
    load(new.cert_pem).verify_directly_issued_by(ca_cert())


def test_rotation_and_revocation_ask_every_engine_to_sync(
    make_export, django_capture_on_commit_callbacks, monkeypatch
) -> None:
    make_export("vm1", node="node2")
    client, _, _ = client_certificate_issue(name="alice")
    asked: list[str] = []
    monkeypatch.setattr("appliance.engine.tasks.request_sync", asked.append)
    with django_capture_on_commit_callbacks(execute=True):
        server_certificate_rotate()
    assert sorted(asked) == ["node1", "node2"]
    asked.clear()
    with django_capture_on_commit_callbacks(execute=True):
        client_certificate_revoke(certificate=client)
    assert sorted(asked) == ["node1", "node2"]
    asked.clear()
    with django_capture_on_commit_callbacks(execute=True):
        client_certificate_issue(name="bob")  # the engine trusts the CA already
    assert asked == []


# ------------------------------------------------------------------ client certificates


def test_issued_client_certificate_verifies_and_names_the_client() -> None:
    row, cert_pem, key_pem = client_certificate_issue(name="backup01.example.net", days=30)
    cert = load(cert_pem)
    cert.verify_directly_issued_by(ca_cert())
    assert common_name(cert) == "backup01.example.net"
    assert sans(cert) == ["backup01.example.net"]
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not ext(cert, x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert key.public_key() == cert.public_key()
    stored = ClientCertificate.objects.get()
    assert stored.pk == row.pk
    assert stored.serial == str(cert.serial_number)
    assert cert.serial_number.bit_length() > 64  # random, and too big for an integer column
    assert stored.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert stored.not_after == cert.not_valid_after_utc
    assert datetime.timedelta(days=29) < stored.not_after - stored.issued_at <= datetime.timedelta(
        days=30)
    assert stored.cert_pem == cert_pem
    assert not stored.revoked
    # The private key is handed out once: no column holds it.
    for field in ClientCertificate._meta.concrete_fields:
        assert "PRIVATE KEY" not in str(getattr(stored, field.attname))


@pytest.mark.parametrize(("name", "dns"), [("alice", ["alice"]), ("alice@example", []),
                                           ("a_b", []), ("10.0.0.1", []), ("-x", [])])
def test_a_dns_name_only_for_names_that_are_host_names(name, dns) -> None:
    _, cert_pem, _ = client_certificate_issue(name=name)
    cert = load(cert_pem)
    assert common_name(cert) == name
    if dns:
        assert sans(cert) == dns
    else:
        with pytest.raises(x509.ExtensionNotFound):
            ext(cert, x509.SubjectAlternativeName)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "a:b", "a/b", "ünï", "a\n", None, 7])
def test_bad_client_names_are_refused(name) -> None:
    with pytest.raises(ValidationError) as caught:
        client_certificate_issue(name=name)
    assert "name" in caught.value.message_dict
    assert "1 to 64 letters" in caught.value.message_dict["name"][0]
    assert not ClientCertificate.objects.exists()


@pytest.mark.parametrize("days", [0, -1, 3651, True, "30"])
def test_bad_validity_is_refused(days) -> None:
    with pytest.raises(ValidationError) as caught:
        client_certificate_issue(name="alice", days=days)
    assert "days" in caught.value.message_dict


def test_a_name_has_one_certificate_until_it_is_revoked() -> None:
    first, _, _ = client_certificate_issue(name="alice")
    with pytest.raises(ClientNameTaken, match="revoke it before") as caught:
        client_certificate_issue(name="alice")
    assert caught.value.status == 400
    assert first.serial in caught.value.message
    client_certificate_revoke(certificate=first)
    second, _, _ = client_certificate_issue(name="alice")
    assert second.serial != first.serial
    assert ClientCertificate.objects.filter(name="alice").count() == 2


def test_a_certificate_cannot_outlive_the_ca() -> None:
    _, cert_pem, _ = client_certificate_issue(name="alice", days=3650)
    assert load(cert_pem).not_valid_after_utc <= ca_cert().not_valid_after_utc


# ------------------------------------------------------------------ revocation and the CRL


def crl_of(spec: dict) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(Path(spec["crl_file"]).read_bytes())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_revocation_lists_the_serial_in_the_crl_and_the_spec() -> None:
    alice, _, _ = client_certificate_issue(name="alice")
    bob, _, _ = client_certificate_issue(name="bob")
    before = engine_tls_spec()
    assert before["revoked_serials"] == []
    assert len(crl_of(before)) == 0
    number_before = crl_number(crl_of(before))

    revoked = client_certificate_revoke(certificate=bob, reason="key_compromise")
    assert revoked.revoked
    assert revoked.revocation_reason == "key_compromise"
    spec = engine_tls_spec()
    assert spec["revoked_serials"] == [int(bob.serial)]
    assert spec["version"] != before["version"]
    crl = crl_of(spec)
    assert crl.is_signature_valid(ca_cert().public_key())
    assert crl.issuer == ca_cert().subject
    entry = crl.get_revoked_certificate_by_serial_number(int(bob.serial))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise)
    assert crl.get_revoked_certificate_by_serial_number(int(alice.serial)) is None
    assert crl.next_update_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=29)
    assert crl_number(crl) > number_before

    client_certificate_revoke(certificate=alice)
    both = engine_tls_spec()
    assert both["revoked_serials"] == sorted([int(alice.serial), int(bob.serial)])
    assert len(crl_of(both)) == 2


def test_revoking_twice_is_refused() -> None:
    alice, _, _ = client_certificate_issue(name="alice")
    client_certificate_revoke(certificate=alice)
    stale = ClientCertificate.objects.get(pk=alice.pk)
    with pytest.raises(CertificateAlreadyRevoked, match="already revoked") as caught:
        client_certificate_revoke(certificate=stale)
    assert caught.value.status == 409


def test_an_unknown_revocation_reason_is_refused() -> None:
    alice, _, _ = client_certificate_issue(name="alice")
    with pytest.raises(ValidationError) as caught:
        client_certificate_revoke(certificate=alice, reason="bored")
    assert "reason" in caught.value.message_dict
    alice.refresh_from_db()
    assert not alice.revoked


def test_an_aging_crl_is_re_signed() -> None:
    spec = engine_tls_spec()
    CertificateAuthority.objects.update(
        crl_next_update=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10))
    renewed = engine_tls_spec()
    assert renewed["version"] != spec["version"]
    assert crl_of(renewed).next_update_utc - datetime.datetime.now(datetime.UTC) > (
        datetime.timedelta(days=29))
    assert engine_tls_spec()["version"] == renewed["version"]  # and not again


# ------------------------------------------------------------------ the engine's files


def test_engine_spec_and_files(settings, tmp_path) -> None:
    settings.NBD_TLS_MODE = "required"
    spec = engine_tls_spec()
    tls = tmp_path / "tls"
    assert spec == {
        "mode": "required",
        "cert_file": str(tls / "server-cert.pem"),
        "key_file": str(tls / "server-key.pem"),
        "ca_file": str(tls / "ca-cert.pem"),
        "crl_file": str(tls / "ca-crl.pem"),
        "psk_file": None,
        "version": spec["version"],
        "revoked_serials": [],
    }
    assert len(spec["version"]) == 16
    int(spec["version"], 16)
    json.dumps(spec)  # it travels in the engine spec
    assert sorted(p.name for p in tls.iterdir()) == FILES  # no temporary files left
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tls.iterdir()}
    assert modes == {"ca-cert.pem": 0o644, "ca-crl.pem": 0o644, "psk.keys": 0o600,
                     "server-cert.pem": 0o644, "server-key.pem": 0o600}
    assert (tls / "ca-cert.pem").read_text() == ca_certificate_pem()
    assert (tls / "psk.keys").read_bytes() == b""


def test_files_are_rewritten_only_when_their_content_changes(tmp_path) -> None:
    spec = engine_tls_spec()
    tls = tmp_path / "tls"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tls.iterdir()}
    again = engine_tls_spec()
    assert again["version"] == spec["version"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tls.iterdir()} == before
    # A mode someone loosened is put back without rewriting the file.
    (tls / "server-key.pem").chmod(0o644)
    engine_tls_spec()
    assert stat.S_IMODE((tls / "server-key.pem").stat().st_mode) == 0o600
    # A file someone damaged is put back.
    (tls / "server-cert.pem").write_text("garbage")
    assert engine_tls_spec()["version"] == spec["version"]
    assert (tls / "server-cert.pem").read_text() == active_server().cert_pem


def test_python_ssl_loads_the_files_and_checks_names_and_the_crl(tmp_path) -> None:
    alice_row, alice_cert, alice_key = client_certificate_issue(name="alice")
    bob_row, bob_cert, bob_key = client_certificate_issue(name="bob")
    client_certificate_revoke(certificate=bob_row)
    spec = engine_tls_spec()

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(spec["cert_file"], spec["key_file"])
    server.load_verify_locations(cafile=spec["ca_file"])
    server.load_verify_locations(cafile=spec["crl_file"])
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    server.verify_mode = ssl.CERT_OPTIONAL

    def client(cert_pem: str | None = None, key_pem: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=spec["ca_file"])
        if cert_pem is not None and key_pem is not None:
            (tmp_path / "c.pem").write_text(cert_pem)
            (tmp_path / "k.pem").write_text(key_pem)
            context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        return context

    alice = handshake(server, client(alice_cert, alice_key), "localhost")
    assert alice["peer"]["subject"] == ((("organizationName", "NBD appliance"),),
                                        (("commonName", "alice"),))
    assert int(alice["peer"]["serialNumber"], 16) == int(alice_row.serial)
    assert "peer" in handshake(server, client(alice_cert, alice_key), "127.0.0.1")
    assert handshake(server, client(), "::1")["peer"] is None  # no client certificate
    revoked = handshake(server, client(bob_cert, bob_key), "localhost")
    assert "revoked" in str(revoked["error"])
    wrong_host = handshake(server, client(alice_cert, alice_key), "nbd.example.com")
    assert "Hostname mismatch" in str(wrong_host["client_error"])


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> dict:
    """A TLS handshake over a socket pair: the server's view of the client certificate, or
    the error of either side."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result: dict = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=host) as tls:
            tls.recv(2)  # TLS 1.3: a refused client certificate shows up after the handshake
    except (OSError, ssl.SSLError) as exc:
        result["client_error"] = exc
    finally:
        b.close()
        thread.join(10)
    return result


# ------------------------------------------------------------------ PSK identities


def test_psk_is_refused_where_the_engine_cannot_do_it(monkeypatch) -> None:
    monkeypatch.setattr(services.nbd_tls, "PSK_SUPPORTED", False)
    assert not psk_supported()
    with pytest.raises(PskUnsupported) as caught:
        psk_identity_create(name="alice")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert caught.value.message == (
        "TLS-PSK needs Python 3.13 or newer for the engine; this engine runs Python "
        f"{version}")
    assert caught.value.status == 400
    assert not PskIdentity.objects.exists()


def test_psk_support_follows_the_engine() -> None:
    from nbdcore.tls import PSK_SUPPORTED

    assert psk_supported() is bool(PSK_SUPPORTED)
    assert psk_supported() is (sys.version_info >= (3, 13) and hasattr(ssl, "HAS_PSK")
                               and bool(ssl.HAS_PSK))


def test_psk_identities_go_into_the_psk_file(psk_on, django_capture_on_commit_callbacks,
                                             monkeypatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr("appliance.engine.tasks.request_sync", asked.append)
    before = engine_tls_spec()
    with django_capture_on_commit_callbacks(execute=True):
        alice, alice_key = psk_identity_create(name="alice")
        bob, bob_key = psk_identity_create(name="bob")
    assert asked == ["node1", "node1"]
    assert len(bytes.fromhex(alice_key)) == 32
    assert alice_key != bob_key
    assert PskIdentity.objects.get(name="alice").key_hex == alice_key
    spec = engine_tls_spec()
    assert spec["version"] != before["version"]
    psk_file = Path(spec["psk_file"])
    assert psk_file.name == "psk.keys"
    assert psk_file.read_text() == f"alice:{alice_key}\nbob:{bob_key}\n"
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    from nbdcore.tls import read_psk_file

    assert read_psk_file(psk_file) == {"alice": bytes.fromhex(alice_key),
                                       "bob": bytes.fromhex(bob_key)}

    with pytest.raises(PskIdentityNameTaken, match="already exists"):
        psk_identity_create(name="alice")
    with pytest.raises(ValidationError) as caught:
        psk_identity_create(name="a:b")
    assert "name" in caught.value.message_dict

    psk_identity_delete(identity=alice)
    psk_identity_delete(identity=bob)
    empty = engine_tls_spec()
    assert empty["psk_file"] is None
    assert psk_file.read_bytes() == b""


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_makes_the_ca(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_ADMIN_PASSWORD", "pw-for-tests-1")
    out = StringIO()
    call_command("appliance_bootstrap", "--no-demo", stdout=out)
    result = json.loads(out.getvalue())
    assert result["tls_ca_fingerprint"] == CertificateAuthority.objects.get().fingerprint
    assert ServerCertificate.objects.filter(active=True).count() == 1
    call_command("appliance_bootstrap", "--no-demo", stdout=StringIO())
    assert CertificateAuthority.objects.count() == 1
    assert ServerCertificate.objects.count() == 1


# ------------------------------------------------------------------ real GnuTLS clients


@pytest.mark.interop
def test_qemu_and_libnbd_accept_the_appliance_certificates(tmp_path) -> None:
    """nbdkit (GnuTLS) serves with the files the engine gets; qemu-img and nbdinfo connect
    with an issued client certificate; a revoked one is refused."""
    require("nbdkit", "qemu-img", "nbdinfo")
    _, alice_cert, alice_key = client_certificate_issue(name="alice")
    bob_row, bob_cert, bob_key = client_certificate_issue(name="bob")
    client_certificate_revoke(certificate=bob_row)
    spec = engine_tls_spec()
    dirs = {}
    for name, cert_pem, key_pem in (("alice", alice_cert, alice_key), ("bob", bob_cert, bob_key)):
        d = tmp_path / "clients" / name
        d.mkdir(parents=True)
        (d / "ca-cert.pem").write_text(ca_certificate_pem())
        (d / "client-cert.pem").write_text(cert_pem)
        (d / "client-key.pem").write_text(key_pem)
        (d / "client-key.pem").chmod(0o600)
        dirs[name] = d
    port = free_port()
    nbdkit = subprocess.Popen(
        ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port),
         "--tls=require", f"--tls-certificates={Path(spec['ca_file']).parent}",
         "--tls-verify-peer", "memory", "1M"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _accepting(port), 10)

        def qemu_img(client: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["qemu-img", "info", "--output=json", "--object",
                 f"tls-creds-x509,id=tls0,endpoint=client,dir={dirs[client]}",
                 "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"],
                capture_output=True, text=True, timeout=30)

        ok = qemu_img("alice")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["virtual-size"] == 1 << 20
        assert qemu_img("bob").returncode != 0
        info = subprocess.run(
            ["nbdinfo", "--size", f"nbds://localhost:{port}/?tls-certificates={dirs['alice']}"],
            capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert info.stdout.strip() == str(1 << 20)
    finally:
        nbdkit.terminate()
        nbdkit.wait(10)


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True
