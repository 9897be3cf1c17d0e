"""The dashboard's pages through Django's test client: login, each form's happy path and
the refusals shown beside the fields."""

from __future__ import annotations

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from appliance.exports.models import Export
from appliance.storage.models import Image

pytestmark = pytest.mark.django_db
MiB = 1 << 20

PAGES = ["/", "/images/", "/exports/", "/features/", "/overview/panel", "/security/",
         "/nodes/", "/nodes/panel"]


@pytest.fixture(autouse=True)
def _storage(storage_root):
    return storage_root


def field_errors(response, field: str) -> list[str]:
    """The messages shown beside ``field`` (rendered, not just in the context)."""
    html = response.content.decode()
    match = re.search(rf'id="id_{re.escape(field)}-errors">(.*?)</ul>', html, re.S)
    return re.findall(r"<li>(.*?)</li>", match.group(1), re.S) if match else []


@pytest.mark.parametrize("url", PAGES)
def test_every_page_needs_a_login(client, url) -> None:
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_login_and_logout(client, user) -> None:
    page = client.get("/login/")
    assert page.status_code == 200
    assert "script-src 'self'" in page["Content-Security-Policy"]
    bad = client.post("/login/", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 200
    assert "Please enter a correct username and password" in bad.content.decode()
    ok = client.post("/login/", {"username": "alice", "password": "correct horse battery"})
    assert ok.status_code == 302
    assert ok["Location"] == "/"
    assert client.get("/").status_code == 200
    out = client.post("/logout/")
    assert out.status_code == 302
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("url", PAGES)
def test_pages_render_with_a_csp_and_no_inline_script(web, make_export, url) -> None:
    make_export("vm1")
    response = web.get(url)
    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    html = response.content.decode()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag or 'type="application/json"' in tag, tag
    assert "http://" not in re.sub(r"nbd://\S+", "", html).replace("http://www.w3.org", "")


def test_create_image_with_a_size_in_units(web) -> None:
    response = web.post("/images/", {"create-name": "disk1", "create-size": "10G",
                                     "create-description": "a disk"})
    assert response.status_code == 302
    image = Image.objects.get(name="disk1")
    assert image.size == 10 << 30
    page = web.get("/images/").content.decode()
    assert "disk1" in page
    assert "10 GiB" in page


@pytest.mark.parametrize(
    ("size", "message"),
    [("ten gigs", "is not a size"), ("1000", "multiple of 512"), ("100T", "between")],
)
def test_create_image_bad_size_is_shown_beside_the_field(web, size, message) -> None:
    response = web.post("/images/", {"create-name": "disk1", "create-size": size})
    assert response.status_code == 400
    errors = field_errors(response, "create-size")
    assert message in " ".join(errors), errors
    assert not Image.objects.exists()


def test_create_image_taken_name_is_shown_beside_the_name(web, make_image) -> None:
    make_image("disk1")
    response = web.post("/images/", {"create-name": "disk1", "create-size": "1G"})
    assert response.status_code == 400
    errors = field_errors(response, "create-name")
    assert any("already exists" in e for e in errors), errors


def test_create_image_bad_name(web) -> None:
    response = web.post("/images/", {"create-name": "../etc", "create-size": "1G"})
    assert response.status_code == 400
    assert any("a name, not a path" in e for e in field_errors(response, "create-name"))


def test_import_an_uploaded_raw_image(web) -> None:
    data = bytes(MiB) + b"x" * 4096 + bytes(MiB - 4096)
    upload = SimpleUploadedFile("disk.raw", data, content_type="application/octet-stream")
    response = web.post("/images/", {"import-name": "imported", "import-file": upload})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Image.objects.get(name="imported").size == 2 * MiB


def test_import_with_a_bad_length_shows_it_beside_the_file(web) -> None:
    upload = SimpleUploadedFile("disk.raw", b"x" * 1000)
    response = web.post("/images/", {"import-name": "imported", "import-file": upload})
    assert response.status_code == 400
    errors = field_errors(response, "import-file")
    assert any("Content-Length" in e or "multiple of 512" in e for e in errors), errors


def test_grow_and_clone_and_their_errors(web, make_image) -> None:
    image = make_image("disk1", size=64 * MiB)
    url = f"/images/{image.pk}/"
    assert web.get(url).status_code == 200
    assert web.post(url, {"grow-size": "128M"}).status_code == 302
    image.refresh_from_db()
    assert image.size == 128 * MiB
    shrink = web.post(url, {"grow-size": "1M"})
    assert shrink.status_code == 400
    assert any("force" in e for e in field_errors(shrink, "grow-size"))
    cloned = web.post(url, {"clone-name": "copy"})
    assert cloned.status_code == 302
    assert Image.objects.get(name="copy").cloned_from == image
    taken = web.post(url, {"clone-name": "copy"})
    assert taken.status_code == 400
    assert any("already exists" in e for e in field_errors(taken, "clone-name"))


def test_delete_image_asks_for_confirmation_and_refuses_while_exported(web, make_export) -> None:
    export = make_export("vm1")
    url = f"/images/{export.image.pk}/delete/"
    page = web.get(url)
    assert page.status_code == 200
    assert "Yes, delete" in page.content.decode()
    assert Image.objects.filter(pk=export.image.pk).exists()
    refused = web.post(url)
    assert refused.status_code == 409
    assert "while exports use it" in refused.content.decode()
    web.post(f"/exports/{export.pk}/delete/")
    assert web.post(url).status_code == 302
    assert not Image.objects.exists()


def test_create_export_with_its_policy(web, make_image) -> None:
    image = make_image("disk1")
    response = web.post("/exports/", {
        "name": "vm1", "image": image.pk, "description": "test vm", "read_only": "on",
        "allowed_networks": "192.0.2.0/24, 10.0.0.0/8", "enabled": "on",
    })
    assert response.status_code == 302
    export = Export.objects.get(name="vm1")
    assert export.read_only
    assert not export.multi_conn
    assert export.enabled
    assert export.allowed_networks == ["192.0.2.0/24", "10.0.0.0/8"]
    page = web.get(response["Location"]).content.decode()
    assert "nbd://127.0.0.1/vm1" in page
    assert "qemu-system-x86_64 -m 2048 -drive file=nbd://127.0.0.1/vm1,format=raw,if=virtio" in page
    assert "nbdcopy" in page
    assert "qemu-img" in page


def test_create_export_bad_cidr_is_shown_beside_the_networks(web, make_image) -> None:
    image = make_image("disk1")
    response = web.post("/exports/", {"name": "vm1", "image": image.pk,
                                      "allowed_networks": "192.0.2.1/24"})
    assert response.status_code == 400
    errors = field_errors(response, "allowed_networks")
    assert any("did you mean '192.0.2.0/24'" in e.replace("&#x27;", "'") for e in errors), errors
    assert not Export.objects.exists()


def test_create_export_taken_name_is_shown_beside_the_name(web, make_export, make_image) -> None:
    make_export("vm1")
    other = make_image("other")
    response = web.post("/exports/", {"name": "vm1", "image": other.pk})
    assert response.status_code == 400
    assert any("already taken" in e for e in field_errors(response, "name"))


def test_disable_enable_and_delete_an_export(web, make_export) -> None:
    export = make_export("vm1")
    assert web.post(f"/exports/{export.pk}/toggle", {"enabled": "0"}).status_code == 302
    export.refresh_from_db()
    assert not export.enabled
    assert "disabled" in web.get(f"/exports/{export.pk}/").content.decode()
    web.post(f"/exports/{export.pk}/toggle", {"enabled": "1"})
    export.refresh_from_db()
    assert export.enabled
    assert web.get(f"/exports/{export.pk}/delete/").status_code == 200
    assert web.post(f"/exports/{export.pk}/delete/").status_code == 302
    assert not Export.objects.exists()


def test_export_panel_and_overview_rates(web, make_export) -> None:
    export = make_export("vm1")
    panel = web.get(f"/exports/{export.pk}/panel")
    assert panel.status_code == 200
    assert "No client is connected" in panel.content.decode()
    rates = web.get("/overview/rates.json").json()
    assert [e["name"] for e in rates["exports"]] == ["vm1"]


def test_feature_adoption_periods(web) -> None:
    for period in ("1h", "24h", "7d", "30d", "all"):
        assert web.get(f"/features/?period={period}").status_code == 200
    ok = web.get("/features/?period=custom&since=2025-01-01T00:00&until=2025-02-01T00:00")
    assert ok.status_code == 200
    bad = web.get("/features/?period=custom&since=2025-02-01T00:00&until=2025-01-01T00:00")
    assert bad.status_code == 400
    assert "later than since" in bad.content.decode()
