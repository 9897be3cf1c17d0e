"""The dashboard's Security page and the TLS parts of the export pages, through Django's
test client: the CA, the server certificate, client certificates issued and revoked, PSK
identities, refused connections, and an export's TLS policy."""

from __future__ import annotations

import re
import time

import pytest

from appliance.exports.models import Export
from appliance.pki.models import ClientCertificate, PskIdentity
from appliance.pki.services import ca_certificate_pem
from appliance.sessions.services import refusal_record_from_engine
from nbdcore.stats import ConnectionInfo

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _storage(storage_root):
    return storage_root


def html(response) -> str:
    return response.content.decode()


def field_errors(response, field: str) -> list[str]:
    match = re.search(rf'id="id_{re.escape(field)}-errors">(.*?)</ul>', html(response), re.S)
    return re.findall(r"<li>(.*?)</li>", match.group(1), re.S) if match else []


def refusal(connection_id: int, kind: str, export: str | None, reason: str) -> None:
    info = ConnectionInfo(peer=f"192.0.2.{connection_id}:4000", id=connection_id)
    info.closed_at = time.time()
    info.refusal_kind, info.refusal, info.requested_export = kind, reason, export
    refusal_record_from_engine(snapshot=info.snapshot(), node="node1")


@pytest.mark.parametrize(("method", "url"), [
    ("get", "/security/"), ("get", "/security/ca-cert.pem"), ("post", "/security/rotate"),
    ("post", "/security/certificates/"), ("post", "/security/certificates/1/revoke"),
    ("post", "/security/psk/"), ("post", "/security/psk/1/delete"),
])
def test_security_needs_a_login(client, method, url) -> None:
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_the_page_shows_the_ca_and_the_server_certificate(web, settings) -> None:
    from appliance.pki.selectors import tls_status

    page = web.get("/security/")
    assert page.status_code == 200
    assert "script-src 'self'" in page["Content-Security-Policy"]
    status = tls_status()
    text = html(page)
    assert status["ca"]["fingerprint"] in text
    assert status["server_certificate"]["fingerprint"] in text
    assert 'id="tls-configured-mode">optional<' in text
    assert "Download CA certificate" in text
    assert "No client certificate yet" in text
    assert 'aria-current="page">Security<' in text


def test_the_ca_certificate_downloads_as_a_pem_file(web) -> None:
    response = web.get("/security/ca-cert.pem")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-pem-file"
    assert response["Content-Disposition"] == 'attachment; filename="ca-cert.pem"'
    assert response.content.decode() == ca_certificate_pem()
    assert response.content.startswith(b"-----BEGIN CERTIFICATE-----")


def test_issue_shows_the_key_once_then_lists_and_revokes(web, make_export) -> None:
    make_export("vm1", tls_policy="required", allowed_clients=["backup01"])
    issued = web.post("/security/certificates/", {"issue-name": "backup01", "issue-days": "30"})
    assert issued.status_code == 200
    assert "no-store" in issued["Cache-Control"]
    text = html(issued)
    assert "-----BEGIN PRIVATE KEY-----" in text
    assert text.count("-----BEGIN CERTIFICATE-----") >= 2  # the CA and the client's own
    certificate = ClientCertificate.objects.get(name="backup01")
    assert certificate.serial in text
    assert 'data-filename="client-key.pem"' in text
    assert 'nbdinfo &quot;nbds://127.0.0.1/vm1?tls-certificates=$HOME/nbd-tls/backup01&quot;' \
        in text
    assert "tls-creds-x509,id=tls0,endpoint=client,dir=$HOME/nbd-tls/backup01" in text
    assert "file.export=vm1,file.tls-creds=tls0" in text
    # the list, with a revoke button; the key is nowhere any more
    page = html(web.get("/security/"))
    assert 'data-certificate="backup01" data-state="active"' in page
    assert "PRIVATE KEY" not in page
    revoked = web.post(f"/security/certificates/{certificate.pk}/revoke")
    assert revoked.status_code == 302
    certificate.refresh_from_db()
    assert certificate.revoked
    page = web.get("/security/")
    assert 'data-certificate="backup01" data-state="revoked"' in html(page)
    again = web.post(f"/security/certificates/{certificate.pk}/revoke", follow=True)
    assert "already revoked" in html(again)


def test_issue_refusals_are_shown_beside_the_name(web) -> None:
    bad = web.post("/security/certificates/", {"issue-name": "no spaces", "issue-days": "30"})
    assert bad.status_code == 400
    assert any("letters, digits" in e for e in field_errors(bad, "issue-name"))
    assert web.post("/security/certificates/", {"issue-name": "alice", "issue-days": "30"}
                    ).status_code == 200
    taken = web.post("/security/certificates/", {"issue-name": "alice", "issue-days": "30"})
    assert taken.status_code == 400
    assert any("already has a certificate" in e for e in field_errors(taken, "issue-name"))
    long = web.post("/security/certificates/", {"issue-name": "bob", "issue-days": "99999"})
    assert long.status_code == 400
    assert field_errors(long, "issue-days")
    assert ClientCertificate.objects.count() == 1


def test_rotation_changes_the_server_certificate(web) -> None:
    from appliance.pki.selectors import tls_status

    before = tls_status()["server_certificate"]["fingerprint"]
    response = web.post("/security/rotate", follow=True)
    assert response.status_code == 200
    after = tls_status()["server_certificate"]["fingerprint"]
    assert after != before
    text = html(response)
    assert after in text
    assert "connected clients keep their sessions" in text


def test_psk_says_clearly_when_the_engine_cannot(web, monkeypatch) -> None:
    monkeypatch.setattr("appliance.pki.services.psk_supported", lambda: False)
    page = html(web.get("/security/"))
    assert 'id="psk-unsupported"' in page
    assert "Python 3.13" in page
    refused = web.post("/security/psk/", {"psk-name": "alice"})
    assert refused.status_code == 400
    assert "Python 3.13" in html(refused)
    assert not PskIdentity.objects.exists()


def test_psk_identities_when_supported(web, monkeypatch) -> None:
    monkeypatch.setattr("appliance.pki.services.psk_supported", lambda: True)
    monkeypatch.setattr("appliance.pki.selectors.psk_supported", lambda: True)
    created = web.post("/security/psk/", {"psk-name": "alice"})
    assert created.status_code == 200
    assert "no-store" in created["Cache-Control"]
    identity = PskIdentity.objects.get(name="alice")
    assert f"alice:{identity.key_hex}" in html(created)
    page = html(web.get("/security/"))
    assert 'data-identity="alice"' in page
    assert identity.key_hex not in page
    assert web.post(f"/security/psk/{identity.pk}/delete").status_code == 302
    assert not PskIdentity.objects.exists()


def test_refusals_are_listed_and_filtered(web, make_export) -> None:
    export = make_export("vm1", tls_policy="required")
    refusal(1, "tls_required", "vm1", "export 'vm1' requires TLS")
    refusal(2, "timeout", None, "no handshake within 10 s")
    refusal(3, "client_not_allowed", "other", "export 'other' is not allowed for mallory")
    page = html(web.get("/security/"))
    assert page.count('class="refusal"') == 3
    assert "export &#x27;vm1&#x27; requires TLS" in page
    assert "handshake not finished in time" in page
    only = html(web.get("/security/?kind=timeout"))
    assert only.count('class="refusal"') == 1
    assert 'data-kind="timeout"' in only
    # the export's page shows its own refusals only, and its panel keeps them fresh
    panel = html(web.get(f"/exports/{export.pk}/panel"))
    assert panel.count('class="refusal"') == 1
    assert "requires TLS" in panel
    detail = html(web.get(f"/exports/{export.pk}/"))
    assert "Refused clients" in detail
    assert "mallory" not in detail


# ------------------------------------------------------------------ exports with TLS


def test_create_export_with_tls_names_and_a_limit(web, make_image) -> None:
    image = make_image("disk1")
    response = web.post("/exports/", {
        "name": "vm1", "image": image.pk, "tls_policy": "required",
        "allowed_clients": "backup01, alice@example.org", "max_connections": "2",
        "enabled": "on",
    })
    assert response.status_code == 302
    export = Export.objects.get(name="vm1")
    assert (export.tls_policy, export.allowed_clients, export.max_connections) == (
        "required", ["backup01", "alice@example.org"], 2)
    page = html(web.get(response["Location"]))
    assert 'id="export-uri">nbds://127.0.0.1/vm1<' in page
    assert "nbdinfo nbd://" not in page  # no clear-text commands for a TLS-only export
    assert "tls-certificates=$HOME/nbd-tls/backup01" in page
    assert 'id="export-limit">2 at once<' in page
    listed = html(web.get("/exports/"))
    assert "TLS required" in listed
    assert "nbds://127.0.0.1/vm1" in listed


def test_client_names_without_tls_are_refused_beside_the_field(web, make_image) -> None:
    image = make_image("disk1")
    response = web.post("/exports/", {"name": "vm1", "image": image.pk,
                                      "allowed_clients": "alice"})
    assert response.status_code == 400
    errors = field_errors(response, "allowed_clients")
    assert any("only be checked over TLS" in e for e in errors), errors
    assert not Export.objects.exists()


def test_the_access_form_changes_the_policy_in_place(web, make_export, settings) -> None:
    export = make_export("vm1")
    url = f"/exports/{export.pk}/"
    page = html(web.get(url))
    assert 'id="export-uri">nbd://127.0.0.1/vm1<' in page
    assert "export-tls-uri" not in page
    changed = web.post(url, {"access-allowed_networks": "127.0.0.0/8",
                             "access-tls_policy": "optional",
                             "access-allowed_clients": "alice", "access-max_connections": "3"})
    assert changed.status_code == 302
    export.refresh_from_db()
    assert (export.allowed_networks, export.tls_policy, export.allowed_clients,
            export.max_connections) == (["127.0.0.0/8"], "optional", ["alice"], 3)
    page = html(web.get(url))
    # names imply TLS: only the nbds:// URI is offered
    assert 'id="export-uri">nbds://127.0.0.1/vm1<' in page
    refused = web.post(url, {"access-tls_policy": "off", "access-allowed_clients": "alice",
                             "access-max_connections": "3"})
    assert refused.status_code == 400
    assert any("only be checked over TLS" in e
               for e in field_errors(refused, "access-allowed_clients"))
    assert 'id="export-tls">optional' in html(refused)  # what is stored, not what was refused
    export.refresh_from_db()
    assert export.tls_policy == "optional"
    bad = web.post(url, {"access-max_connections": "-1"})
    assert bad.status_code == 400
    assert field_errors(bad, "access-max_connections")


def test_an_optional_export_offers_both_uris(web, make_export) -> None:
    export = make_export("vm1", tls_policy="optional")
    page = html(web.get(f"/exports/{export.pk}/"))
    assert 'id="export-uri">nbd://127.0.0.1/vm1<' in page
    assert 'id="export-tls-uri">nbds://127.0.0.1/vm1<' in page
    assert "nbdinfo nbd://127.0.0.1/vm1" in page
    assert "$HOME/nbd-tls/CLIENT" in page


def test_a_required_export_on_a_server_without_tls_warns(web, make_export, settings) -> None:
    settings.NBD_TLS_MODE = "off"
    export = make_export("vm1", tls_policy="required")
    page = html(web.get(f"/exports/{export.pk}/"))
    assert "no client can use it" in page
