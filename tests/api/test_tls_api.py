"""/api/v1/tls/: the CA download, client certificates, the server certificate, PSK
identities and the status, with their errors."""

from __future__ import annotations

import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance.pki import services
from appliance.pki.models import ClientCertificate, PskIdentity, ServerCertificate

pytestmark = pytest.mark.django_db

B = "/api/v1/tls"


@pytest.fixture
def psk_on(monkeypatch):
    monkeypatch.setattr(services.nbd_tls, "PSK_SUPPORTED", True)


@pytest.fixture
def psk_off(monkeypatch):
    monkeypatch.setattr(services.nbd_tls, "PSK_SUPPORTED", False)


def issue(api, name: str = "alice", **extra):
    return api.post(f"{B}/client-certificates/", {"name": name, **extra}, format="json")


ENDPOINTS = [
    ("get", "/status"),
    ("get", "/ca"),
    ("get", "/server-certificate"),
    ("post", "/server-certificate/rotate"),
    ("get", "/client-certificates/"),
    ("post", "/client-certificates/"),
    ("get", "/client-certificates/{cert}/"),
    ("post", "/client-certificates/{cert}/revoke"),
    ("get", "/psk-identities/"),
    ("post", "/psk-identities/"),
    ("get", "/psk-identities/{psk}/"),
    ("delete", "/psk-identities/{psk}/"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_every_endpoint_refuses_anonymous_clients(anon, psk_on, method, url) -> None:
    services.pki_ensure()
    cert, _, _ = services.client_certificate_issue(name="alice")
    psk, _ = services.psk_identity_create(name="alice")
    server = ServerCertificate.objects.get(active=True)
    response = getattr(anon, method)(B + url.format(cert=cert.pk, psk=psk.pk),
                                     {"name": "bob"}, format="json")
    assert response.status_code == 401, (url, response.status_code)
    assert response["WWW-Authenticate"] == "Token"
    assert response.json()["code"] == "not_authenticated"
    assert ClientCertificate.objects.get().revoked_at is None
    assert list(PskIdentity.objects.values_list("name", flat=True)) == ["alice"]
    assert ServerCertificate.objects.get(active=True).pk == server.pk


def test_ca_download_is_pem(api) -> None:
    response = api.get(f"{B}/ca")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-pem-file"
    assert response["Content-Disposition"] == 'attachment; filename="ca-cert.pem"'
    cert = x509.load_pem_x509_certificate(response.content)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert api.get(f"{B}/ca/").content == response.content  # made once, slash optional
    assert response.content.decode() == services.ca_certificate_pem()


def test_status(api, settings, psk_off) -> None:
    settings.NBD_TLS_MODE = "required"
    response = api.get(f"{B}/status")
    assert response.status_code == 200
    body = response.json()
    server = ServerCertificate.objects.get(active=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert body["mode"] == "required"
    assert body["psk_supported"] is False
    assert body["psk_detail"].endswith(f"this engine runs Python {version}")
    assert body["server_certificate"]["serial"] == server.serial
    assert body["server_certificate"]["fingerprint"] == server.fingerprint
    assert body["server_certificate"]["names"] == ["node1", "localhost", "127.0.0.1", "::1"]
    assert body["server_certificate"]["not_after"]
    assert len(body["ca"]["fingerprint"]) == 64
    assert "NBD appliance CA node1" in body["ca"]["subject"]
    assert body["ca"]["not_after"]
    assert body["ca"]["crl_next_update"]
    assert body["client_certificates"] == {"active": 0, "revoked": 0}
    assert body["psk_identities"] == 0


def test_issue_returns_the_key_once(api) -> None:
    response = issue(api, "alice", days=90)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "alice"
    assert body["revoked"] is False
    assert body["revoked_at"] is None
    assert body["revocation_reason"] == ""
    cert = x509.load_pem_x509_certificate(body["cert_pem"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_pem"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert str(cert.serial_number) == body["serial"]
    key = serialization.load_pem_private_key(body["key_pem"].encode(), password=None)
    assert key.public_key() == cert.public_key()
    assert body["ca_pem"] == api.get(f"{B}/ca").content.decode()

    listed = api.get(f"{B}/client-certificates/").json()
    assert listed["count"] == 1
    assert set(listed["results"][0]) == {
        "id", "name", "serial", "fingerprint", "issued_at", "not_after", "revoked",
        "revoked_at", "revocation_reason"}
    detail = api.get(f"{B}/client-certificates/{body['id']}").json()
    assert detail["cert_pem"] == body["cert_pem"]
    assert "key_pem" not in detail
    assert body["key_pem"] not in api.get(f"{B}/client-certificates/?format=json").content.decode()


@pytest.mark.parametrize(
    ("payload", "field", "fragment"),
    [
        ({"name": "a b"}, "name", "letters, digits"),
        ({"name": "a:b"}, "name", "letters, digits"),
        ({"name": "x" * 65}, "name", "no more than 64"),
        ({"name": ""}, "name", "may not be blank"),
        ({}, "name", "required"),
        ({"name": "alice", "days": 0}, "days", "greater than or equal to 1"),
        ({"name": "alice", "days": 3651}, "days", "less than or equal to 3650"),
    ],
)
def test_issue_refuses_bad_input(api, payload, field, fragment) -> None:
    response = api.post(f"{B}/client-certificates/", payload, format="json")
    assert response.status_code == 400
    body = response.json()
    assert fragment in " ".join(body[field]), body
    assert not ClientCertificate.objects.exists()


def test_issue_refuses_a_name_in_use(api) -> None:
    first = issue(api, "alice").json()
    response = issue(api, "alice")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "client_name_taken"
    assert "revoke it before" in body["detail"]
    assert body["name"] == [body["detail"]]
    assert api.post(f"{B}/client-certificates/{first['id']}/revoke").status_code == 200
    assert issue(api, "alice").status_code == 201


def test_revoke(api) -> None:
    alice = issue(api, "alice").json()
    response = api.post(f"{B}/client-certificates/{alice['id']}/revoke",
                        {"reason": "key_compromise"}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["revoked"] is True
    assert body["revoked_at"]
    assert body["revocation_reason"] == "key_compromise"
    assert services.engine_tls_spec()["revoked_serials"] == [int(alice["serial"])]

    again = api.post(f"{B}/client-certificates/{alice['id']}/revoke")
    assert again.status_code == 409
    assert again.json()["code"] == "certificate_already_revoked"
    assert "already revoked" in again.json()["detail"]

    bob = issue(api, "bob").json()
    bad = api.post(f"{B}/client-certificates/{bob['id']}/revoke", {"reason": "bored"},
                   format="json")
    assert bad.status_code == 400
    assert "is not a valid choice" in bad.json()["reason"][0]
    assert api.post(f"{B}/client-certificates/999999/revoke").status_code == 404

    status = api.get(f"{B}/status").json()
    assert status["client_certificates"] == {"active": 1, "revoked": 1}

    def names(query: str) -> list[str]:
        response = api.get(f"{B}/client-certificates/?{query}")
        assert response.status_code == 200, response.json()
        return [c["name"] for c in response.json()["results"]]

    assert names("revoked=true") == ["alice"]
    assert names("revoked=false") == ["bob"]
    assert names("name=bob") == ["bob"]
    assert names("ordering=-name") == ["bob", "alice"]
    assert api.get(f"{B}/client-certificates/?revoked=perhaps").status_code == 400


def test_server_certificate_and_rotation(api) -> None:
    current = api.get(f"{B}/server-certificate")
    assert current.status_code == 200
    old = current.json()
    assert set(old) == {"id", "serial", "fingerprint", "names", "not_after", "created_at",
                        "cert_pem"}
    assert "PRIVATE KEY" not in current.content.decode()
    rotated = api.post(f"{B}/server-certificate/rotate")
    assert rotated.status_code == 200
    new = rotated.json()
    assert new["serial"] != old["serial"]
    assert new["fingerprint"] != old["fingerprint"]
    assert "PRIVATE KEY" not in rotated.content.decode()
    assert api.get(f"{B}/server-certificate/").json()["serial"] == new["serial"]
    assert api.get(f"{B}/status").json()["server_certificate"]["serial"] == new["serial"]


def test_psk_identities(api, psk_on) -> None:
    created = api.post(f"{B}/psk-identities/", {"name": "alice"}, format="json")
    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["name"] == "alice"
    assert len(bytes.fromhex(body["key"])) == 32
    assert body["psk_line"] == f"alice:{body['key']}"

    listed = api.get(f"{B}/psk-identities/").json()
    assert [i["name"] for i in listed["results"]] == ["alice"]
    assert body["key"] not in api.get(f"{B}/psk-identities/?format=json").content.decode()
    detail = api.get(f"{B}/psk-identities/{body['id']}").json()
    assert set(detail) == {"id", "name", "created_at"}

    taken = api.post(f"{B}/psk-identities/", {"name": "alice"}, format="json")
    assert taken.status_code == 400
    assert "already exists" in " ".join(taken.json()["name"])
    bad = api.post(f"{B}/psk-identities/", {"name": "a:b"}, format="json")
    assert bad.status_code == 400
    assert "letters, digits" in bad.json()["name"][0]
    assert api.get(f"{B}/status").json()["psk_identities"] == 1

    assert api.delete(f"{B}/psk-identities/{body['id']}").status_code == 204
    assert not PskIdentity.objects.exists()
    assert api.delete(f"{B}/psk-identities/{body['id']}").status_code == 404


def test_psk_refused_clearly_where_the_engine_cannot(api, psk_off) -> None:
    response = api.post(f"{B}/psk-identities/", {"name": "alice"}, format="json")
    assert response.status_code == 400
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert response.json() == {
        "code": "psk_unsupported",
        "detail": "TLS-PSK needs Python 3.13 or newer for the engine; this engine runs "
                  f"Python {version}",
    }
    assert not PskIdentity.objects.exists()
    assert api.get(f"{B}/psk-identities/").json()["count"] == 0  # listing still works


def test_the_schema_describes_the_tls_api(api) -> None:
    schema = api.get("/api/schema/?format=json").json()
    paths = {p.rstrip("/") for p in schema["paths"]}
    assert {
        "/api/v1/tls/status", "/api/v1/tls/ca", "/api/v1/tls/server-certificate",
        "/api/v1/tls/server-certificate/rotate", "/api/v1/tls/client-certificates",
        "/api/v1/tls/client-certificates/{id}", "/api/v1/tls/client-certificates/{id}/revoke",
        "/api/v1/tls/psk-identities", "/api/v1/tls/psk-identities/{id}",
    } <= paths
    ca = next(v for k, v in schema["paths"].items() if k.rstrip("/") == "/api/v1/tls/ca")
    assert "application/x-pem-file" in ca["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("url", ["/admin/pki/clientcertificate/", "/admin/pki/servercertificate/",
                                 "/admin/pki/pskidentity/"])
def test_admin_lists_but_never_shows_keys(client, psk_on, url) -> None:
    from django.contrib.auth import get_user_model

    admin = get_user_model().objects.create_superuser("root", "root@example.net", "pw-admin-1")
    client.force_login(admin)
    services.pki_ensure()
    services.client_certificate_issue(name="alice")
    _, psk_key = services.psk_identity_create(name="alice")
    server = ServerCertificate.objects.get(active=True)
    listing = client.get(url)
    assert listing.status_code == 200
    model = url.rstrip("/").rsplit("/", 1)[1]
    obj = {"clientcertificate": ClientCertificate, "servercertificate": ServerCertificate,
           "pskidentity": PskIdentity}[model].objects.first()
    page = client.get(f"{url}{obj.pk}/change/")
    assert page.status_code == 200
    for content in (listing.content, page.content):
        text = content.decode()
        assert "PRIVATE KEY" not in text
        assert psk_key not in text
        assert server.key_pem not in text
    assert client.get(f"{url}add/").status_code == 403
