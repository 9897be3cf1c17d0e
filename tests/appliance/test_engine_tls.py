"""The engine's TLS from the spec: contexts, modes, per-export policy, revocation.

A real NbdServer with the applier in front of it, and raw clients doing STARTTLS with the
test PKI (tests/tlsutil.py) in the layout the appliance writes (ca-cert.pem,
server-cert.pem, server-key.pem, ca-crl.pem).
"""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from nbdclient import NbdClient, pattern
from tlsutil import TestPki, make_test_pki, start_tls, write_server_dir

from appliance.engine.applier import SpecApplier
from appliance.engine.spec import EngineSpec, ExportSpec, TlsSpec
from nbdcore.exports import ExportRegistry
from nbdcore.protocol.constants import Opt, Rep

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def engine(inprocess_server, tmp_path: Path):
    registry = ExportRegistry()
    server = inprocess_server(registry)
    applier = SpecApplier(server, registry)
    yield server, applier, tmp_path
    applier.close_all()


def tls_spec(directory: Path, mode: str = "optional", version: str = "1",
             revoked: tuple[int, ...] = ()) -> TlsSpec:
    crl = directory / "ca-crl.pem"
    return TlsSpec(mode=mode, cert_file=str(directory / "server-cert.pem"),
                   key_file=str(directory / "server-key.pem"),
                   ca_file=str(directory / "ca-cert.pem"),
                   crl_file=str(crl) if crl.exists() else None, psk_file=None,
                   version=version, revoked_serials=revoked)


def export(tmp: Path, name: str, **policy: object) -> ExportSpec:
    path = tmp / f"{name}.raw"
    if not path.exists():
        path.write_bytes(pattern(0, MiB))
    return ExportSpec(name=name, path=str(path), size=MiB, **policy)  # type: ignore[arg-type]


def greet(port: int) -> NbdClient:
    client = NbdClient.connect(port)
    client.read_greeting()
    client.send_client_flags(client.handshake_flags & 0x3)
    return client


def plain_go(port: int, name: str) -> tuple[NbdClient, int]:
    client = greet(port)
    final, _ = client.opt_go(name)
    return client, final.type


def tls_go(port: int, client_dir: Path, name: str) -> tuple[NbdClient, int]:
    client = greet(port)
    start_tls(client, client_dir)
    final, _ = client.opt_go(name)
    return client, final.type


def served(client: NbdClient) -> bool:
    return client.read(0, 4096).data() == pattern(0, 4096)


def peer_certificate(port: int, pki: TestPki) -> bytes:
    client = greet(port)
    try:
        tls = start_tls(client, pki.client("alice"))
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        client.close()


# ---------------------------------------------------------------- the spec


def test_spec_round_trip_and_digest_cover_tls() -> None:
    tls = TlsSpec(mode="required", cert_file="/t/server-cert.pem", key_file="/t/server-key.pem",
                  ca_file="/t/ca-cert.pem", crl_file="/t/ca-crl.pem", psk_file=None,
                  version="abc", revoked_serials=(7, 2**150))
    exports = (ExportSpec(name="a", path="/i/a.raw", size=MiB, tls="required",
                          allowed_clients=("alice", "bob"), max_connections=3),)
    spec = EngineSpec(node="n", exports=exports, tls=tls)
    again = EngineSpec.from_json(spec.to_json())
    assert again == spec
    assert again.digest == spec.digest
    assert EngineSpec.from_json(EngineSpec(node="n", exports=exports).to_json()).tls is None
    changed = [
        replace(spec, tls=replace(tls, version="abd")),
        replace(spec, tls=replace(tls, mode="optional")),
        replace(spec, tls=replace(tls, revoked_serials=(7,))),
        replace(spec, tls=None),
        replace(spec, exports=(replace(exports[0], allowed_clients=("alice",)),)),
        replace(spec, exports=(replace(exports[0], max_connections=4),)),
        replace(spec, exports=(replace(exports[0], tls="optional"),)),
    ]
    assert len({spec.digest, *(s.digest for s in changed)}) == len(changed) + 1


def test_spec_of_an_older_appliance_still_reads() -> None:
    raw = '{"node": "n", "exports": [{"name": "a", "path": "/i/a.raw", "size": 1}]}'
    spec = EngineSpec.from_json(raw)
    assert spec.tls is None
    assert (spec.exports[0].tls, spec.exports[0].allowed_clients,
            spec.exports[0].max_connections) == ("off", (), 0)


# ---------------------------------------------------------------- contexts and modes


def test_tls_turned_on_then_an_export_requires_it(engine, pki) -> None:
    server, applier, tmp = engine
    a = export(tmp, "a")
    applier.apply(EngineSpec(node="n", exports=(a,)))
    assert server.tls_mode == "off"
    with greet(server.port) as client:
        assert client.option(Opt.STARTTLS)[-1].type == Rep.ERR_POLICY
    applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(pki.server_dir)))
    assert (server.tls_mode, applier.tls_mode, applier.tls_version) == (
        "optional", "optional", "1")
    plain, reply = plain_go(server.port, "a")
    secure, secure_reply = tls_go(server.port, pki.client("alice"), "a")
    with plain, secure:
        assert (reply, secure_reply) == (Rep.ACK, Rep.ACK)
        # a becomes TLS-only: its clear-text client goes, its TLS client stays
        applier.apply(EngineSpec(node="n", exports=(replace(a, tls="required"),),
                                 tls=tls_spec(pki.server_dir)))
        assert plain.server_closed()
        assert served(secure)
    refused, reply = plain_go(server.port, "a")
    refused.close()
    assert reply == Rep.ERR_TLS_REQD


def test_allowed_clients_drop_only_the_names_no_longer_listed(engine, pki) -> None:
    server, applier, tmp = engine
    tls = tls_spec(pki.server_dir)
    a = export(tmp, "a", tls="optional")
    b = export(tmp, "b")
    applier.apply(EngineSpec(node="n", exports=(a, b), tls=tls))
    alice, r1 = tls_go(server.port, pki.client("alice"), "a")
    bob, r2 = tls_go(server.port, pki.client("bob"), "a")
    other, r3 = plain_go(server.port, "b")
    with alice, bob, other:
        assert (r1, r2, r3) == (Rep.ACK, Rep.ACK, Rep.ACK)
        applier.apply(EngineSpec(node="n", exports=(replace(a, allowed_clients=("bob",)), b),
                                 tls=tls))
        assert alice.server_closed()
        assert served(bob)
        assert served(other)  # another export's client is never touched
    again, reply = tls_go(server.port, pki.client("alice"), "a")
    again.close()
    assert reply == Rep.ERR_POLICY
    plain, reply = plain_go(server.port, "a")
    plain.close()
    assert reply == Rep.ERR_TLS_REQD


def test_revoked_serials_close_only_that_client(engine, pki) -> None:
    server, applier, tmp = engine
    a = export(tmp, "a", tls="optional")
    applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(pki.server_dir_no_crl)))
    alice, r1 = tls_go(server.port, pki.client("alice"), "a")
    bob, r2 = tls_go(server.port, pki.client("bob"), "a")
    with alice, bob:
        assert (r1, r2) == (Rep.ACK, Rep.ACK)
        applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(
            pki.server_dir_no_crl, revoked=(pki.serials["alice"],))))
        assert alice.server_closed()
        assert served(bob)


def test_required_mode_drops_clear_text_clients(engine, pki) -> None:
    server, applier, tmp = engine
    a = export(tmp, "a")
    applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(pki.server_dir)))
    plain, r1 = plain_go(server.port, "a")
    secure, r2 = tls_go(server.port, pki.client("alice"), "a")
    with plain, secure:
        assert (r1, r2) == (Rep.ACK, Rep.ACK)
        applier.apply(EngineSpec(node="n", exports=(a,),
                                 tls=tls_spec(pki.server_dir, mode="required")))
        assert server.tls_mode == "required"
        assert plain.server_closed()
        assert served(secure)
        # and back off: TLS-only exports become unreachable, so their clients go too
        b = export(tmp, "b", tls="required")
        b_client, reply = tls_go(server.port, pki.client("alice"), "b")
        with b_client:
            assert reply == Rep.ERR_UNKNOWN  # not published yet
        applier.apply(EngineSpec(node="n", exports=(a, b),
                                 tls=tls_spec(pki.server_dir, mode="required")))
        b_client, reply = tls_go(server.port, pki.client("alice"), "b")
        with b_client:
            assert reply == Rep.ACK
            applier.apply(EngineSpec(node="n", exports=(a, b), tls=None))
            assert server.tls_mode == "off"
            assert b_client.server_closed()
            assert served(secure)  # a admits clear text and TLS alike


def test_rotation_serves_the_new_certificate_to_new_clients_only(engine, pki, tmp_path) -> None:
    server, applier, tmp = engine
    a = export(tmp, "a")
    applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(pki.server_dir)))
    before = peer_certificate(server.port, pki)
    connected, reply = tls_go(server.port, pki.client("alice"), "a")
    with connected:
        assert reply == Rep.ACK
        cert, key = pki.ca.issue_server()
        rotated = write_server_dir(tmp_path / "rotated", pki.ca, cert, key)
        applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(rotated, version="2")))
        after = peer_certificate(server.port, pki)
        assert after != before
        assert served(connected)
    assert applier.tls_version == "2"


def test_files_that_do_not_load_keep_the_previous_context(engine, pki, tmp_path) -> None:
    server, applier, tmp = engine
    a = export(tmp, "a")
    applier.apply(EngineSpec(node="n", exports=(a,), tls=tls_spec(pki.server_dir)))
    before = peer_certificate(server.port, pki)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        (broken / name).write_bytes((pki.server_dir / name).read_bytes())
    (broken / "server-key.pem").write_text("not a key\n")
    spec = EngineSpec(node="n", exports=(a,), tls=tls_spec(broken, version="2"))
    applier.apply(spec)
    assert "tls" in applier.failed
    assert "a" in applier.current  # exports are served all the same
    assert applier.digest == spec.digest
    assert applier.tls_version == "1"
    assert peer_certificate(server.port, pki) == before
    # once the files are right, the next apply (the runner retries failures) loads them
    write_server_dir(broken, pki.ca, *pki.ca.issue_server())
    applier.digest = ""
    applier.apply(spec)
    assert "tls" not in applier.failed
    assert applier.tls_version == "2"
    assert peer_certificate(server.port, pki) != before


def test_required_tls_that_never_loads_refuses_clear_text(engine, pki, tmp_path) -> None:
    server, applier, tmp = engine
    missing = TlsSpec(mode="required", cert_file=str(tmp_path / "none.pem"),
                      key_file=str(tmp_path / "none-key.pem"), version="1")
    applier.apply(EngineSpec(node="n", exports=(export(tmp, "a"),), tls=missing))
    assert "tls" in applier.failed
    assert server.tls_mode == "required"
    client, reply = plain_go(server.port, "a")
    client.close()
    assert reply == Rep.ERR_TLS_REQD
    with greet(server.port) as client, pytest.raises(ssl.SSLError):
        start_tls(client, pki.client("alice"))  # no certificate to offer: it fails


# ---------------------------------------------------------------- with the appliance's PKI


def write_client(directory: Path, cert_pem: str, key_pem: str) -> Path:
    from appliance.pki.services import ca_certificate_pem

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_text(ca_certificate_pem())
    (directory / "client-cert.pem").write_text(cert_pem)
    (directory / "client-key.pem").write_text(key_pem)
    return directory


@pytest.mark.django_db
def test_desired_spec_carries_the_policy_and_the_pki(make_export, settings) -> None:
    from appliance.engine.spec import desired_spec
    from appliance.pki.services import client_certificate_issue, client_certificate_revoke

    settings.NBD_TLS_MODE = "required"
    make_export("vm1", tls_policy="optional", allowed_clients=["alice"], max_connections=2)
    spec = desired_spec("node1")
    (vm1,) = spec.exports
    assert (vm1.tls, vm1.allowed_clients, vm1.max_connections) == ("optional", ("alice",), 2)
    assert spec.tls is not None
    assert spec.tls.mode == "required"
    assert Path(spec.tls.cert_file).parent == settings.APPLIANCE_TLS_DIR
    assert spec.tls.revoked_serials == ()
    assert desired_spec("node1").digest == spec.digest  # nothing changed, nothing rewritten
    cert, _, _ = client_certificate_issue(name="alice")
    client_certificate_revoke(certificate=cert)
    revoked = desired_spec("node1")
    assert revoked.tls is not None
    assert revoked.tls.revoked_serials == (int(cert.serial),)
    assert revoked.tls.version != spec.tls.version  # a new CRL
    assert revoked.digest != spec.digest


@pytest.mark.django_db
def test_a_certificate_the_appliance_issued_then_revoked(engine, make_export, tmp_path) -> None:
    """Issue through the PKI services, connect with it over TLS to an export that admits
    only that name, revoke it: the live connection goes and the next handshake fails."""
    from appliance.engine.spec import desired_spec
    from appliance.pki.services import client_certificate_issue, client_certificate_revoke

    server, applier, _ = engine
    make_export("vm1", tls_policy="required", allowed_clients=["alice"])
    applier.apply(desired_spec("node1"))
    assert applier.failed == {}
    cert, cert_pem, key_pem = client_certificate_issue(name="alice")
    _, bob_pem, bob_key = client_certificate_issue(name="bob")
    alice = write_client(tmp_path / "alice", cert_pem, key_pem)
    bob = write_client(tmp_path / "bob", bob_pem, bob_key)
    refused, reply = tls_go(server.port, bob, "vm1")
    refused.close()
    assert reply == Rep.ERR_POLICY  # another name
    client, reply = tls_go(server.port, alice, "vm1")
    with client:
        assert reply == Rep.ACK
        assert client.read(0, 4096).ok
        client_certificate_revoke(certificate=cert)
        applier.apply(desired_spec("node1"))
        assert client.server_closed()
    with greet(server.port) as again, pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3 reports the refused certificate on the first read after the handshake
        start_tls(again, alice).recv(1)
